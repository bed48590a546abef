"""Seeded random CNN graphs for property tests: residual adds, concats, chunks, shuffles, SE, pools.

The same seed gives the same graph and weights on every rank.  Shapes are found
by running each op on a sample tensor as the graph is drawn, so every graph
runs; the graph is an ordinary ``nn.Module`` whose ``forward`` follows a list
of steps (torch.fx unrolls it).
"""
from __future__ import annotations

import random

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import randomize_batchnorm


class RandomGraph(nn.Module):
    """``steps``: (kind, input indices, module key or None, extra) applied in order; value 0 is the input."""

    def __init__(self, steps, modules: dict, head: str) -> None:
        super().__init__()
        self.steps = steps
        self.layers = nn.ModuleDict(modules)
        self.head = head

    def forward(self, x):
        values = [x]
        for kind, inputs, key, extra in self.steps:
            a = values[inputs[0]]
            if kind == "module":
                y = self.layers[key](a)
            elif kind == "add":
                y = a + values[inputs[1]]
            elif kind == "mul":
                y = a * values[inputs[1]]
            elif kind == "cat":
                y = torch.cat([values[i] for i in inputs], dim=1)
            elif kind == "chunk":
                y = a.chunk(2, dim=1)[extra]
            elif kind == "shuffle":
                n, c, h, w = a.size()
                y = a.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
            elif kind == "se":
                s = F.adaptive_avg_pool2d(a, 1)
                s = torch.sigmoid(self.layers[key](s))
                y = a * s
            elif kind == "relu":
                y = F.relu(a)
            else:
                raise AssertionError(kind)
            values.append(y)
        out = values[-1]
        if self.head == "pool":
            return self.layers["fc"](torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))
        if self.head == "flatten":
            return self.layers["fc"](torch.flatten(out, 1))
        return out


def _conv(rng: random.Random, c: int, h: int, w: int):
    for _ in range(20):
        k = rng.choice([1, 1, 3, 3, 5, 7])
        d = rng.choice([1, 1, 2])
        s = rng.choice([1, 1, 2])
        p = rng.randint(0, 3)
        groups = rng.choice([1, 1, c]) if c > 1 else 1
        out = c * rng.randint(1, 2) if groups == c else rng.randint(1, 6)
        span = d * (k - 1) + 1
        if h + 2 * p >= span and w + 2 * p >= span:
            return nn.Conv2d(c, out, k, stride=s, padding=p, dilation=d, groups=groups, bias=rng.random() < 0.7)
    return nn.Conv2d(c, c, 1)


def _pool(rng: random.Random, h: int, w: int):
    for _ in range(20):
        k = rng.choice([2, 3])
        s = rng.choice([1, 2])
        p = rng.randint(0, k // 2)
        ceil = rng.random() < 0.4
        if rng.random() < 0.6:
            d = rng.choice([1, 2])
            if h + 2 * p >= d * (k - 1) + 1 and w + 2 * p >= d * (k - 1) + 1:
                return nn.MaxPool2d(k, s, p, dilation=d, ceil_mode=ceil)
        elif h + 2 * p >= k and w + 2 * p >= k:
            return nn.AvgPool2d(k, s, p, ceil_mode=False)
    return nn.Identity()


def random_graph(seed: int, ranks: int):
    """(model, (C, H, W), batch, weights): a random DAG the split must reproduce."""
    rng = random.Random(seed)
    torch.manual_seed(rng.randrange(2**31))
    channels = rng.randint(1, 4)
    height = rng.randint(max(ranks, 6), 40)
    width = rng.randint(3, 10)
    sample = [torch.zeros(1, channels, height, width)]
    steps, modules = [], {}

    def add_module(module, source):
        key = f"m{len(modules)}"
        modules[key] = module.eval()
        with torch.no_grad():
            y = module(sample[source])
        steps.append(("module", (source,), key, None))
        sample.append(y)

    for _ in range(rng.randint(2, 9)):
        i = rng.randrange(len(sample)) if rng.random() < 0.4 else len(sample) - 1
        x = sample[i]
        _, c, h, w = x.shape
        if h < 1:
            break
        choice = rng.choice(["conv", "conv", "conv", "pool", "bnrelu", "add", "cat", "chunk", "shuffle", "se",
                             "relu"])
        same = [j for j, v in enumerate(sample) if j != i and v.shape == x.shape]
        alike = [j for j, v in enumerate(sample) if v.shape[2:] == x.shape[2:]]
        if choice == "conv":
            add_module(_conv(rng, c, h, w), i)
        elif choice == "pool":
            add_module(_pool(rng, h, w), i)
        elif choice == "bnrelu":
            add_module(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=rng.random() < 0.5)), i)
        elif choice == "add" and same:
            j = rng.choice(same)
            steps.append((rng.choice(["add", "mul"]), (i, j), None, None))
            sample.append(x + sample[j])
        elif choice == "cat" and len(alike) > 1:
            picks = rng.sample(alike, min(len(alike), rng.randint(2, 3)))
            steps.append(("cat", tuple(picks), None, None))
            sample.append(torch.cat([sample[j] for j in picks], dim=1))
        elif choice == "chunk" and c % 2 == 0:
            part = rng.randint(0, 1)
            steps.append(("chunk", (i,), None, part))
            sample.append(x.chunk(2, dim=1)[part])
        elif choice == "shuffle" and c % 2 == 0:
            steps.append(("shuffle", (i,), None, None))
            sample.append(x.clone())
        elif choice == "se":
            key = f"m{len(modules)}"
            modules[key] = nn.Conv2d(c, c, 1)
            steps.append(("se", (i,), key, None))
            sample.append(x.clone())
        elif choice == "relu":
            steps.append(("relu", (i,), None, None))
            sample.append(x.clone())
    if not steps:
        add_module(nn.Conv2d(channels, 2, 3, padding=1), 0)
    _, c, h, w = sample[-1].shape
    head = rng.choice(["none", "pool", "flatten"]) if h >= 1 else "none"
    if head == "pool":
        modules["fc"] = nn.Linear(c, rng.randint(2, 5))
    elif head == "flatten":
        modules["fc"] = nn.Linear(c * h * w, rng.randint(2, 5))
    model = RandomGraph(steps, modules, head)
    randomize_batchnorm(model, torch.Generator().manual_seed(seed))
    from runtime.geometry import split_rows

    while True:  # every rank must own rows of the input
        weights = [rng.choice([1.0, 1.0, 0.5, 2.0, 3.0]) for _ in range(ranks)]
        if all(len(r) for r in split_rows(height, weights)):
            break
    return model.eval(), (channels, height, width), rng.randint(1, 3), weights
