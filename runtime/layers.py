"""What a layer means to height-split execution: spatial window, element-wise, or unsupported.

This is the only place that reads torch module attributes; the planner sees
plain :class:`LayerSpec` values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.nn as nn

from .errors import UsageError
from .geometry import Window

__all__ = ["LayerSpec", "describe_layer", "split_features", "ELEMENTWISE_TYPES"]

#: Layers that act on every element (or every pixel) on its own: no exchange needed.
ELEMENTWISE_TYPES: tuple[type, ...] = (
    nn.BatchNorm2d,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
)
_SPATIAL_NAMES = "Conv2d, MaxPool2d, AvgPool2d"


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


@dataclass(frozen=True)
class LayerSpec:
    """One layer as the planner sees it.

    ``kind`` is ``"conv"``, ``"maxpool"``, ``"avgpool"`` or ``"elementwise"``;
    ``height``/``width`` are the window geometry along each axis (None for
    element-wise layers); ``out_channels`` is None when channels are unchanged.
    """

    name: str
    kind: str
    height: Optional[Window] = None
    width: Optional[Window] = None
    out_channels: Optional[int] = None
    in_channels: Optional[int] = None

    @property
    def spatial(self) -> bool:
        return self.kind != "elementwise"


def _unsupported(name: str, module: nn.Module, why: str) -> UsageError:
    return UsageError(
        f"layer '{name}' ({type(module).__name__}) is not supported by height-split "
        f"execution: {why}"
    )


def describe_layer(name: str, module: nn.Module) -> LayerSpec:
    """Classify ``module``; raise :class:`UsageError` for what the split cannot run exactly."""
    if isinstance(module, nn.Conv2d):
        if isinstance(module.padding, str):
            raise _unsupported(name, module, f"padding='{module.padding}'; give integer padding")
        if module.padding_mode != "zeros":
            raise _unsupported(
                name, module, f"padding_mode='{module.padding_mode}'; only 'zeros' is split exactly"
            )
        (kh, kw), (sh, sw) = _pair(module.kernel_size), _pair(module.stride)
        (ph, pw), (dh, dw) = _pair(module.padding), _pair(module.dilation)
        return LayerSpec(
            name, "conv", Window(kh, sh, ph, dh), Window(kw, sw, pw, dw),
            out_channels=module.out_channels, in_channels=module.in_channels,
        )
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        if module.ceil_mode:
            raise _unsupported(name, module, "ceil_mode=True; use ceil_mode=False")
        kind = "maxpool" if isinstance(module, nn.MaxPool2d) else "avgpool"
        if kind == "maxpool" and module.return_indices:
            raise _unsupported(name, module, "return_indices=True")
        (kh, kw) = _pair(module.kernel_size)
        (sh, sw) = _pair(module.stride if module.stride is not None else module.kernel_size)
        (ph, pw) = _pair(module.padding)
        (dh, dw) = _pair(getattr(module, "dilation", 1))
        if kind == "avgpool" and not module.count_include_pad and ph > 0:
            raise _unsupported(
                name, module, "count_include_pad=False with height padding; use count_include_pad=True"
            )
        return LayerSpec(name, kind, Window(kh, sh, ph, dh), Window(kw, sw, pw, dw))
    if isinstance(module, nn.BatchNorm2d) and module.running_mean is None:
        raise _unsupported(name, module, "no running statistics (track_running_stats=False): it would "
                           "normalise each slice by its own batch statistics")
    if isinstance(module, ELEMENTWISE_TYPES):
        return LayerSpec(name, "elementwise")
    raise _unsupported(
        name,
        module,
        f"supported are {_SPATIAL_NAMES} and element-wise layers "
        f"({', '.join(t.__name__ for t in ELEMENTWISE_TYPES)}) before a Flatten",
    )


def split_features(model: nn.Sequential) -> tuple[list[tuple[str, nn.Module]], nn.Sequential]:
    """Cut a sequential net at its first ``Flatten``: spatial layers, then the head.

    The spatial part is what ranks split by height; the head (Flatten, Linear, ...)
    runs on rank 0 after the gather.
    """
    if not isinstance(model, nn.Sequential):
        raise UsageError(
            f"expected an nn.Sequential (an ordered list of layers), got {type(model).__name__}"
        )
    features: list[tuple[str, nn.Module]] = []
    items = list(model.named_children())
    for index, (name, module) in enumerate(items):
        if isinstance(module, nn.Flatten):
            return features, nn.Sequential(*(m for _, m in items[index:]))
        features.append((name, module))
    return features, nn.Sequential()
