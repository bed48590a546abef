"""Every net the benchmark can build by name: the paper's nets and torchvision's classifiers (``tv:NAME``).

Torchvision models come as torchvision defines them (random weights; GoogLeNet
without its training-only auxiliary heads), so the runtime is shown on real
CNNs with no hand-rewriting.
"""
from __future__ import annotations

import torch.nn as nn

from runtime.errors import UsageError

from .vgg import NET_NAMES, build_net

__all__ = ["build_model", "check_model_name", "TORCHVISION_PREFIX"]

TORCHVISION_PREFIX = "tv:"
_EXTRA = {"googlenet": dict(aux_logits=False, init_weights=True), "inception_v3": dict(aux_logits=False,
                                                                                        init_weights=True)}


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_model_name(name: str) -> str:
    """``name`` if the zoo knows it, else a :class:`UsageError` that lists what it knows."""
    if name in NET_NAMES:
        return name
    if name.startswith(TORCHVISION_PREFIX):
        known = _torchvision_names()
        if name[len(TORCHVISION_PREFIX):] in known:
            return name
        raise UsageError(f"torchvision has no classification model '{name[len(TORCHVISION_PREFIX):]}'; "
                         f"choose one of {', '.join(known[:12])}, ... (tv:NAME)")
    raise UsageError(f"unknown net '{name}'; choose one of {', '.join(NET_NAMES)} or tv:NAME (a torchvision "
                     "classifier, e.g. tv:resnet18)")


def build_model(name: str, in_channels: int = 3, size: int = 32, classes: int = 10) -> nn.Module:
    """A net by name, untrained: ``edge1``..``edge3``, ``cloud`` or ``tv:NAME``."""
    check_model_name(name)
    if not name.startswith(TORCHVISION_PREFIX):
        return build_net(name, in_channels, size, classes)
    import torchvision

    if in_channels != 3:
        raise UsageError(f"torchvision models take 3 input channels, got --in-channels {in_channels}")
    tv_name = name[len(TORCHVISION_PREFIX):]
    return torchvision.models.get_model(tv_name, weights=None, num_classes=classes, **_EXTRA.get(tv_name, {}))
