"""PyTorch Lightning integration: a layer-sync plugin and a callback that also watches the statistics.

* :class:`SyncNormPlugin` is a Lightning ``LayerSync`` plugin. ``Trainer(plugins=[SyncNormPlugin()])``
  makes the "ddp" family and "fsdp" strategies swap every BatchNorm for :class:`syncnorm.SyncBatchNorm`
  when fitting, before the model is wrapped, and swap them back at teardown. Unlike
  ``sync_batchnorm=True`` (torch's ``nn.SyncBatchNorm``) it runs on CPU/gloo as well as GPU/NCCL.
* :class:`SyncNormCallback` converts in ``setup`` (before the strategy wraps the model), so it works
  without the plugin, and every ``check_every_n_steps`` it checks with one small all_reduce that the
  running statistics are identical on all ranks, and logs ``syncnorm/*`` metrics.

Needs the ``pytorch_lightning`` package (``pip install "syncnorm[lightning]"``); the ``lightning``
package's ``lightning.pytorch`` namespace is used when ``pytorch_lightning`` is not installed.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, Optional

import torch
import torch.distributed as dist
from torch import nn

from . import collectives
from .collectives import SyncGroup
from .convert import CONVERTIBLE_BATCHNORMS as _CONVERTIBLE_BATCHNORMS
from .convert import convert_sync_batchnorm, revert_sync_batchnorm
from .errors import SyncNormDriftWarning, SyncNormMismatchError
from .modules import SyncBatchNorm


def _missing_lightning() -> ImportError:
    return ImportError(
        "syncnorm.lightning needs PyTorch Lightning, which is not installed. Install it with the "
        'extra: pip install "syncnorm[lightning]"  (the plain syncnorm layers need no Lightning)'
    )


try:
    import pytorch_lightning as pl
    from pytorch_lightning.plugins import LayerSync, TorchSyncBatchNorm
    from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy
except ModuleNotFoundError as no_pl:
    if no_pl.name != "pytorch_lightning":
        raise  # Lightning is there but one of its own dependencies is not: show that error as it is
    try:
        import lightning.pytorch as pl
        from lightning.pytorch.plugins import LayerSync, TorchSyncBatchNorm
        from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
    except ModuleNotFoundError as no_lightning:
        if no_lightning.name not in ("lightning", "lightning.pytorch"):
            raise
        raise _missing_lightning() from no_pl

__all__ = [
    "AccumulationCallback",
    "PreciseBNCallback",
    "ProfileCallback",
    "SyncNormCallback",
    "SyncNormDriftWarning",
    "SyncNormPlugin",
]


class SyncNormPlugin(LayerSync):
    """Lightning layer-sync plugin: BatchNorm -> :class:`syncnorm.SyncBatchNorm` while fitting.

    Lightning's "ddp", "ddp_spawn" (and the other ``DDPStrategy`` start methods) and "fsdp"
    strategies call :meth:`apply` in their ``setup`` when fitting, before wrapping the model,
    and :meth:`revert` at teardown, so a model leaves ``fit`` with plain BatchNorm again. Other
    strategies (single device, DeepSpeed, ModelParallel, XLA) never call a layer-sync plugin;
    add :class:`SyncNormCallback`, which then converts the layers itself and says so.

    Args:
        process_group: ranks to synchronise over: ``None`` (all ranks), a ``ProcessGroup``
            or a 1-D ``DeviceMesh`` such as ``mesh["dp"]``. A group can only exist after
            Lightning has started the processes; to synchronise within blocks of ranks, pass
            ``group_size`` instead.
        group_size: synchronise within blocks of this many consecutive ranks (e.g. the GPUs of
            one node); the groups are made with :func:`syncnorm.new_sync_groups` in
            :meth:`apply`, when the default process group exists.
    """

    def __init__(self, process_group: SyncGroup = None, *, group_size: Optional[int] = None) -> None:
        if process_group is not None and group_size is not None:
            raise ValueError("SyncNormPlugin: pass either process_group or group_size, not both")
        if group_size is not None and (
            isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1
        ):
            raise ValueError(f"SyncNormPlugin: group_size must be a positive int, got {group_size!r}")
        if collectives._is_device_mesh(process_group):
            collectives.resolve_group(process_group)  # a 2-D mesh fails now, not inside fit
        self.process_group = process_group
        self.group_size = group_size
        self._built: Optional[tuple[Any, dist.ProcessGroup]] = None  # (default group, its sub-group)

    def sync_group(self) -> SyncGroup:
        """The group the layers synchronise over; builds the ``group_size`` blocks on first use.

        Collective when it builds: every rank must call it (Lightning's ``setup`` does).
        """
        if self.group_size is None:
            return self.process_group
        if not (dist.is_available() and dist.is_initialized()):
            return None  # one process: the layers take their exact nn.BatchNorm path
        world = dist.group.WORLD
        if self._built is None or self._built[0] is not world:  # a new default group (another fit)
            self._built = (world, collectives.new_sync_groups(self.group_size))
        return self._built[1]

    def apply(self, model: nn.Module) -> nn.Module:
        """Replace the model's BatchNorm layers with :class:`syncnorm.SyncBatchNorm`, sharing their state."""
        return convert_sync_batchnorm(model, self.sync_group())

    def revert(self, model: nn.Module) -> nn.Module:
        """Turn the synchronised layers back into the BatchNorm classes they were converted from.

        Also destroys the ``group_size`` groups this plugin built (they belong to syncnorm, and
        no layer uses them any more), so that their gloo threads are gone before the process
        exits; the next ``apply`` builds new ones.
        """
        reverted = revert_sync_batchnorm(model)
        self._destroy_built_groups()
        return reverted

    def _destroy_built_groups(self) -> None:
        built, self._built = self._built, None
        if built is None or not (dist.is_available() and dist.is_initialized()) or built[0] is not dist.group.WORLD:
            return  # nothing built, or its default group is gone (destroying that destroyed ours too)
        group = built[1]
        if group is not None and group != dist.GroupMember.NON_GROUP_MEMBER:
            dist.destroy_process_group(group)  # local: waits for this rank's pending work only

    def __getstate__(self) -> dict:
        # ddp_spawn pickles the trainer into the workers; process groups do not pickle and
        # belong to one process anyway.
        state = dict(self.__dict__)
        state["_built"] = None
        return state

    def __repr__(self) -> str:
        return f"SyncNormPlugin(process_group={self.process_group!r}, group_size={self.group_size!r})"


def _applies_layer_sync(strategy: Any) -> bool:
    # Lightning's DDPStrategy.setup and FSDPStrategy.setup are the only places that call a
    # layer-sync plugin; subclasses that replace setup (DeepSpeed, XLA) skip it. A user subclass
    # that overrides setup and calls super() is counted as "skips", which only makes the
    # callback convert first; the plugin's apply then finds syncnorm layers and keeps them.
    return getattr(type(strategy), "setup", None) in (DDPStrategy.setup, FSDPStrategy.setup)


def _configured_layer_sync(trainer: pl.Trainer) -> Optional[LayerSync]:
    # Parallel strategies get the plugin as `_layer_sync`; the others never receive it, only
    # the accelerator connector remembers it.
    found = getattr(trainer.strategy, "_layer_sync", None)
    if found is None:
        found = getattr(getattr(trainer, "_accelerator_connector", None), "_layer_sync", None)
    return found


def _plain_batchnorm_names(model: nn.Module) -> list[str]:
    return [name or type(m).__name__ for name, m in model.named_modules() if isinstance(m, _CONVERTIBLE_BATCHNORMS)]


def _short_list(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class SyncNormCallback(pl.Callback):
    """Converts BatchNorm to :class:`syncnorm.SyncBatchNorm` in ``setup`` and monitors the running statistics.

    Conversion: in ``setup("fit")``, which Lightning runs before ``configure_model`` and before
    the strategy wraps the model (DDP, FSDP), plain BatchNorm layers are converted (with
    ``process_group``/``group_size``, as in :class:`SyncNormPlugin`) and reverted at teardown.
    When a :class:`SyncNormPlugin` is configured and the strategy applies it, the callback leaves
    the conversion to the plugin (which also sees layers built in ``configure_model``); when the
    strategy ignores layer-sync plugins, the callback converts with the plugin's settings and warns.

    Health check: every ``check_every_n_steps`` optimizer steps, and at the end of training,
    one all_reduce (MAX) of ``[c, -c, b]`` per synchronisation group, where ``c`` holds a
    checksum of each layer's ``running_mean`` and ``running_var`` and ``b`` the local batch
    size of each rank in its slot. Equal max and min mean identical statistics everywhere;
    otherwise the layers and ranks that differ are named (``on_drift="warn"`` or ``"raise"``).
    Logged with ``pl_module.log`` at the step checks: ``syncnorm/global_batch_size`` (the batch
    the first synchronised layer normalised over, summed over its group),
    ``syncnorm/num_sync_layers`` and ``syncnorm/max_drift`` (largest max-min spread of a checksum,
    relative to its size when above 1).

    Args:
        check_every_n_steps: steps between checks; 0 checks only at the end of training.
        on_drift: ``"warn"`` (a :class:`SyncNormDriftWarning` on the first rank of the group)
            or ``"raise"`` (:class:`syncnorm.SyncNormMismatchError` on every rank).
        tolerance: largest ``syncnorm/max_drift`` still treated as identical. Synchronised
            statistics are bitwise equal on every rank, so anything above rounding noise is a fault.
        process_group: the group to convert with, as for :class:`SyncNormPlugin`.
        group_size: synchronise within blocks of this many consecutive ranks, as for
            :class:`SyncNormPlugin`.
    """

    def __init__(
        self,
        check_every_n_steps: int = 100,
        on_drift: Literal["warn", "raise"] = "warn",
        tolerance: float = 1e-6,
        process_group: SyncGroup = None,
        *,
        group_size: Optional[int] = None,
    ) -> None:
        if on_drift not in ("warn", "raise"):
            raise ValueError(f'SyncNormCallback: on_drift must be "warn" or "raise", got {on_drift!r}')
        if check_every_n_steps < 0:
            raise ValueError(f"SyncNormCallback: check_every_n_steps must be >= 0, got {check_every_n_steps}")
        if tolerance < 0:
            raise ValueError(f"SyncNormCallback: tolerance must be >= 0, got {tolerance}")
        self.check_every_n_steps = check_every_n_steps
        self.on_drift = on_drift
        self.tolerance = tolerance
        self._converter = SyncNormPlugin(process_group, group_size=group_size)
        self._reverter: Optional[LayerSync] = None  # set when this callback converted the model
        self._layers: list[SyncBatchNorm] = []
        self._local_batch_size = 0
        self._hook: Any = None
        self._last_checked_step = -1

    # --- conversion ---------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return  # evaluation uses the running statistics and never synchronises
        layer_sync = _configured_layer_sync(trainer)
        strategy = type(trainer.strategy).__name__
        if isinstance(layer_sync, TorchSyncBatchNorm):
            raise ValueError(
                "SyncNormCallback: Trainer(sync_batchnorm=True) makes Lightning replace every BatchNorm, "
                "syncnorm's included, with torch.nn.SyncBatchNorm (CUDA only, and DDP rejects it on CPU). "
                "Remove sync_batchnorm=True: SyncNormCallback already synchronises the BatchNorm layers "
                "(or pass plugins=[syncnorm.lightning.SyncNormPlugin()] instead)."
            )
        converter: LayerSync = self._converter
        if isinstance(layer_sync, SyncNormPlugin):
            if _applies_layer_sync(trainer.strategy):
                return  # the plugin converts in strategy.setup, with its own group settings
            converter = layer_sync
            warnings.warn(
                f"SyncNormPlugin has no effect with the {strategy} strategy, which never calls layer-sync "
                "plugins; SyncNormCallback converts the BatchNorm layers itself (with the plugin's group "
                "settings). Use strategy='ddp', 'ddp_spawn' or 'fsdp' for the plugin to apply."
                + (" With a single device there is nothing to synchronise." if trainer.world_size == 1 else ""),
                UserWarning,
                stacklevel=2,
            )
        if _plain_batchnorm_names(pl_module):
            converter.apply(pl_module)
            self._reverter = converter

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hook()
        self._layers = []
        if stage == "fit" and self._reverter is not None:
            # Lightning tears the strategy down (unwrapping DDP) before the callbacks' teardown.
            self._reverter.revert(pl_module)
            self._reverter = None

    # --- health check -------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        leftover = _plain_batchnorm_names(pl_module)
        if leftover:
            warnings.warn(
                f"SyncNormCallback: BatchNorm layers {_short_list(leftover)} are not synchronised: they were "
                "not there at setup (built in configure_model?) and no SyncNormPlugin converted them. "
                "Pass plugins=[syncnorm.lightning.SyncNormPlugin()] with strategy='ddp' or 'fsdp'.",
                UserWarning,
                stacklevel=2,
            )
        self._layers = [m for m in pl_module.modules() if isinstance(m, SyncBatchNorm)]
        self._last_checked_step = -1
        self._remove_hook()
        if self._layers:
            self._hook = self._layers[0].register_forward_pre_hook(self._record_batch_size)

    def _record_batch_size(self, module: nn.Module, args: tuple) -> None:
        if module.training and args and isinstance(args[0], torch.Tensor):
            self._local_batch_size = args[0].shape[0]

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # global_step counts optimizer steps; with gradient accumulation several batches end on
        # the same step, and each rank sees the same sequence, so they all check together.
        if self.check_every_n_steps and step % self.check_every_n_steps == 0 and step != self._last_checked_step:
            self._last_checked_step = step
            metrics = self.check_running_stats()
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=self._local_batch_size or 1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self._last_checked_step:
            self.check_running_stats()
        self._remove_hook()

    def check_running_stats(self) -> dict[str, float]:
        """Compare the running statistics across ranks now; collective over each layer group.

        Returns the ``syncnorm/*`` metrics; warns or raises (``on_drift``) when they differ.
        """
        metrics = {"syncnorm/num_sync_layers": float(len(self._layers)), "syncnorm/max_drift": 0.0}
        metrics["syncnorm/global_batch_size"] = float(self._local_batch_size)
        groups: dict[str, tuple[dist.ProcessGroup, list[SyncBatchNorm]]] = {}
        for layer in self._layers:
            group = collectives.resolve_group(layer.process_group)
            if group is not None and dist.get_world_size(group) > 1 and layer.running_mean is not None:
                groups.setdefault(group.group_name, (group, []))[1].append(layer)
        for group, layers in groups.values():
            # The batch sizes ride along in the group of the first layer, the one the hook watches.
            has_first = layers[0] is self._layers[0]
            drift, batch_size = self._check_group(group, layers, with_batch_sizes=has_first)
            metrics["syncnorm/max_drift"] = max(metrics["syncnorm/max_drift"], drift)
            if has_first:
                metrics["syncnorm/global_batch_size"] = batch_size
        return metrics

    def _check_group(
        self, group: dist.ProcessGroup, layers: list[SyncBatchNorm], with_batch_sizes: bool
    ) -> tuple[float, float]:
        checksums = _checksums(layers)
        size, me = dist.get_world_size(group), dist.get_rank(group)
        slots = checksums.new_zeros(size if with_batch_sizes else 0)
        if with_batch_sizes:
            slots[me] = self._local_batch_size
        # MAX over [c, -c] gives every rank the same max and min: all ranks reach the same verdict.
        packed = torch.cat([checksums, -checksums, slots])
        label = layers[0].layer_name + (f" (+{len(layers) - 1} more)" if len(layers) > 1 else "")
        collectives.all_reduce(packed, group, layer=label, what="running-statistics health check", op=dist.ReduceOp.MAX)
        n = checksums.numel()
        high, low = packed[:n], -packed[n : 2 * n]
        drift = (high - low) / torch.maximum(high.abs(), low.abs()).clamp_min(1.0)
        drift = torch.where(torch.isfinite(drift), drift, torch.inf)  # NaN/Inf statistics are reported too
        max_drift = float(drift.max())
        if max_drift > self.tolerance:
            self._report_drift(group, layers, checksums, drift, label)
        return max_drift, float(packed[2 * n :].sum())

    def _report_drift(
        self,
        group: dist.ProcessGroup,
        layers: list[SyncBatchNorm],
        checksums: torch.Tensor,
        drift: torch.Tensor,
        label: str,
    ) -> None:
        # Failure path only: gather every rank's checksums to say which ranks differ.
        rows = collectives.all_gather_rows(checksums, group, layer=label, what="running-statistics health check")
        ranks = dist.get_process_group_ranks(group)
        lines = []
        for i in torch.nonzero(drift > self.tolerance).flatten().tolist():
            layer, buffer = layers[i // 2], ("running_mean", "running_var")[i % 2]
            column = rows[:, i]
            non_finite = [ranks[r] for r in range(len(ranks)) if not torch.isfinite(column[r])]
            if non_finite:
                lines.append(f"  layer '{layer.layer_name}' {buffer}: NaN/Inf on ranks {non_finite}")
                continue
            differing = [ranks[r] for r in range(len(ranks)) if column[r] != column[0]]
            lines.append(
                f"  layer '{layer.layer_name}' {buffer}: ranks {differing} differ from rank {ranks[0]} "
                f"(spread {float(drift[i]):.3g}, relative where the values exceed 1)"
            )
        message = (
            f"syncnorm: running statistics differ across the {len(ranks)} ranks {ranks} of a group:\n"
            + "\n".join(lines)
            + "\nSynchronised layers update them identically on every rank, so something changed them on "
            "some ranks only: a layer run in local mode (not converted, or another process_group), a "
            "checkpoint or state_dict loaded on some ranks, or code that writes the buffers."
            + (
                " NaN/Inf means training diverged (check the loss, learning rate and inputs)."
                if "NaN" in "".join(lines)
                else ""
            )
        )
        if self.on_drift == "raise":
            raise SyncNormMismatchError(message)
        if dist.get_rank(group) == 0:
            warnings.warn(message, SyncNormDriftWarning, stacklevel=2)


def _checksums(layers: list[SyncBatchNorm]) -> torch.Tensor:
    """Two float64 numbers per layer: weighted sums of running_mean and running_var.

    The weights 1 + i/C make a swap of channels visible too.
    """
    values = []
    for layer in layers:
        mean, var = layer.running_mean.detach().double(), layer.running_var.detach().double()
        weights = 1.0 + torch.arange(mean.numel(), dtype=torch.float64, device=mean.device) / max(mean.numel(), 1)
        values += [torch.dot(weights, mean), torch.dot(weights, var)]
    return torch.stack(values)


from .lightning_accumulate import AccumulationCallback  # noqa: E402  (syncnorm.lightning.AccumulationCallback)
from .lightning_precise import PreciseBNCallback  # noqa: E402  (syncnorm.lightning.PreciseBNCallback)
from .lightning_profile import ProfileCallback  # noqa: E402  (syncnorm.lightning.ProfileCallback)
