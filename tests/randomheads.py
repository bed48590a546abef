"""Seeded random nets ending in a flatten head, for property tests of the split FC head (same on every rank)."""
from __future__ import annotations

import random

import torch
import torch.nn as nn

from models import randomize_batchnorm
from runtime.geometry import split_rows

FLATTENS = ("module", "torch.flatten", "method", "view", "reshape")


class HeadNet(nn.Module):
    """conv stack -> one of five flatten spellings -> [eval dropout] -> Linear -> ReLU -> Linear."""

    def __init__(self, features: nn.Sequential, flatten: str, dropout: str, in_features: int, hidden: int,
                 classes: int) -> None:
        super().__init__()
        self.features = features
        self.flatten_kind = flatten
        self.flatten = nn.Flatten()
        self.dropout_kind = dropout
        self.drop = nn.Dropout(0.5)
        self.fc1 = nn.Linear(in_features, hidden, bias=hidden % 2 == 1)  # with and without bias
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        x = self.features(x)
        if self.flatten_kind == "module":
            x = self.flatten(x)
        elif self.flatten_kind == "torch.flatten":
            x = torch.flatten(x, 1)
        elif self.flatten_kind == "method":
            x = x.flatten(1)
        elif self.flatten_kind == "view":
            x = x.view(x.size(0), -1)
        else:
            x = x.reshape(x.size(0), -1)
        if self.dropout_kind == "module":
            x = self.drop(x)
        elif self.dropout_kind == "function":
            x = nn.functional.dropout(x, 0.5, training=False)
        return self.fc2(torch.relu(self.fc1(x)))


def random_head(seed: int, ranks: int):
    """(model, (C, H, W), batch, weights): random channels, heights, widths, out features, flatten and weights."""
    rng = random.Random(seed)
    torch.manual_seed(rng.randrange(2**31))
    channels = rng.randint(1, 3)
    height = rng.randint(3 * ranks, 29)
    width = rng.randint(1, 9)
    layers, c, h, w = [], channels, height, width
    for _ in range(rng.randint(1, 3)):
        out = rng.randint(1, 6)
        stride = rng.choice([1, 1, 2]) if h >= 4 else 1
        layers += [nn.Conv2d(c, out, 3, stride=stride, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
        c, h, w = out, (h - 1) // stride + 1, (w - 1) // stride + 1
    if h >= 4 and w >= 2 and rng.random() < 0.5:
        layers.append(nn.MaxPool2d(2))
    features = nn.Sequential(*layers)
    with torch.no_grad():
        in_features = features.eval()(torch.zeros(1, channels, height, width)).numel()
    model = HeadNet(features, rng.choice(FLATTENS), rng.choice(["none", "module", "function"]), in_features,
                    rng.randint(1, 9), rng.randint(2, 5))
    randomize_batchnorm(model, torch.Generator().manual_seed(seed))
    weights = [rng.choice([1.0, 1.0, 0.5, 2.0, 3.0]) for _ in range(ranks)]
    if any(len(r) == 0 for r in split_rows(height, weights)):  # every rank needs input rows: draw again
        return random_head(seed + 100_003, ranks)
    return model.eval(), (channels, height, width), rng.randint(1, 3), weights
