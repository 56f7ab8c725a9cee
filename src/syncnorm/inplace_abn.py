"""In-Place Activated BatchNorm (Rota Bulò et al., CVPR 2018), synchronised like SyncBatchNorm.

BatchNorm followed by an invertible activation, that keeps for backward only its *output*
(plus O(C) statistics), never its input: the backward recovers the normalised values from
the output. A BatchNorm + activation pair keeps both the BatchNorm input and the activation
output, so this halves what the pair saves. In plain PyTorch (CPU and CUDA): eager calls
run an autograd Function, and ``torch.compile(fullgraph=True)`` records the same bodies as
``torch.library`` custom ops (``syncnorm::inplace_abn_forward`` / ``_backward``).

Forward (statistics exactly as :func:`syncnorm.functional.sync_batch_norm`: one float64
all_reduce of ``[n, n mean, n (var + mean^2)]``, none in eval or outside torch.distributed):

    z = gamma' (x - mean) / sqrt(var + eps) + beta,   y = act(z)

Backward, from y alone:

    z = act^-1(y)      leaky_relu: y / slope where y < 0;  elu: log1p(y / alpha) where y < 0
    dz = dy * act'(z)  in terms of y: slope, resp. y + alpha, where y <= 0; 1 elsewhere
    x_hat = (z - beta) / gamma'
    reduce: [sum dz, sum dz * x_hat]  (2C values and the layer fingerprint, one all_reduce)
    dx = gamma' / sqrt(var + eps) * (dz - sum dz / n - x_hat * sum(dz x_hat) / n)
    d gamma = sum_local dz * x_hat,  d beta = sum_local dz

The tiny-gamma rule: gamma' is gamma with its magnitude floored at ``eps`` and its sign kept
(+eps for 0). Wherever |gamma| >= eps (every trained BatchNorm checkpoint in practice) the
layer is exactly BatchNorm + activation, negative gammas included, so checkpoints move
between the two unchanged; below it the output differs from BatchNorm's by at most
eps * |x_hat|, and x_hat stays recoverable. The gradient reaches gamma straight through the
floor (it is the gradient with respect to gamma'), so a zero-initialised gamma trains away
from zero as under BatchNorm. inplace_abn's ``|gamma| + eps`` instead changes every channel
by eps and turns negative gammas positive, so BatchNorm checkpoints would compute otherwise.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from . import collectives
from .functional import inplace_abn_with
from .modules import SyncLayer
from .ops import ACTIVATIONS, check_activation

__all__ = ["ACTIVATIONS", "InPlaceABN", "InPlaceABNSync"]


class InPlaceABN(SyncLayer, _BatchNorm):
    r"""Synchronised BatchNorm + invertible activation that keeps only its output for backward.

    A replacement for ``nn.BatchNorm2d`` + ``nn.LeakyReLU`` (or ELU, or nothing) that saves
    about half the activation memory of the pair: the backward recovers the normalised values
    from the output instead of keeping the BatchNorm input (see the module docstring for the
    math and the tiny-gamma rule). Statistics as :class:`syncnorm.SyncBatchNorm`: global over
    ``process_group`` in training, running statistics in eval (no communication), exactly
    local outside torch.distributed; same running-statistics semantics and ``state_dict`` keys as
    ``nn.BatchNorm2d``. Any input rank >= 2. ``convert_sync_batchnorm`` leaves it alone.

    Differences from BatchNorm + activation: ``"relu"`` is refused (not invertible); ``inplace``
    writes the output over the input (see :func:`syncnorm.functional.writes_in_place`), off by default because a
    model that reads the input again (a pre-activation residual) would silently change; the
    gradients are recovered from the output, so they lose precision where ELU saturates and for
    channels whose |gamma| is tiny next to |beta| (in float16/bfloat16 above all).
    ``InPlaceABNSync`` is the same class, for ``inplace_abn`` users switching by import.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        activation: str = "leaky_relu",
        activation_param: float = 0.01,
        process_group: collectives.SyncGroup = None,
        *,
        inplace: bool = False,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        check_activation(activation, activation_param, "InPlaceABN")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.activation, self.activation_param, self.inplace = activation, activation_param, inplace
        self._init_sync(process_group)

    def _check_input_dim(self, input: Tensor) -> None:
        pass  # validate_input raises with the layer's name

    def forward(self, input: Tensor) -> Tensor:
        if self.training:
            running, counted, momentum = self._begin_step(True)
        else:
            running = (self.running_mean, self.running_var) if self._tracking() else None
            counted, momentum = False, 0.0
        # As nn.BatchNorm: the channel count is checked where parameters or buffers have one.
        channels = self.num_features if (self._tracking() or self.weight is not None) else None
        try:
            return inplace_abn_with(
                input, running, channels, self.weight, self.bias, self.training, momentum, self.eps,
                self.activation, self.activation_param, self.process_group, self.inplace, self.layer_name,
                self.check,
            )  # fmt: skip
        except BaseException:
            self._undo_step(counted)
            raise

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", activation={self.activation!r}, activation_param={self.activation_param}, inplace={self.inplace}"
        )


InPlaceABNSync = InPlaceABN
