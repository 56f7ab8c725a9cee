"""ProfileCallback: :func:`syncnorm.profile` over every training epoch of a Lightning fit, logged.

Re-exported as ``syncnorm.lightning.ProfileCallback``; needs PyTorch Lightning like the rest of
:mod:`syncnorm.lightning`.
"""

from __future__ import annotations

from typing import Optional

from .lightning import pl
from .profiler import Profile, profile

__all__ = ["ProfileCallback"]


class ProfileCallback(pl.Callback):
    """Log what syncnorm's collectives cost each training epoch, on every rank's logger.

    Logs ``syncnorm/collective_share`` (the share of the epoch's wall time this rank spent in
    syncnorm's collectives, waiting for slower ranks included), ``syncnorm/collective_seconds``,
    ``syncnorm/calls`` and ``syncnorm/payload_bytes`` at the end of each training epoch; with
    ``print_table=True`` rank 0 also prints :meth:`syncnorm.Profile.table`. ``last`` holds the
    last epoch's :class:`syncnorm.Profile`.
    """

    def __init__(self, print_table: bool = False) -> None:
        self.print_table = print_table
        self.last: Optional[Profile] = None
        self._open: Optional[Profile] = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop()
        self._open = profile().__enter__()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        recorded = self._stop()
        if recorded is None:
            return
        summary = recorded.summary()
        metrics = {f"syncnorm/{key}": float(summary[key]) for key in
                   ("collective_share", "collective_seconds", "calls", "payload_bytes")}  # fmt: skip
        pl_module.log_dict(metrics, on_epoch=True)
        if self.print_table and trainer.is_global_zero:
            print(recorded.table(), flush=True)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop()

    def _stop(self) -> Optional[Profile]:
        recorded, self._open = self._open, None
        if recorded is not None:
            recorded.__exit__(None, None, None)
            self.last = recorded
        return recorded
