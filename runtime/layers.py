"""What one torch layer means to height-split execution: a sliding window, element-wise, or refused.

The only place that reads torch module attributes; the graph and the planner
see plain :class:`WindowSpec` values.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UsageError
from .geometry import Window

__all__ = [
    "WindowSpec",
    "window_of_module",
    "window_of_function",
    "ELEMENTWISE_MODULES",
    "ELEMENTWISE_FUNCTIONS",
    "is_elementwise_function",
    "ELEMENTWISE_METHODS",
    "mutates_first_input",
]

#: Modules that act on every element (or every pixel) on its own, in eval mode: no exchange.
ELEMENTWISE_MODULES: tuple[type, ...] = (
    nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.PReLU,
    nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.Identity,
)


#: Functions that act element by element (broadcasting the other operands).
ELEMENTWISE_FUNCTIONS: frozenset = frozenset((
    operator.add, operator.mul, operator.sub, operator.truediv, operator.iadd, operator.imul, operator.neg,
    torch.add, torch.mul, torch.sub, torch.div, torch.relu, torch.sigmoid, torch.tanh, torch.clamp, torch.neg,
    F.relu, F.relu6, F.hardswish, F.hardsigmoid, F.hardtanh, F.silu, F.gelu, F.leaky_relu, F.elu, F.sigmoid,
    F.dropout, F.mish,
))


def is_elementwise_function(target) -> bool:
    """``target`` acts element by element: one of :data:`ELEMENTWISE_FUNCTIONS`, or torchvision's
    ``stochastic_depth`` (identity in eval mode), recognised by name so that importing the runtime
    does not import torchvision (seconds on a Pi)."""
    if target in ELEMENTWISE_FUNCTIONS:
        return True
    return (getattr(target, "__name__", None) == "stochastic_depth"
            and getattr(target, "__module__", "").startswith("torchvision.ops"))


#: Tensor methods that act element by element.
ELEMENTWISE_METHODS: frozenset = frozenset((
    "add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_", "relu", "relu_", "sigmoid", "sigmoid_",
    "tanh", "tanh_", "clamp", "clamp_", "clamp_min", "clamp_min_", "neg", "contiguous", "float",
    "expand_as",  # y.expand_as(x): a per-channel y broadcast to x's own (local) shape (timm's ECA gate)
))


@dataclass(frozen=True)
class WindowSpec:
    """A sliding-window layer as the planner sees it.

    ``kind`` is ``"conv"``, ``"maxpool"`` or ``"avgpool"``; ``height``/``width``
    the window geometry along each axis; ``fill`` the value of padding rows
    (0, or -inf before a max pool); ``ceil_mode`` pools keep a last partial window.
    """

    kind: str
    height: Window
    width: Window
    ceil_mode: bool = False
    out_channels: Optional[int] = None
    in_channels: Optional[int] = None
    count_include_pad: bool = True
    divisor_override: Optional[int] = None

    @property
    def fill(self) -> float:
        return float("-inf") if self.kind == "maxpool" else 0.0


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


def _refuse(name: str, label: str, why: str) -> UsageError:
    return UsageError(f"node '{name}' ({label}) is not supported by height-split execution: {why}")


def _conv(name: str, module: nn.Conv2d) -> WindowSpec:
    (kh, kw), (sh, sw), (dh, dw) = _pair(module.kernel_size), _pair(module.stride), _pair(module.dilation)
    padding = module.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:  # 'same' (stride 1): torch pads d*(k-1) in all, the odd row at the bottom
            totals = (dh * (kh - 1), dw * (kw - 1))
            if any(t % 2 for t in totals):
                raise _refuse(name, "Conv2d", "padding='same' with an even kernel pads unevenly; give integer padding")
            padding = (totals[0] // 2, totals[1] // 2)
    if module.padding_mode != "zeros":
        raise _refuse(name, "Conv2d", f"padding_mode='{module.padding_mode}'; only 'zeros' is split exactly")
    (ph, pw) = _pair(padding)
    return WindowSpec("conv", Window(kh, sh, ph, dh), Window(kw, sw, pw, dw),
                      out_channels=module.out_channels, in_channels=module.in_channels)


def _pool(name: str, kind: str, kernel, stride, padding, dilation, ceil_mode, count_include_pad=True,
          return_indices=False, divisor_override=None) -> WindowSpec:
    label = "MaxPool2d" if kind == "maxpool" else "AvgPool2d"
    if return_indices:
        raise _refuse(name, label, "return_indices=True")
    (kh, kw) = _pair(kernel)
    (sh, sw) = _pair(stride if stride not in (None, []) else kernel)
    (ph, pw), (dh, dw) = _pair(padding), _pair(dilation)
    if kind == "avgpool" and not count_include_pad and ph > 0:
        raise _refuse(name, label, "count_include_pad=False with height padding; use count_include_pad=True")
    if kind == "avgpool" and divisor_override is not None and ph > 0:
        raise _refuse(name, label, "divisor_override with height padding")
    return WindowSpec(kind, Window(kh, sh, ph, dh), Window(kw, sw, pw, dw), ceil_mode=bool(ceil_mode),
                      count_include_pad=bool(count_include_pad), divisor_override=divisor_override)


def window_of_module(name: str, module: nn.Module) -> Optional[WindowSpec]:
    """The window of a conv or pool module; None for any other module."""
    if isinstance(module, nn.Conv2d):
        return _conv(name, module)
    if isinstance(module, nn.MaxPool2d):
        return _pool(name, "maxpool", module.kernel_size, module.stride, module.padding, module.dilation,
                     module.ceil_mode, return_indices=module.return_indices)
    if isinstance(module, nn.AvgPool2d):
        return _pool(name, "avgpool", module.kernel_size, module.stride, module.padding, 1, module.ceil_mode,
                     module.count_include_pad, divisor_override=module.divisor_override)
    return None


#: torch's own parameter order of the functional pools (``F.avg_pool2d`` is a builtin without a Python
#: signature and ``F.max_pool2d`` a dispatch wrapper whose signature hides it, so neither can be inspected).
_POOL_PARAMETERS = {
    "max_pool2d": (("kernel_size", None), ("stride", None), ("padding", 0), ("dilation", 1), ("ceil_mode", False),
                   ("return_indices", False)),
    "avg_pool2d": (("kernel_size", None), ("stride", None), ("padding", 0), ("ceil_mode", False),
                   ("count_include_pad", True), ("divisor_override", None)),
}


def _pool_function_name(function) -> Optional[str]:
    """``max_pool2d`` or ``avg_pool2d`` for the functional pools (and their builtins); None otherwise."""
    if function in (F.max_pool2d, getattr(F, "_max_pool2d", None), torch.max_pool2d):
        return "max_pool2d"
    if function in (F.avg_pool2d, getattr(torch._C._nn, "avg_pool2d", None), torch.avg_pool2d
                    if hasattr(torch, "avg_pool2d") else None):
        return "avg_pool2d"
    return None


def _bind_pool(name: str, kind: str, args: tuple, kwargs: dict) -> dict:
    parameters = _POOL_PARAMETERS[kind]
    if len(args) > 1 + len(parameters):
        raise _refuse(name, kind, f"{len(args)} positional arguments")
    bound = {key: default for key, default in parameters}
    for (key, _), value in zip(parameters, args[1:]):
        bound[key] = value
    for key, value in kwargs.items():
        if key == "input":
            continue
        if key not in bound:
            raise _refuse(name, kind, f"unknown argument '{key}'")
        bound[key] = value
    if bound["kernel_size"] is None:
        raise _refuse(name, kind, "no kernel_size")
    return bound


def window_of_function(name: str, function, args: tuple, kwargs: dict) -> Optional[WindowSpec]:
    """The window of ``F.max_pool2d``/``F.avg_pool2d`` called with literal geometry; None otherwise."""
    kind = _pool_function_name(function)
    if kind is None:
        return None
    a = _bind_pool(name, kind, args, kwargs)
    if any(hasattr(v, "op") for v in a.values()):  # an fx Node: geometry computed at run time
        raise _refuse(name, kind, "pool geometry computed at run time; give literal integers")
    if kind == "max_pool2d":
        return _pool(name, "maxpool", a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"],
                     return_indices=a["return_indices"])
    return _pool(name, "avgpool", a["kernel_size"], a["stride"], a["padding"], 1, a["ceil_mode"],
                 a["count_include_pad"], divisor_override=a["divisor_override"])


#: Functions that write their result into their first argument.
INPLACE_FUNCTIONS: frozenset = frozenset((
    operator.iadd, operator.isub, operator.imul, operator.itruediv, torch.relu_, torch.sigmoid_, torch.tanh_,
    torch.clamp_, F.relu_, F.elu_, F.leaky_relu_, F.hardtanh_,
))


def mutates_first_input(fx_node, module=None) -> bool:
    """Whether running ``fx_node`` writes into its first argument, as eager torch does: a module built with
    ``inplace=True``, an in-place function (``+=``, ``F.relu_``) or one called with ``inplace=True``, a
    tensor method ending in ``_`` (``x.add_(y)``)."""
    if fx_node.op == "call_module":
        return getattr(module, "inplace", False) is True
    if fx_node.op == "call_function":
        return fx_node.target in INPLACE_FUNCTIONS or fx_node.kwargs.get("inplace") is True
    if fx_node.op == "call_method":
        name = str(fx_node.target)
        return name.endswith("_") and not name.startswith("_")
    return False
