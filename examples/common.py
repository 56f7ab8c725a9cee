"""Shared pieces of the examples: the scikit-learn digits data set and a small conv net.

Importing this module has no side effects (no data is loaded, no process group is touched).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

__all__ = ["NORM_CHOICES", "DigitsNet", "load_digits"]

NORM_CHOICES = ("sync", "local", "none")


def load_digits(seed: int = 0, held_out_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """Return ``(train, held_out)`` datasets of the 8x8 scikit-learn digits (bundled, no download).

    Images are float32 tensors of shape ``(N, 1, 8, 8)``: pixel values scaled to [0, 1] and then
    standardised with the mean and standard deviation of the *training* split (so no held-out
    information leaks into training). Labels are int64. The split is stratified by class and
    fixed by ``seed``, so every rank of a distributed run builds exactly the same split.
    """
    from sklearn.datasets import load_digits as sklearn_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixels are 0..16
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    train_idx, held_out_idx = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=held_out_fraction,
        random_state=seed,
        stratify=labels.numpy(),
    )
    train_idx = torch.as_tensor(train_idx)
    held_out_idx = torch.as_tensor(held_out_idx)
    mean = images[train_idx].mean()
    std = images[train_idx].std()
    images = (images - mean) / std
    return (
        TensorDataset(images[train_idx].contiguous(), labels[train_idx].contiguous()),
        TensorDataset(images[held_out_idx].contiguous(), labels[held_out_idx].contiguous()),
    )


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm in ("sync", "local"):
        # "sync" is plain BatchNorm here too: the training script converts it with
        # syncnorm.convert_sync_batchnorm once the process group exists.
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORM_CHOICES}, got {norm!r}")


class DigitsNet(nn.Module):
    """A small conv net for 8x8 digits: three conv+norm+ReLU blocks, a max-pool, global average pool, linear.

    ``norm`` picks the normalisation: ``"sync"`` and ``"local"`` both build ``nn.BatchNorm2d``
    (convert ``"sync"`` with :func:`syncnorm.convert_sync_batchnorm`), ``"none"`` uses ``nn.Identity``.
    There is no dropout, so a training run is fully determined by its seed and data order.
    """

    def __init__(self, norm: str = "sync", num_classes: int = 10) -> None:
        super().__init__()
        if norm not in NORM_CHOICES:
            raise ValueError(f"norm must be one of {NORM_CHOICES}, got {norm!r}")
        self.norm = norm
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            _norm_layer(norm, 16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            _norm_layer(norm, 32),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(32, 32, 3, padding=1),
            _norm_layer(norm, 32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))
