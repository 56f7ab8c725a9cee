"""Swap a model's BatchNorm layers for syncnorm's, and back, without changing what the model computes.

The rule, for every ``_BatchNorm`` in the model:

* exact ``nn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm``: become :class:`SyncBatchNorm`;
* a class registered with :func:`register_conversion` (timm's ``BatchNormAct2d`` and
  ``SyncBatchNormAct`` are, see ``model_zoo.py``): converted by its rule;
* a subclass that does not override ``forward`` (mmengine's ``_BatchNormXd``, say):
  converted like its base, and reverted to its own class;
* an uninitialised lazy BatchNorm: a ``ValueError`` (its class and size are not known yet);
* any other subclass: a ``TypeError`` naming the class and module path. Its ``forward``
  may do more than normalise (timm's activation, a split batch, quantisation), and a
  plain synchronised layer in its place would silently compute something else. That
  is the bug that made timm write its own converter; torch's converter still has it.

Conversions move the module's whole state (parameters, buffers, child modules, hooks
and attributes, as the very same objects) into the new class, so nothing a user set on
a layer is lost, and optimiser state built before conversion still applies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Optional, Union

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from . import collectives
from .modules import SyncBatchNorm

__all__ = [
    "CONVERTIBLE_BATCHNORMS",
    "convert_sync_batchnorm",
    "register_conversion",
    "rebuild_as",
    "revert_sync_batchnorm",
]

# The exact classes convert_sync_batchnorm replaces with SyncBatchNorm.
CONVERTIBLE_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# A subclass whose forward is one of these computes what its base does.
_BASE_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)
# Attributes only syncnorm's layers carry; dropped when a layer goes back to a plain class.
_SYNCNORM_ATTRIBUTES = ("process_group", "layer_name", "check", "_original_cls")
# Set by fuse_inplace_abn on the InPlaceABN it makes: (the BatchNorm's class, the activation module).
UNFUSED_PAIR = "_unfused_pair"
_INPLACE_ABN_ATTRIBUTES = ("activation", "activation_param", "inplace", UNFUSED_PAIR)

ToSync = Union[type, Callable[[nn.Module, collectives.SyncGroup], nn.Module]]
ToPlain = Union[type, Callable[[nn.Module], nn.Module]]


@dataclass(frozen=True)
class _Conversion:
    to_sync: ToSync
    to_plain: Optional[ToPlain]


_CONVERSIONS: dict[type, _Conversion] = {}
# Rules for classes of optional packages, keyed by "module.QualName" and registered on first
# sight of such a class, so that syncnorm never imports timm for a model without timm layers.
_LAZY_CONVERSIONS: dict[str, Callable[[], None]] = {}


def register_conversion(cls: type, to_sync: ToSync, to_plain: Optional[ToPlain] = None) -> None:
    """Tell :func:`convert_sync_batchnorm` how to convert ``cls`` (exact class, not its subclasses).

    ``to_sync`` is either a subclass of :class:`SyncBatchNorm` (the module's whole state
    is moved into it, see :func:`rebuild_as`) or a callable ``(module, process_group) ->
    new_module``. ``to_plain`` is what :func:`revert_sync_batchnorm` does with the converted
    layer: a class to rebuild it as, or a callable ``(layer) -> module``; ``None`` rebuilds
    it as ``cls``. Example, for a BatchNorm subclass that adds a residual in ``forward``:

        class SyncResidualBN(syncnorm.SyncBatchNorm):
            def forward(self, x):
                return super().forward(x) + x

        syncnorm.register_conversion(ResidualBN, SyncResidualBN)
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"syncnorm.register_conversion: cls must be an nn.Module class, got {cls!r}")
    if isinstance(to_sync, type) and not issubclass(to_sync, SyncBatchNorm):
        raise TypeError(
            f"syncnorm.register_conversion: to_sync must be a subclass of syncnorm.SyncBatchNorm or a callable "
            f"(module, process_group) -> module, got the class {to_sync.__name__}"
        )
    _CONVERSIONS[cls] = _Conversion(to_sync, to_plain)


def register_lazy_conversion(qualified_name: str, register: Callable[[], None]) -> None:
    """Run ``register`` (which calls :func:`register_conversion`) the first time a class named so is seen."""
    _LAZY_CONVERSIONS[qualified_name] = register


