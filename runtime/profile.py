"""Per-layer cost of a model on the board that runs this, for the stage partitioner.

Each layer of :func:`runtime.stages.split_layers` runs as its own stage would
-- the split executor on a one-rank communicator, the whole map -- repeated; the median
is its cost.  The head is timed the same way.  A profile is plain JSON so a
board can write it and the planning host read it.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from . import transport

from .errors import UsageError
from .graph import trace_model
from .pipeline import head_module, stage_module
from .plan import plan_split
from .split import SplitExecutor
from .stages import Layers

__all__ = ["LayerProfile", "profile_layers", "read_profile", "write_profile"]

CL = torch.channels_last


@dataclass(frozen=True)
class LayerProfile:
    """Seconds per layer (median, whole map, at ``batch``) and bytes of each layer's output."""

    net: str
    size: int
    batch: int
    threads: int
    host: str
    labels: tuple[str, ...]
    seconds: tuple[float, ...]
    out_bytes: tuple[int, ...]
    head_seconds: float

    @property
    def total(self) -> float:
        return sum(self.seconds) + self.head_seconds


def profile_layers(model: nn.Module, layers: Layers, net: str = "", batch: int = 1, repeat: int = 5,
                   warmup: int = 1, progress: Optional[Callable[[int], None]] = None) -> LayerProfile:
    """Time every layer of ``layers`` on this process's threads; ``progress(k)`` after layer ``k``."""
    channels, height, width = layers.graph.in_shape
    x = torch.randn(batch, channels, height, width).contiguous(memory_format=CL)
    seconds, out_bytes = [], []
    with torch.no_grad():
        for k in range(len(layers)):
            # the layer as a stage runs it: the split executor on a one-rank communicator (same code path)
            module = stage_module(model, layers, k, k + 1).eval()
            plan = plan_split(trace_model(module, layers.cut_shape(k)), [1.0])
            executor = SplitExecutor(plan, module, transport.COMM_SELF, head=False)
            out = plan.graph.nodes[-1].inputs[0]
            times = []
            for i in range(warmup + repeat):
                start = time.perf_counter()
                y = executor.forward_local(x)[out]
                if i >= warmup:
                    times.append(time.perf_counter() - start)
            seconds.append(statistics.median(times))
            out_bytes.append(y.numel() * y.element_size() // batch)
            x = y.contiguous(memory_format=CL)
            if progress is not None:
                progress(k)
        head = head_module(model, layers).eval()
        times = []
        for i in range(warmup + repeat):
            start = time.perf_counter()
            head(x)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return LayerProfile(net, height, batch, torch.get_num_threads(), platform.node(),
                        tuple(layer.label for layer in layers.layers), tuple(seconds), tuple(out_bytes),
                        statistics.median(times))


def write_profile(profile: LayerProfile, path: str) -> None:
    with open(path, "w") as f:
        json.dump(asdict(profile), f, indent=1)
        f.write("\n")


def read_profile(path: str, layers: Optional[Layers] = None) -> LayerProfile:
    """Read a profile; with ``layers``, refuse one made for another net or size (its layers differ)."""
    try:
        with open(path) as f:
            data = json.load(f)
        profile = LayerProfile(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
    except FileNotFoundError:
        raise UsageError(f"profile {path} does not exist; make it with 'aflkd profile --json {path}'") from None
    except (ValueError, TypeError) as err:
        raise UsageError(f"profile {path} is not a profile written by 'aflkd profile': {err}") from None
    if layers is not None:
        labels = tuple(layer.label for layer in layers.layers)
        if labels != profile.labels or layers.graph.in_shape[1] != profile.size:
            raise UsageError(f"profile {path} was made for {profile.net or 'another net'} at {profile.size}x"
                             f"{profile.size} ({len(profile.labels)} layers), not this net at "
                             f"{layers.graph.in_shape[1]} ({len(labels)} layers); rerun 'aflkd profile'")
    return profile
