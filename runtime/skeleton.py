"""Build a model's skeleton without its weights: parameters and buffers land on the meta device.

``with torch.device("meta")`` makes every tensor a constructor creates a meta
tensor, so a constructor that computes with tensors (torchvision's RegNet
derives its widths with ``torch`` ops and ``.item()``) fails with "Cannot copy
out of meta tensor".  Here, as in HF accelerate's ``init_empty_weights``, the
constructor runs on the CPU and only what it registers as a parameter or a
buffer is moved to meta, one tensor at a time, so no whole model is ever held.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

__all__ = ["empty_weights"]


@contextmanager
def empty_weights():
    """Within the block, every parameter and buffer a module registers is moved to the meta device."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter_on_meta(module, name, param):
        register_parameter(module, name, param)
        if param is not None and param.device.type != "meta":
            kind = type(module._parameters[name])
            module._parameters[name] = kind(module._parameters[name].to("meta"), requires_grad=param.requires_grad)

    def buffer_on_meta(module, name, tensor, persistent=True):
        register_buffer(module, name, tensor, persistent)
        if tensor is not None and tensor.device.type != "meta":
            module._buffers[name] = module._buffers[name].to("meta")

    nn.Module.register_parameter, nn.Module.register_buffer = parameter_on_meta, buffer_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


def is_empty(model: nn.Module) -> bool:
    """Whether every parameter and buffer of ``model`` is on the meta device (holds no memory)."""
    return all(t.device.type == "meta" for t in (*model.parameters(), *model.buffers()))



