"""Progress bars that read well in a terminal and in a log: ``tqdm`` on a terminal, whole lines elsewhere.

A bar redraws itself with ``\\r`` frames; written into a file or a CI log those frames pile up into one
line of kilobytes (the install command's log was one 8 KB line).  When the stream is not a terminal,
:func:`progress_bar` keeps tqdm's counting and rates but writes a plain line at most every 30 s (and
the last one), so a log shows how far a long job got and nothing else.
"""
from __future__ import annotations

import sys

__all__ = ["progress_bar", "LOG_INTERVAL_S"]

LOG_INTERVAL_S = 30.0


class _Lines:
    """A file for tqdm that turns each redraw into one line (escape codes and blank clears dropped)."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\x1b[A", "").replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(iterable=None, **kw):
    """``tqdm(iterable, **kw)`` on a terminal; on anything else one line per :data:`LOG_INTERVAL_S` seconds."""
    from tqdm import tqdm

    stream = kw.pop("file", None) or sys.stderr
    if kw.get("disable") or _is_terminal(stream):
        return tqdm(iterable, file=stream, **kw)
    kw.update(mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S * 2, ncols=100, ascii=True, leave=True)
    return tqdm(iterable, file=_Lines(stream), **kw)
