"""In-place ops in a split graph compute what eager torch computes.

fx records ``b = relu_(y); a = conv(y)`` as a conv of ``y``, but eager torch's conv reads the written
values: the split sent ``y``'s unwritten halo rows and returned a wrong answer (max error 0.41 at 2 ranks,
no error raised).  Each pattern runs at 2-4 ranks in process and must equal eager torch on the same input.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime.graph import trace_model
from runtime.inprocess import run_ranks
from runtime.plan import plan_split
from runtime.split import SplitExecutor


class InplaceBeforeConv(nn.Module):
    """An in-place ReLU module on a map a later conv reads (the conv must see the ReLU's values)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.r = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.c1(x)
        b = self.r(y)
        a = self.c2(y)
        return a + b


class InplaceAfterConv(nn.Module):
    """The conv reads the map before the in-place write (it must not see it)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 5, padding=2)

    def forward(self, x):
        y = self.c1(x)
        a = self.c2(y)
        b = F.relu(y, inplace=True)
        return a * b


class MethodAndOperator(nn.Module):
    """``y.add_(1)`` and ``+=`` on maps other nodes read, before and after windows."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = (nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1),
                                     nn.Conv2d(4, 4, 3, padding=1))

    def forward(self, x):
        y = self.c1(x)
        z = self.c2(y)
        y.add_(1.0)
        w = self.c3(y)
        z += w
        return torch.max_pool2d(z, 2) + torch.max_pool2d(y, 2)


@pytest.mark.parametrize("model_type", [InplaceBeforeConv, InplaceAfterConv, MethodAndOperator])
@pytest.mark.parametrize("ranks,height", [(2, 16), (3, 17), (4, 24)])
def test_inplace_ops_split_equal_eager_torch(model_type, ranks, height):
    torch.manual_seed(ranks)
    model = model_type().eval()
    x = torch.randn(2, 3, height, 8)
    with torch.no_grad():
        want = model(x.clone())
    plan = plan_split(trace_model(model, (3, height, 8)), [1.0] * ranks)
    out = run_ranks(ranks, lambda comm: SplitExecutor(plan, model, comm)(x if comm.Get_rank() == 0 else None,
                                                                          batch=2))
    assert (out[0] - want).abs().max().item() <= 1e-5
