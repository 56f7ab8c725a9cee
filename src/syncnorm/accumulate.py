"""Gradient accumulation: running statistics that move once per window, as one big batch would move them."""

from __future__ import annotations

from typing import Any

from torch import nn

from .modules import SyncLayer

__all__ = ["AccumulationWindow", "accumulate"]


class AccumulationWindow:
    """An open accumulation window over a model's syncnorm layers; :meth:`close` ends it.

    Also a context manager (``with syncnorm.accumulate(model): ...``), which closes it on exit.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = [module for module in model.modules() if isinstance(module, SyncLayer)]
        if any(layer._pool() is not None for layer in self.layers):
            raise RuntimeError(
                "syncnorm.accumulate: a window is already open on this model; windows do not nest. Close the "
                "outer one first (one window per optimizer step)."
            )
        for layer in self.layers:
            layer._open_window()

    def close(self) -> None:
        """Move the running statistics once, by everything pooled since the window opened. Idempotent.

        Every layer's window is closed even if one of them fails to move its statistics; the first
        error is raised afterwards.
        """
        layers, self.layers = self.layers, []
        failure = None
        for layer in layers:
            try:
                layer._close_window()
            except BaseException as error:  # close the others first
                failure = failure or error
        if failure is not None:
            raise failure

    def __enter__(self) -> AccumulationWindow:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def accumulate(model: nn.Module) -> AccumulationWindow:
    """Open an accumulation window: the running statistics move once, for all micro-batches together.

    Wrap the micro-batches of one optimizer step (gradient accumulation)::

        for window in windows:
            with syncnorm.accumulate(model):
                for inputs, targets in window:  # k micro-batches
                    loss_fn(model(inputs), targets).backward()
            optimizer.step()
            optimizer.zero_grad()

    or keep the returned window and call its ``close()`` where a framework ends the step.

    What it changes, for every syncnorm layer of ``model`` that keeps running statistics:

    * Each micro-batch is still normalised with its own statistics, global over the ranks, as
      without the window: the output and the gradients do not change (on a single process, where
      a layer otherwise runs ``F.batch_norm``, they agree to float rounding).
    * The running statistics move once, when the window closes, by the count-weighted pool of
      all its micro-batches: ``running_mean`` and ``running_var`` end as one training forward
      on all of the window's samples (every rank's, every micro-batch's) would leave them.
      ``num_batches_tracked`` advances once per window. No collective is added: every rank
      already holds each micro-batch's global statistics.
    * A window that ends early (the last, partial window of an epoch) pools the micro-batches
      it holds. ``model.eval()`` inside a window moves the statistics by what the window holds
      so far first (evaluation sees them); training after it pools afresh.
    * A layer whose own forward raised does not pool that micro-batch (layers before it in the
      model did, as they would have moved their running statistics without a window).

    Works with DDP (``no_sync`` included), FSDP2 and ``torch.compile``. Layers without running
    statistics, and layers that are not syncnorm's (a plain ``nn.BatchNorm2d``), are not touched.
    Windows do not nest: opening a second one on the same model raises ``RuntimeError``.
    """
    return AccumulationWindow(model)
