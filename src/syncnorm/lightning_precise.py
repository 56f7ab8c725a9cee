"""PreciseBNCallback: :func:`syncnorm.precise_bn` on the training data inside a Lightning fit.

Re-exported as ``syncnorm.lightning.PreciseBNCallback``; needs PyTorch Lightning like the rest of
:mod:`syncnorm.lightning`, whose import logic (``pytorch_lightning`` or ``lightning.pytorch``) it uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Optional

from torch.utils.data import DataLoader

from .collectives import SyncGroup
from .lightning import pl
from .precise import PreciseBNResult, precise_bn

__all__ = ["PreciseBNCallback"]


class PreciseBNCallback(pl.Callback):
    """Recompute the BatchNorm statistics as population statistics of the training data, across ranks.

    Runs :func:`syncnorm.precise_bn` with the model as it is at that point (the LightningModule
    itself, not the DDP wrapper) over at most ``num_batches`` batches of the training dataloader
    on every rank:

    * every ``every_n_epochs`` epochs, after the epoch's last training batch and before the
      validation Lightning runs at the epoch end, so that validation and the checkpoints saved
      after it see the precise statistics (training then goes on from them);
    * with ``at_train_end``, after the last training step, so the model ``fit`` leaves (and
      what you save or test after it) has them. A run at the same step as the epoch-end one is skipped.

    Each run logs to the trainer's loggers ``precise_bn/max_mean_change`` (the largest change of a
    running mean over all layers and channels, in units of the old running standard deviation),
    ``precise_bn/max_var_change`` (relative change of a running variance), ``precise_bn/batches``
    (over all ranks) and ``precise_bn/seconds``; :attr:`history` keeps them with epoch and step.

    With :class:`syncnorm.lightning.SyncNormPlugin` the layers synchronise, so every rank runs the
    same number of batches (see :func:`syncnorm.precise_bn`); Lightning's distributed sampler
    already gives every rank the same number.

    Args:
        num_batches: batches per rank per run.
        every_n_epochs: run at the end of every N-th epoch; 0: never.
        at_train_end: run after the last training step.
        forward: ``forward(pl_module, batch)`` for one batch, already on the device. Default:
            ``pl_module(batch[0])`` for a tuple or list batch, ``pl_module(batch)`` otherwise.
        other_modules: ``"eval"`` runs every module other than BatchNorm in eval mode (dropout
            off: the inputs evaluation will see); ``"as_is"`` leaves them in training mode.
        process_group: ranks whose batches make up the population (default: all).
        progress: a progress bar on the first rank.
    """

    def __init__(
        self,
        num_batches: int = 200,
        every_n_epochs: int = 0,
        at_train_end: bool = True,
        forward: Optional[Callable[[pl.LightningModule, Any], Any]] = None,
        other_modules: Literal["eval", "as_is"] = "eval",
        process_group: SyncGroup = None,
        progress: bool = False,
    ) -> None:
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"PreciseBNCallback: num_batches must be a positive int, got {num_batches!r}")
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 0:
            raise ValueError(f"PreciseBNCallback: every_n_epochs must be an int >= 0, got {every_n_epochs!r}")
        if other_modules not in ("eval", "as_is"):
            raise ValueError(f'PreciseBNCallback: other_modules must be "eval" or "as_is", got {other_modules!r}')
        if not every_n_epochs and not at_train_end:
            raise ValueError("PreciseBNCallback: with every_n_epochs=0 and at_train_end=False it would never run")
        self.num_batches = num_batches
        self.every_n_epochs = every_n_epochs
        self.at_train_end = at_train_end
        self.forward = forward
        self.other_modules = other_modules
        self.process_group = process_group
        self.progress = progress
        self.history: list[dict[str, float]] = []
        self.last_result: Optional[PreciseBNResult] = None
        self._last_step = -1
        self._last_epoch = -1

    def _due(self, trainer: pl.Trainer) -> bool:
        epoch = trainer.current_epoch
        return bool(self.every_n_epochs) and (epoch + 1) % self.every_n_epochs == 0 and epoch != self._last_epoch

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # The epoch's last batch: Lightning's epoch-end validation comes next.
        if batch_idx + 1 == trainer.num_training_batches and self._due(trainer):
            self.run(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._due(trainer):  # the last batch was not recognised (a dataloader without a length)
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_train_end and trainer.global_step != self._last_step:
            self.run(trainer, pl_module)

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> PreciseBNResult:
        """Recompute the statistics now, on every rank (collective)."""
        loader = trainer.train_dataloader
        if not isinstance(loader, DataLoader):
            raise TypeError(
                "PreciseBNCallback needs a single training DataLoader, got "
                f"{type(loader).__name__}; call syncnorm.precise_bn yourself for several"
            )
        step = self.forward or _default_forward
        precision = trainer.precision_plugin

        def forward(module: Any, batch: Any) -> Any:
            with precision.train_step_context():
                return step(module, trainer.strategy.batch_to_device(batch))

        modes = {module: module.training for module in pl_module.modules()}
        if self.other_modules == "eval":
            pl_module.eval()  # precise_bn puts the BatchNorm layers in training mode itself
        try:
            result = precise_bn(
                pl_module,
                loader,
                self.num_batches,
                forward=forward,
                process_group=self.process_group,
                progress=self.progress and trainer.is_global_zero,
            )
        finally:
            for module, training in modes.items():
                module.train(training)
        self.last_result = result
        self._last_step, self._last_epoch = trainer.global_step, trainer.current_epoch
        metrics = {
            "precise_bn/max_mean_change": result.max_mean_change,
            "precise_bn/max_var_change": result.max_var_change,
            "precise_bn/batches": float(result.batches),
            "precise_bn/seconds": result.seconds,
        }
        self.history.append({"epoch": float(trainer.current_epoch), "step": float(trainer.global_step), **metrics})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        return result


def _default_forward(module: Any, batch: Any) -> Any:
    return module(batch[0] if isinstance(batch, (tuple, list)) else batch)