def _conversion_for(cls: type) -> Optional[_Conversion]:
    if cls not in _CONVERSIONS:
        register = _LAZY_CONVERSIONS.pop(f"{cls.__module__}.{cls.__qualname__}", None)
        if register is not None:
            register()
    return _CONVERSIONS.get(cls)


def rebuild_as(module: nn.Module, cls: type) -> nn.Module:
    """A new ``cls`` instance holding ``module``'s state: the same parameter, buffer, child and hook objects.

    ``cls.__init__`` is not called: every attribute comes from ``module``. The parameter,
    buffer and child dicts are copied (so the two never change together); hook dicts are
    shared, so a handle the user holds still removes its hook.
    """
    rebuilt = cls.__new__(cls)
    state = dict(module.__dict__)
    for key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        if key in state:
            state[key] = type(state[key])(state[key])
    rebuilt.__dict__.update(state)
    return rebuilt


def _to_syncnorm(module: nn.Module, cls: type, process_group: collectives.SyncGroup) -> SyncBatchNorm:
    converted = rebuild_as(module, cls)
    converted.process_group = process_group
    converted.check = module.__dict__.get("check")
    return converted


def _to_plain(layer: nn.Module, cls: type) -> nn.Module:
    plain = rebuild_as(layer, cls)
    for name in _SYNCNORM_ATTRIBUTES:
        plain.__dict__.pop(name, None)
    if issubclass(cls, nn.SyncBatchNorm):
        plain.process_group = None
    return plain


def convert_sync_batchnorm(
    module: nn.Module,
    process_group: collectives.SyncGroup = None,
    *,
    exclude: Iterable[type] = (),
) -> nn.Module:
    """Replace the model's BatchNorm layers with synchronised ones that compute the same thing.

    Exact ``nn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm`` become
    :class:`SyncBatchNorm`; timm's ``BatchNormAct2d``/``SyncBatchNormAct`` become
    :class:`SyncBatchNormAct2d` (same ``act`` and ``drop``); a subclass that does not
    override ``forward`` is converted like its base; classes registered with
    :func:`register_conversion` follow their rule. Any other BatchNorm subclass raises a
    ``TypeError`` before anything changes, and so does an uninitialised lazy BatchNorm.
    Classes in ``exclude`` (and their subclasses) are left as they are.

    The new layers hold the very same parameter, buffer and child objects as the
    originals (values, ``requires_grad``, device, dtype, hooks and training flag carry
    over), and each is named after its module path, which is what error messages and the
    consistency guard report. syncnorm's own layers are left alone, except that
    :class:`SyncBatchNorm` layers get the new ``process_group``. Given a bare BatchNorm,
    returns the new layer; otherwise converts in place and returns ``module``.
    """
    if collectives._is_device_mesh(process_group):
        collectives.resolve_group(process_group)  # a 2-D mesh fails here, before anything changes
    excluded = tuple(exclude)
    # Refuse before changing anything, so that a refused model is left as it was.
    for path, child in module.named_modules():
        _check_convertible(child, path, excluded)
    return _convert(module, process_group, "", excluded)


def _check_convertible(module: nn.Module, path: str, excluded: tuple) -> None:
    if isinstance(module, excluded) or type(module).__module__.startswith("syncnorm."):
        return
    where = f"'{path}'" if path else "the model itself"
    if isinstance(module, LazyModuleMixin) and isinstance(module, _BatchNorm) and module.has_uninitialized_params():
        raise ValueError(
            f"syncnorm.convert_sync_batchnorm: {where} is an uninitialised {type(module).__name__}: its channel "
            "count is not known until its first forward, and left as it is it would become a plain, "
            "unsynchronised BatchNorm then. Run one forward pass (a dry run on a sample batch) before converting."
        )
    if not isinstance(module, _BatchNorm) or type(module) in CONVERTIBLE_BATCHNORMS:
        return
    if _conversion_for(type(module)) is not None or type(module).forward in _BASE_FORWARDS:
        return
    cls = type(module)
    raise TypeError(
        f"syncnorm.convert_sync_batchnorm: {where} is a {cls.__module__}.{cls.__qualname__}, a BatchNorm subclass "
        "with its own forward(); a plain synchronised BatchNorm in its place could compute something else, so "
        "it is not converted. Register how to convert it with syncnorm.register_conversion(cls, to_sync, "
        "to_plain), or leave it out explicitly with convert_sync_batchnorm(model, exclude=[cls]) (it then stays "
        "unsynchronised). Nothing in the model was changed."
    )


