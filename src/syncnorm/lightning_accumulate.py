"""AccumulationCallback: one :func:`syncnorm.accumulate` window per optimizer step of a Lightning fit.

Re-exported as ``syncnorm.lightning.AccumulationCallback``; needs PyTorch Lightning like the rest of
:mod:`syncnorm.lightning`.
"""

from __future__ import annotations

from typing import Any, Optional

from .accumulate import AccumulationWindow, accumulate
from .lightning import pl

__all__ = ["AccumulationCallback"]


class AccumulationCallback(pl.Callback):
    """With ``Trainer(accumulate_grad_batches=k)``: the running statistics move once per optimizer step.

    Opens a :func:`syncnorm.accumulate` window at the first training batch of each optimizer
    step and closes it just before the optimizer steps, so the running statistics move once, by
    the pooled statistics of the step's k micro-batches (see :func:`syncnorm.accumulate` for the
    rules). The last, partial window of an epoch closes when Lightning steps for it; validation
    in the middle of a window sees the statistics so far. Without it, every micro-batch moves
    them by a momentum step of its own.
    """

    def __init__(self) -> None:
        self._window: Optional[AccumulationWindow] = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._window is None:
            self._window = accumulate(pl_module)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._close()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    def _close(self) -> None:
        window, self._window = self._window, None
        if window is not None:
            window.close()
