"""Seeded random layer stacks for property tests: identical on every rank for the same seed."""
from __future__ import annotations

import random

import torch
import torch.nn as nn

from models import randomize_batchnorm
from runtime.errors import UsageError
from runtime.graph import trace_model
from runtime.plan import plan_split


def random_config(seed: int, ranks: int):
    """(model, (C, H, W), batch, weights): a random stack the split must reproduce exactly.

    Kernels 1/3/5/7, strides 1/2, paddings 0-3, dilations 1/2, max/avg pools 2/3
    with strides 1/2, odd heights, uneven weights, batch 1-3.  Configurations
    that fit no input are redrawn (deterministically).
    """
    rng = random.Random(seed)
    while True:
        torch.manual_seed(rng.randrange(2**31))  # same weights on every rank
        channels = rng.randint(1, 3)
        height = rng.randint(ranks, 41) | 1 if rng.random() < 0.7 else rng.randint(ranks, 40)
        width = rng.randint(3, 9)
        layers, c = [], channels
        for _ in range(rng.randint(1, 5)):
            kind = rng.choice(["conv", "conv", "conv", "maxpool", "avgpool"])
            if kind == "conv":
                k = rng.choice([1, 3, 5, 7])
                d = rng.choice([1, 2])
                out = rng.randint(1, 4)
                layers.append(nn.Conv2d(c, out, k, stride=rng.choice([1, 2]), padding=rng.randint(0, 3), dilation=d))
                c = out
                if rng.random() < 0.5:
                    layers.append(nn.BatchNorm2d(c))
                if rng.random() < 0.6:
                    layers.append(nn.ReLU(inplace=rng.random() < 0.5))
            else:
                k = rng.choice([2, 3])
                pad = rng.randint(0, k // 2)
                stride = rng.choice([1, 2])
                if kind == "maxpool":
                    layers.append(nn.MaxPool2d(k, stride, pad, dilation=rng.choice([1, 2]) if pad <= k // 2 else 1))
                else:
                    layers.append(nn.AvgPool2d(k, stride, pad, count_include_pad=True))
        if rng.random() < 0.5:
            layers += [nn.Flatten(), nn.LazyLinear(rng.randint(2, 5))]
        model = nn.Sequential(*layers)
        weights = [rng.choice([1.0, 1.0, 0.5, 2.0, 3.0]) for _ in range(ranks)]
        batch = rng.randint(1, 3)
        try:
            with torch.no_grad():
                model.eval()(torch.zeros(1, channels, height, width))  # materialise LazyLinear
            plan_split(trace_model(model, (channels, height, width)), weights)
        except (UsageError, RuntimeError):
            continue
        randomize_batchnorm(model, torch.Generator().manual_seed(seed))
        return model.eval(), (channels, height, width), batch, weights
