"""Adaptive frozen layers (AFLKD Eq. 17, Alg. 1): how many shared units to freeze, and freezing them."""
from __future__ import annotations

import math
import re

import torch.nn as nn

__all__ = ["frozen_count", "shared_units", "freeze_first"]

_LAYER = re.compile(r"(?P<kind>conv|bn|relu)(?P<block>\d+)_(?P<index>\d+)|(?P<kind2>pool)(?P<pool>\d+)")


def frozen_count(temperature: float, units: int, t_min: float = 1.0, t_max: float = 10.0) -> int:
    """Eq. 17, ``n = floor(m * (1 - (T - Tmin) / (Tmax - Tmin)) + 0.5)``, clamped to ``[1, m]``.

    The paper says the 0.5 makes n reach its minimum of 1 at ``T = Tmax``, but the
    formula gives 0 there (issue 3, trap 2); we clamp to ``[1, m]`` as the text
    intends.  Higher temperature -> fewer frozen units.
    """
    if units < 1:
        raise ValueError(f"need at least one shared unit, got {units}")
    ratio = (temperature - t_min) / (t_max - t_min)
    n = math.floor(units * (1 - ratio) + 0.5)
    return min(max(n, 1), units)


def shared_units(model: nn.Sequential, blocks: int, unit: str = "conv") -> list[list[str]]:
    """The shared part (first ``blocks`` cloud blocks) as freezable units of layer names.

    ``unit="conv"``: each conv with its BatchNorm and ReLU (a block's pool joins its
    last conv); ``unit="block"``: each whole block.  Layer names follow
    ``models.vgg`` (``conv2_1``, ``bn2_1``, ``relu2_1``, ``pool2``).
    """
    if unit not in ("conv", "block"):
        raise ValueError(f"unit must be 'conv' or 'block', got '{unit}'")
    units: list[list[str]] = []
    for name, _ in model.named_children():
        match = _LAYER.fullmatch(name)
        if match is None:
            break  # the head
        kind, block = match["kind"] or match["kind2"], int(match["block"] or match["pool"])
        if block > blocks:
            break
        starts_unit = kind == "conv" and (unit == "conv" or match["index"] == "1")
        if starts_unit:
            units.append([])
        units[-1].append(name)
    return units


def freeze_first(model: nn.Sequential, units: list[list[str]], n: int) -> list[nn.Module]:
    """Freeze the first ``n`` units, unfreeze the rest; return the frozen modules.

    Frozen modules get ``requires_grad=False`` and are put in eval mode, so their
    BatchNorm statistics do not drift; call this again after every ``model.train()``.
    """
    frozen = []
    for i, names in enumerate(units):
        for name in names:
            module = getattr(model, name)
            for p in module.parameters():
                p.requires_grad_(i >= n)
            if i < n:
                module.eval()
                frozen.append(module)
            else:
                module.train(model.training)
    return frozen
