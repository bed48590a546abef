"""The AFLKD cloud (teacher) net and edge (student) nets 1-3, as ordered lists of layers.

Cloud net: four VGG-like blocks of 3x3 convolutions (padding 1), each
conv -> BatchNorm -> ReLU, MaxPool(2) after each block, with 3x32, 2x48, 5x80 and
5x128 channels; then Flatten, Linear -> 1024, ReLU, Dropout, Linear -> classes.
Edge net k is the first k cloud blocks with the same head shape.  Layer names
are shared (``conv2_1``, ``bn2_1``, ...), so an edge net's shared blocks load
straight from a cloud checkpoint.

A net is an ``nn.Sequential`` of named layers: plain data that the runtime's
planners partition, never a hand-split copy per configuration.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from runtime.errors import UsageError

__all__ = ["CLOUD_BLOCKS", "NET_NAMES", "build_net", "cloud_net", "edge_net", "randomize_batchnorm"]

#: (channels, convolutions) of each cloud block.
CLOUD_BLOCKS: tuple[tuple[int, int], ...] = ((32, 3), (48, 2), (80, 5), (128, 5))
NET_NAMES = ("edge1", "edge2", "edge3", "cloud")


def _blocks(count: int, in_channels: int) -> list[tuple[str, nn.Module]]:
    layers: list[tuple[str, nn.Module]] = []
    channels = in_channels
    for b, (width, convs) in enumerate(CLOUD_BLOCKS[:count], start=1):
        for i in range(1, convs + 1):
            layers += [
                (f"conv{b}_{i}", nn.Conv2d(channels, width, 3, padding=1)),
                (f"bn{b}_{i}", nn.BatchNorm2d(width)),
                (f"relu{b}_{i}", nn.ReLU(inplace=True)),
            ]
            channels = width
        layers.append((f"pool{b}", nn.MaxPool2d(2)))
    return layers


def _net(blocks: int, in_channels: int, size: int, classes: int, dropout: float) -> nn.Sequential:
    if in_channels < 1 or classes < 2:
        raise UsageError(f"need in_channels >= 1 and classes >= 2, got {in_channels} and {classes}")
    side = size >> blocks
    if side < 1:
        raise UsageError(
            f"input size {size} is too small for {blocks} pooling blocks (each halves it); "
            f"use a size of at least {1 << blocks}"
        )
    flat = CLOUD_BLOCKS[blocks - 1][0] * side * side
    layers = _blocks(blocks, in_channels) + [
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(flat, 1024)),
        ("relu_fc", nn.ReLU(inplace=True)),
        ("dropout", nn.Dropout(dropout)),
        ("fc2", nn.Linear(1024, classes)),
    ]
    return nn.Sequential(OrderedDict(layers))


def cloud_net(in_channels: int = 3, size: int = 32, classes: int = 10, dropout: float = 0.5) -> nn.Sequential:
    """The teacher: all four blocks."""
    return _net(len(CLOUD_BLOCKS), in_channels, size, classes, dropout)


def edge_net(k: int, in_channels: int = 3, size: int = 32, classes: int = 10, dropout: float = 0.5) -> nn.Sequential:
    """Student ``k`` (1, 2 or 3): the first ``k`` cloud blocks and a fresh head."""
    if k not in (1, 2, 3):
        raise UsageError(f"edge net must be 1, 2 or 3, got {k}")
    return _net(k, in_channels, size, classes, dropout)


def build_net(name: str, in_channels: int = 3, size: int = 32, classes: int = 10, dropout: float = 0.5) -> nn.Sequential:
    """``"cloud"`` or ``"edge1"``..``"edge3"``."""
    if name == "cloud":
        return cloud_net(in_channels, size, classes, dropout)
    if name in NET_NAMES:
        return edge_net(int(name[-1]), in_channels, size, classes, dropout)
    raise UsageError(f"unknown net '{name}'; choose one of {', '.join(NET_NAMES)}")


@torch.no_grad()
def randomize_batchnorm(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine terms.

    Fresh BatchNorms are the identity in eval mode (mean 0, var 1), which would
    let a wrong split of them go unnoticed; tests and benchmarks use this.
    """
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
            m.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            m.weight.copy_(1 + 0.2 * torch.randn(n, generator=generator))
            m.bias.copy_(0.1 * torch.randn(n, generator=generator))
    return model
