"""--wire float16 never sends inf: rows beyond float16's range keep their softmax (checked with torch directly)."""
from __future__ import annotations

import torch

from kd.wire import parse_wire


def test_huge_logits_keep_their_softmax_and_normal_rows_are_a_plain_cast():
    wire = parse_wire("float16")
    logits = torch.tensor([[70000.0, 66000.0, 0.0], [3.25, -1.5, 0.125], [-1e6, -1e6 + 2.0, -1e6 + 1.0]])
    plain = logits.half().float()
    assert not torch.isfinite(plain[0]).all()  # what a plain cast sends: inf (softmax NaN)
    got = wire.decode(wire.encode(logits), 3, 3)
    assert torch.isfinite(got).all()
    assert torch.equal(got[1], plain[1])  # an ordinary row: exactly the cast, as before
    for t in (1.0, 4.0):
        want = torch.softmax(logits.double() / t, dim=1)
        assert torch.allclose(torch.softmax(got.double() / t, dim=1), want, atol=1e-3)