def _convert(module: nn.Module, process_group: collectives.SyncGroup, path: str, excluded: tuple) -> nn.Module:
    if isinstance(module, SyncBatchNorm):
        module.process_group = process_group
        if path:
            module.layer_name = path
        return module
    if isinstance(module, excluded) or type(module).__module__.startswith("syncnorm."):
        return module
    if isinstance(module, _BatchNorm):
        rule = _conversion_for(type(module))
        if rule is None:
            converted = _to_syncnorm(module, SyncBatchNorm, process_group)
        elif isinstance(rule.to_sync, type):
            converted = _to_syncnorm(module, rule.to_sync, process_group)
        else:
            converted = rule.to_sync(module, process_group)
        converted.layer_name = path or type(module).__name__
        # torch's SyncBatchNorm reverts to nn.BatchNorm2d (it does not know its input rank).
        converted._original_cls = None if type(module) is nn.SyncBatchNorm else type(module)
        return converted
    for name, child in module.named_children():
        new_child = _convert(child, process_group, f"{path}.{name}" if path else name, excluded)
        if new_child is not child:
            module.add_module(name, new_child)
    return module


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Turn syncnorm (and torch's) SyncBatchNorm layers back into plain BatchNorm.

    Layers made by :func:`convert_sync_batchnorm` get their original class back (through
    the rule of a class registered with :func:`register_conversion`); others (built
    directly, or converted from ``torch.nn.SyncBatchNorm``) become ``nn.BatchNorm2d``,
    whose math is the same for any input rank except for its input-dimension check, and
    :class:`SyncBatchNormAct2d` built directly becomes timm's ``BatchNormAct2d``. State is
    moved as in the conversion.

    It also undoes :func:`syncnorm.fuse_inplace_abn`: each ``InPlaceABN`` that fusion made
    becomes plain BatchNorm again (as above), and the ``nn.Identity`` after it the very
    activation module the pair had. An ``InPlaceABN`` built directly stays as it is.
    """
    if isinstance(module, SyncBatchNorm) or type(module) is nn.SyncBatchNorm:
        return _revert_layer(module)
    if isinstance(module, nn.SyncBatchNorm) and _conversion_for(type(module)) is not None:
        return _revert_layer(module)  # timm's SyncBatchNormAct
    names = list(module._modules)
    for index, name in enumerate(names):
        child = module._modules[name]
        if child is None:
            continue
        pair = child.__dict__.get(UNFUSED_PAIR)
        following = module._modules[names[index + 1]] if index + 1 < len(names) else None
        if pair is not None and isinstance(module, nn.Sequential) and type(following) is nn.Identity:
            module.add_module(name, _unfuse(child, pair[0]))
            module.add_module(names[index + 1], pair[1])
            continue
        new_child = revert_sync_batchnorm(child)
        if new_child is not child:
            module.add_module(name, new_child)
    return module


def _unfuse(fused: nn.Module, norm_cls: type) -> nn.Module:
    """The plain BatchNorm a fused InPlaceABN came from (a synchronised one reverts as above)."""
    plain = rebuild_as(fused, norm_cls)
    for name in _INPLACE_ABN_ATTRIBUTES:
        plain.__dict__.pop(name, None)
    if isinstance(plain, SyncBatchNorm) or type(plain) is nn.SyncBatchNorm:
        return _revert_layer(plain)
    return _to_plain(plain, norm_cls)


def _revert_layer(layer: nn.Module) -> nn.Module:
    original = layer.__dict__.get("_original_cls")
    if original is None and type(layer) is not SyncBatchNorm and type(layer) is not nn.SyncBatchNorm:
        original = type(layer)  # a directly built SyncBatchNormAct2d, or timm's SyncBatchNormAct: by its rule
    rule = None if original is None else _conversion_for(original)
    if rule is None:
        return _to_plain(layer, original or nn.BatchNorm2d)
    if rule.to_plain is None:
        return _to_plain(layer, original)
    if isinstance(rule.to_plain, type):
        return _to_plain(layer, rule.to_plain)
    return rule.to_plain(layer)


from . import model_zoo  # noqa: E402,F401  (registers the lazy rules for timm's layers)
