"""How teacher logits travel: one contiguous byte buffer per batch, of a size fixed by (batch, classes).

* ``float32`` -- the logits as they are (bit-exact: streamed training equals in-process training).
* ``float16`` -- half the bytes; logits of a trained net are O(10), where float16
  keeps about 3 significant digits (an error of ~0.01 at 10).  A row with a logit
  beyond float16's range (65504) is sent shifted by its largest logit: the softmax
  is the same, where a plain cast would give inf.
* ``topk:K`` -- per image the K largest logits (float32), their class indices
  (int16; int32 above 32767 classes) and the logsumexp of all logits (float32).
  The edge rebuilds a full row: the K logits where they were, and every other
  class the same logit ``f``, chosen so that the softmax (at T = 1) gives the
  top K exactly their teacher probabilities and the rest the teacher's
  remaining mass ``r = 1 - sum(top-K probabilities)`` shared equally:
  ``f = lse + log(r / (C - K))``.  At other temperatures the shape of the
  tail (flat instead of the teacher's) is what is lost.

Layout of a top-k buffer (row-major, per batch): ``B*(K+1)`` float32 (K values,
then the logsumexp, per row), then ``B*K`` indices.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.errors import UsageError

__all__ = ["WireFormat", "parse_wire"]

FLOAT16_MAX = float(torch.finfo(torch.float16).max)  # 65504


def _within_float16(logits: torch.Tensor) -> torch.Tensor:
    """Rows with a logit beyond float16's range, shifted so that their largest logit is 0 (and floored at
    -65504); other rows as they are.  Softmax, at any T, does not see a shift of a whole row, so the
    distillation loss is unchanged where a plain cast would have sent inf (and NaN after the softmax)."""
    big = logits.abs().amax(dim=1, keepdim=True) > FLOAT16_MAX
    if not bool(big.any()):
        return logits
    shifted = (logits - logits.amax(dim=1, keepdim=True)).clamp_min(-FLOAT16_MAX)
    return torch.where(big, shifted, logits)


@dataclass(frozen=True)
class WireFormat:
    kind: str  # "float32", "float16" or "topk"
    k: int = 0

    def __str__(self) -> str:
        return f"topk:{self.k}" if self.kind == "topk" else self.kind

    def check(self, classes: int) -> None:
        """Refuse a top-k that keeps every class (or more): it would cost more than float32."""
        if self.kind == "topk" and not 1 <= self.k < classes:
            raise UsageError(f"--wire topk:{self.k} must keep between 1 and {classes - 1} of the {classes} classes; "
                             "use float32 to send them all")

    def _index_dtype(self, classes: int) -> torch.dtype:
        return torch.int16 if classes <= 32767 else torch.int32

    def nbytes(self, batch: int, classes: int) -> int:
        """Bytes on the wire for one batch."""
        if self.kind == "float32":
            return batch * classes * 4
        if self.kind == "float16":
            return batch * classes * 2
        return batch * (self.k + 1) * 4 + batch * self.k * self._index_dtype(classes).itemsize

    def encode(self, logits: torch.Tensor) -> torch.Tensor:
        """float32 ``(B, C)`` logits -> a contiguous uint8 buffer of :meth:`nbytes` bytes."""
        logits = logits.detach().float().contiguous()
        if self.kind == "float32":
            return logits.view(torch.uint8).reshape(-1)
        if self.kind == "float16":
            return _within_float16(logits).half().view(torch.uint8).reshape(-1)
        values, indices = logits.topk(self.k, dim=1)
        head = torch.cat([values, torch.logsumexp(logits, dim=1, keepdim=True)], dim=1).contiguous()
        tail = indices.to(self._index_dtype(logits.shape[1])).contiguous()
        return torch.cat([head.view(torch.uint8).reshape(-1), tail.view(torch.uint8).reshape(-1)])

    def decode(self, buffer: torch.Tensor, batch: int, classes: int) -> torch.Tensor:
        """A buffer from :meth:`encode` -> float32 ``(B, C)`` logits (a new tensor, the buffer is reusable)."""
        if self.kind == "float32":
            return buffer.view(torch.float32).reshape(batch, classes).clone()
        if self.kind == "float16":
            return buffer.view(torch.float16).reshape(batch, classes).float()
        k = self.k
        split = batch * (k + 1) * 4
        head = buffer[:split].view(torch.float32).reshape(batch, k + 1)
        indices = buffer[split:].view(self._index_dtype(classes)).reshape(batch, k).long()
        values, lse = head[:, :k], head[:, k:]
        top_mass = torch.exp(values - lse).sum(dim=1, keepdim=True)
        rest = (1.0 - top_mass).clamp_min(torch.finfo(torch.float32).tiny * (classes - k))
        fill = lse + torch.log(rest / (classes - k))
        out = fill.expand(batch, classes).clone()
        out.scatter_(1, indices, values)
        return out


def parse_wire(text: str) -> WireFormat:
    """``float32``, ``float16`` or ``topk:K`` (K >= 1; checked against the class count at set-up)."""
    value = text.strip().lower()
    if value in ("float32", "float16"):
        return WireFormat(value)
    if value.startswith("topk:"):
        try:
            k = int(value[5:])
        except ValueError:
            k = 0
        if k >= 1:
            return WireFormat("topk", k)
    raise UsageError(f"wire format must be float32, float16 or topk:K with K >= 1, got '{text}'")
