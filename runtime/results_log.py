"""The serving results log: every image served exactly once, across crashes and restarts (SQLite).

One row per image id (the primary key, so a second result for an image is an
error, never a duplicate row), written by the serving root and committed image
by image.  The log is SQLite in WAL mode with ``synchronous=NORMAL``: a
committed row survives the process being killed (``kill -9``) at any moment;
after a power cut the last few commits may be lost, and those images are
served again on the next run, still once each in the log.

A ``meta`` table records what the log serves (the source and the model's
signature): resuming it with another source or model is refused, because the
rows already there would not be results of that run.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from typing import Iterable, Optional

from .errors import UsageError

__all__ = ["ResultsLog", "Result"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    image INTEGER PRIMARY KEY,     -- the source's image id
    top1 INTEGER NOT NULL,         -- predicted class
    topk TEXT NOT NULL,            -- JSON [[class, logit], ...], best first
    epoch INTEGER NOT NULL,        -- plan epoch the image ran under
    run INTEGER NOT NULL,          -- which (re)start of the job served it
    latency_ms REAL NOT NULL,      -- from the image's arrival to its result
    served_at REAL NOT NULL        -- unix time of the commit
);
"""

Result = tuple  # (image, top1, topk, epoch, latency_ms)


class ResultsLog:
    """Open (or create) the log at ``path`` for ``identity`` (a dict: source, model...); the root only."""

    def __init__(self, path: str, identity: dict) -> None:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise UsageError(f"--log {path}: the folder {folder} does not exist")
        try:
            self.db = sqlite3.connect(path, timeout=5.0, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as err:
            raise UsageError(f"--log {path}: not a results log ({err})") from None
        self.path = path
        want = json.dumps(identity, sort_keys=True)
        had = self._meta("identity")
        if had is None:
            self.db.execute("INSERT INTO meta VALUES ('identity', ?)", (want,))
        elif had != want:
            raise UsageError(f"--log {path} holds results of another run ({_differences(had, want)}); "
                             "give a new --log or the same options")
        self.run = int(self._meta("runs") or 0) + 1
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('runs', ?)", (str(self.run),))

    def _meta(self, key: str) -> Optional[str]:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def served(self) -> set[int]:
        """Ids of every image with a committed result."""
        return {row[0] for row in self.db.execute("SELECT image FROM results")}

    def append(self, results: Iterable[Result]) -> None:
        """Commit results in one transaction; an image already in the log is an error (served twice)."""
        now = time.time()
        rows = [(int(i), int(t), json.dumps(k), int(e), self.run, float(ms), now) for i, t, k, e, ms in results]
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany("INSERT INTO results VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            self.db.execute("COMMIT")
        except sqlite3.IntegrityError:
            self.db.execute("ROLLBACK")
            raise RuntimeError(f"results log {self.path}: an image of {[r[0] for r in rows]} was already "
                               "served (exactly-once broken)") from None

    def close(self) -> None:
        self.db.close()


def _differences(had: str, want: str) -> str:
    a, b = json.loads(had), json.loads(want)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "; ".join(f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in keys)
