"""The edge's durable buffer of collected, unlabelled images (AFLKD Alg. 2), in one SQLite file.

Why SQLite and not append-only files: a sample's life is three states and every
step moves a whole batch at once (the cloud's logits for 500 images; those 500
consumed *and* the student generation that used them).  A transaction does
exactly that, all or nothing, with no recovery code of our own; append-only files
would need a log, fsyncs, renames and a replay on every start to get the same.
The file uses SQLite's rollback journal with ``synchronous=EXTRA`` (FULL, plus an
fsync of the folder after the journal is deleted: with FULL alone, a power cut
just after a commit can bring the deleted journal back, and the next open rolls
the acknowledged commit back), so a commit is on disk before it returns: :meth:`Buffer.append` returns only after its
commit, hence "acknowledged" means "survives kill -9 and power loss".  Rollback
journal rather than WAL: with WAL, committed transactions can live in the
``-wal`` file, whose replay silently stops at the first damaged frame (dropping
what follows); with a rollback journal every committed byte is in the one file,
where the checks below see it.  (stdlib ``sqlite3``, no server, one file an edge
board can copy.)

States of a sample, each step one transaction::

    append ──> pending ──label(ids, logits)──> labelled ──consume(batch, generation)──> consumed
                 (image)      (a batch: the cloud's       (that batch trained the student of this
                               logits stored beside)       generation, recorded with its sha256)

Tables: ``samples`` (image bytes + CRC32, state, batch, logits bytes + CRC32),
``batches`` (one per exchange with the cloud), ``generations`` (each student
written: number, batch, sha256, and what the update reported, e.g. its test
accuracy, as JSON; generation 0 is the student the buffer started with), ``meta`` (format, image shape, the buffer's uuid).  The CHECK constraints
make a state without its batch or logits impossible to write.

A corrupt file is refused with its path (:class:`BufferCorrupt`): not a SQLite
file, not an aflkd buffer, ``PRAGMA quick_check`` failing on open, or a record
whose CRC32 does not match when read.  Nothing is ever repaired, truncated or
skipped.
"""
from __future__ import annotations

import glob
import json
import os
import sqlite3
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from runtime.errors import UsageError

__all__ = ["Buffer", "BufferCorrupt", "BufferUnwritable", "Generation", "STATES", "FORMAT", "hold_for_training"]

STATES = ("pending", "labelled", "consumed")
FORMAT = 1
_APPLICATION_ID = 0x41464C4B  # "AFLK": marks the file as an aflkd buffer (PRAGMA application_id)
#: Seconds after which a ``NAME.*.creating`` file is taken for the leftover of a killed creator and removed.
STALE_CREATING_S = 600.0
_SYNCHRONOUS_EXTRA = 3  # what ``PRAGMA synchronous`` reads back once EXTRA is in force

_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE batches(
    id INTEGER PRIMARY KEY,
    size INTEGER NOT NULL CHECK(size > 0),
    classes INTEGER NOT NULL CHECK(classes > 0),
    labelled_at REAL NOT NULL,
    consumed_at REAL
);
CREATE TABLE generations(
    generation INTEGER PRIMARY KEY CHECK(generation >= 0),
    batch INTEGER UNIQUE REFERENCES batches(id),
    sha256 TEXT NOT NULL,
    info TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    CHECK((generation = 0) = (batch IS NULL))
);
CREATE TABLE samples(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT UNIQUE,
    image BLOB NOT NULL,
    image_crc INTEGER NOT NULL,
    state TEXT NOT NULL CHECK(state IN ('pending', 'labelled', 'consumed')),
    batch INTEGER REFERENCES batches(id),
    logits BLOB,
    logits_crc INTEGER,
    CHECK((state = 'pending') = (batch IS NULL)),
    CHECK((state = 'pending') = (logits IS NULL)),
    CHECK((logits IS NULL) = (logits_crc IS NULL))
);
CREATE INDEX samples_by_state ON samples(state, id);
CREATE INDEX samples_by_batch ON samples(batch, id);
"""


def hold_for_training(path: str) -> int:
    """An exclusive lock on ``path`` for one training job (``update run`` or ``demo``), held until the process
    ends; returns its file descriptor.  Frames may still be added meanwhile (``update add`` takes no such lock),
    but a second training job on the same buffer is refused: two would retrain the same batch and overwrite
    each other's student file."""
    import fcntl

    fd = os.open(path + ".train-lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UsageError(f"--buffer {path}: another training job ('update run' or 'demo') holds it; wait for it "
                         "to end (two would retrain the same frames and overwrite one student file)") from None
    return fd


class BufferCorrupt(UsageError):
    """The buffer file is damaged or not a buffer; the message names the file.  Never repaired."""


class BufferUnwritable(UsageError):
    """A write failed for want of space or permission (SQLITE_FULL, _IOERR, _READONLY): the file is intact."""


#: SQLite result names that mean the disk, not the file, is the problem
STORAGE_ERRORS = ("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN")


@dataclass(frozen=True)
class Generation:
    """One student written by the buffer's updates (generation 0: the one it started from)."""

    generation: int
    batch: Optional[int]
    sha256: str


def _crc(data: bytes) -> int:
    return zlib.crc32(data)


class Buffer:
    """A durable buffer of uint8 images of one shape ``(H, W, C)``; see the module doc.

    One writer at a time (the edge process); every public method is one transaction.
    """

    def __init__(self, path: str, shape: Optional[Sequence[int]] = None, create: bool = True):
        self.path = str(path)
        if not os.path.exists(self.path):
            if not create:
                raise UsageError(f"buffer {self.path} does not exist; give the path of a buffer written by "
                                 "'aflkd update'")
            self._create(shape)
        if os.path.getsize(self.path) == 0:
            raise BufferCorrupt(f"buffer {self.path} is an empty file, not a buffer; it is left as it is: move "
                                "it away (nothing can be recovered from it)")
        try:
            self._db = self._connect(self.path)
            self._check_file()
        except sqlite3.DatabaseError as err:
            raise self._corrupt(err) from None
        meta = self._meta()
        self.shape = tuple(int(v) for v in meta["shape"].split(","))
        self.uuid = meta["uuid"]
        if shape is not None and tuple(shape) != self.shape:
            raise UsageError(f"buffer {self.path} holds images of shape {self.shape}, not {tuple(shape)}; "
                             "use another --buffer for this dataset")

    @staticmethod
    def _connect(path: str) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, timeout=60)
        db.execute("PRAGMA journal_mode = DELETE")  # rollback journal: see the module doc
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("PRAGMA synchronous = EXTRA")  # FULL + fsync the folder after the journal's unlink
        level = db.execute("PRAGMA synchronous").fetchone()[0]
        if level != _SYNCHRONOUS_EXTRA:  # an unknown value is ignored silently: check it took
            db.close()
            raise UsageError(f"SQLite {sqlite3.sqlite_version} did not apply synchronous=EXTRA (got {level}) to "
                             f"buffer {path}, so a power cut could undo an acknowledged commit; run aflkd "
                             "with a Python whose SQLite supports it")
        return db

    # ------------------------------------------------------------------ opening, checking
    def _corrupt(self, err: Exception) -> UsageError:
        """The error to raise for a SQLite failure: a full or unwritable disk is not a corrupt buffer."""
        name = getattr(err, "sqlite_errorname", "") or ""
        if name.startswith(STORAGE_ERRORS) or "disk is full" in str(err):
            return BufferUnwritable(f"buffer {self.path}: cannot write ({err}): the disk is full or not writable; "
                                    "free space (or fix the mount) and rerun: every committed image and update is "
                                    "still in the buffer")
        return BufferCorrupt(f"buffer {self.path} is corrupt or not an aflkd buffer ({err}); it is left as it is: "
                             "restore it from a copy or move it away to start a new one")

    def _check_file(self) -> None:
        """Refuse anything but an intact aflkd buffer, before any write touches it."""
        app = self._db.execute("PRAGMA application_id").fetchone()[0]
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if app != _APPLICATION_ID and tables:
            raise BufferCorrupt(f"{self.path} is a SQLite file but not an aflkd buffer (application id {app:#x}); "
                                "pass another --buffer")
        if not tables:
            raise BufferCorrupt(f"{self.path} is a SQLite file with no tables, not an aflkd buffer; pass another "
                                "--buffer")
        problems = [r[0] for r in self._db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise self._corrupt(sqlite3.DatabaseError("; ".join(problems[:3])))
        if self._meta().get("format") != str(FORMAT):
            raise BufferCorrupt(f"buffer {self.path} has format {self._meta().get('format')}, this aflkd reads "
                                f"format {FORMAT}")

    def _create(self, shape: Optional[Sequence[int]]) -> None:
        """Make the empty buffer under a temp name, fsync it, rename it into place: a kill while
        creating leaves no half-made (empty, schema-less) buffer at ``path``."""
        if shape is None or len(shape) != 3 or min(shape) < 1:
            raise UsageError(f"a new buffer needs the image shape (H, W, C), got {shape}")
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        for stale in glob.glob(glob.escape(self.path) + ".*.creating*"):  # a creator killed midway...
            try:  # ...not one still writing (creating takes milliseconds): only files left for minutes
                if time.time() - os.path.getmtime(stale) > STALE_CREATING_S:
                    os.remove(stale)
            except FileNotFoundError:  # its creator, or another, removed it meanwhile
                pass
        tmp = f"{self.path}.{uuid.uuid4().hex[:8]}.creating"
        try:
            db = self._connect(tmp)
            db.execute("BEGIN IMMEDIATE")
            db.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
            for statement in _SCHEMA.strip().split(";"):
                if statement.strip():
                    db.execute(statement)
            db.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("format", str(FORMAT)), ("shape", ",".join(str(int(v)) for v in shape)),
                ("uuid", uuid.uuid4().hex), ("created", repr(time.time()))])
            db.execute("COMMIT")
            db.close()
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            try:
                os.link(tmp, self.path)  # unlike a rename, never replaces a buffer another process just made
            except FileExistsError:
                pass
            except OSError:  # no hard links (FAT/exFAT SD cards): a rename, unless one appeared meanwhile
                if not os.path.exists(self.path):
                    os.replace(tmp, self.path)
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            for leftover in (tmp, tmp + "-journal"):
                if os.path.exists(leftover):
                    os.remove(leftover)

    def _meta(self) -> dict:
        try:
            return dict(self._db.execute("SELECT key, value FROM meta"))
        except sqlite3.OperationalError:  # no table yet: a new file
            return {}

    def _transaction(self):
        return _Transaction(self)

    def close(self) -> None:
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ appending
    @property
    def image_bytes(self) -> int:
        return int(np.prod(self.shape))

    def append(self, images: np.ndarray, keys: Optional[Sequence[str]] = None) -> list[int]:
        """Add images (uint8 ``(n, H, W, C)``) as pending, in one transaction; returns their ids.

        Returns only after the commit is on disk.  ``keys`` (one per image, e.g. a
        camera frame id) make appending idempotent: a key already in the buffer is
        skipped and its existing id returned, so a producer that crashed before it
        saw the acknowledgement can simply append again.
        """
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape[1:] != self.shape:
            raise UsageError(f"buffer {self.path} takes uint8 images of shape (n, {', '.join(map(str, self.shape))}), "
                             f"got {images.dtype} {images.shape}")
        if keys is not None and len(keys) != len(images):
            raise UsageError(f"{len(keys)} keys for {len(images)} images")
        ids = []
        with self._transaction():
            for i, image in enumerate(images):
                data = np.ascontiguousarray(image).tobytes()
                key = None if keys is None else str(keys[i])
                if key is not None:
                    found = self._db.execute("SELECT id FROM samples WHERE key = ?", (key,)).fetchone()
                    if found:
                        ids.append(found[0])
                        continue
                cur = self._db.execute("INSERT INTO samples(key, image, image_crc, state) VALUES (?, ?, ?, 'pending')",
                                       (key, data, _crc(data)))
                ids.append(cur.lastrowid)
        return ids

    # ------------------------------------------------------------------ reading
    def counts(self) -> dict[str, int]:
        """Samples per state (every state present, zeros included)."""
        found = dict(self._db.execute("SELECT state, COUNT(*) FROM samples GROUP BY state"))
        return {s: int(found.get(s, 0)) for s in STATES}

    def _images(self, rows) -> np.ndarray:
        out = np.empty((len(rows), *self.shape), dtype=np.uint8)
        for i, (sid, data, crc) in enumerate(rows):
            if len(data) != self.image_bytes or _crc(data) != crc:
                raise BufferCorrupt(f"buffer {self.path}: sample {sid}'s image fails its CRC32 check (damaged "
                                    "on disk); it is left as it is: restore the file from a copy")
            out[i] = np.frombuffer(data, dtype=np.uint8).reshape(self.shape)
        return out

    def pending(self, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """The oldest ``limit`` pending samples: ``(ids, images)``."""
        rows = self._db.execute("SELECT id, image, image_crc FROM samples WHERE state = 'pending' ORDER BY id LIMIT ?",
                                (int(limit),)).fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64), self._images(rows)

    def open_batch(self) -> Optional[int]:
        """The labelled batch not yet consumed (at most one exists), or None."""
        rows = self._db.execute("SELECT id FROM batches WHERE consumed_at IS NULL").fetchall()
        if len(rows) > 1:
            raise BufferCorrupt(f"buffer {self.path} has {len(rows)} open batches; at most one can exist")
        return rows[0][0] if rows else None

    def batch(self, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A batch's ``(ids, images, logits)``, in id order; CRCs checked."""
        found = self._db.execute("SELECT size, classes FROM batches WHERE id = ?", (batch,)).fetchone()
        if found is None:
            raise UsageError(f"buffer {self.path} has no batch {batch}")
        size, classes = found
        rows = self._db.execute("SELECT id, image, image_crc, logits, logits_crc FROM samples WHERE batch = ? "
                                "ORDER BY id", (batch,)).fetchall()
        if len(rows) != size:
            raise BufferCorrupt(f"buffer {self.path}: batch {batch} records {size} samples but {len(rows)} carry it")
        images = self._images([(r[0], r[1], r[2]) for r in rows])
        logits = np.empty((size, classes), dtype=np.float32)
        for i, (sid, _, _, data, crc) in enumerate(rows):
            if len(data) != classes * 4 or _crc(data) != crc:
                raise BufferCorrupt(f"buffer {self.path}: sample {sid}'s logits fail their CRC32 check (damaged "
                                    "on disk); it is left as it is: restore the file from a copy")
            logits[i] = np.frombuffer(data, dtype=np.float32)
        return np.array([r[0] for r in rows], dtype=np.int64), images, logits

    def generations(self) -> list[Generation]:
        return [Generation(*r) for r in self._db.execute(
            "SELECT generation, batch, sha256 FROM generations ORDER BY generation")]

    def latest(self) -> Optional[Generation]:
        """The newest student generation recorded (None before the first student is registered)."""
        gens = self.generations()
        return gens[-1] if gens else None

    def info(self, generation: int) -> dict:
        """What the update that made ``generation`` reported (``{}`` if nothing)."""
        found = self._db.execute("SELECT info FROM generations WHERE generation = ?", (generation,)).fetchone()
        return json.loads(found[0]) if found else {}

    def batch_samples(self, batch: int) -> np.ndarray:
        return np.array([r[0] for r in self._db.execute("SELECT id FROM samples WHERE batch = ? ORDER BY id",
                                                        (batch,))], dtype=np.int64)

    def states(self) -> dict[int, tuple[str, Optional[int]]]:
        """Every sample's ``id -> (state, batch)`` (tests and audits)."""
        return {r[0]: (r[1], r[2]) for r in self._db.execute("SELECT id, state, batch FROM samples")}

    def keys(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self._db.execute("SELECT key, id FROM samples WHERE key IS NOT NULL")}

    # ------------------------------------------------------------------ state changes
    def start(self, sha256: str, info: Optional[dict] = None) -> Generation:
        """Register the student the buffer's updates start from, as generation 0 (once)."""
        with self._transaction():
            if self._db.execute("SELECT COUNT(*) FROM generations").fetchone()[0]:
                raise UsageError(f"buffer {self.path} already has its starting student")
            self._db.execute("INSERT INTO generations VALUES (0, NULL, ?, ?, ?)",
                             (sha256, json.dumps(info or {}), time.time()))
        return Generation(0, None, sha256)

    def label(self, ids: Sequence[int], logits: np.ndarray) -> int:
        """pending -> labelled for ``ids`` with the cloud's ``logits`` (float32 ``(n, classes)``), as one new batch.

        Refused (nothing written) if a batch is still open or any id is not pending.
        """
        ids = [int(i) for i in ids]
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        if logits.ndim != 2 or len(logits) != len(ids) or not ids:
            raise UsageError(f"label needs one logits row per sample, got {logits.shape} for {len(ids)} samples")
        if not np.isfinite(logits).all():
            raise UsageError("the cloud's logits hold NaN or infinity; nothing was stored")
        with self._transaction():
            if self._db.execute("SELECT COUNT(*) FROM batches WHERE consumed_at IS NULL").fetchone()[0]:
                raise UsageError(f"buffer {self.path} still has an open batch; consume it first")
            cur = self._db.execute("INSERT INTO batches(size, classes, labelled_at) VALUES (?, ?, ?)",
                                   (len(ids), logits.shape[1], time.time()))
            batch = cur.lastrowid
            for sid, row in zip(ids, logits):
                data = row.tobytes()
                changed = self._db.execute("UPDATE samples SET state = 'labelled', batch = ?, logits = ?, logits_crc = ? "
                                           "WHERE id = ? AND state = 'pending'", (batch, data, _crc(data), sid)).rowcount
                if changed != 1:
                    raise UsageError(f"sample {sid} of buffer {self.path} is not pending; nothing was labelled")
        return batch

    def consume(self, batch: int, generation: int, sha256: str, info: Optional[dict] = None) -> None:
        """labelled -> consumed for ``batch``, recording the student ``generation`` it produced (its sha256 and
        ``info``, e.g. its test accuracy), in one transaction."""
        with self._transaction():
            latest = self._db.execute("SELECT MAX(generation) FROM generations").fetchone()[0]
            if latest is None or generation != latest + 1:
                raise UsageError(f"generation {generation} does not follow the buffer's latest ({latest})")
            changed = self._db.execute("UPDATE batches SET consumed_at = ? WHERE id = ? AND consumed_at IS NULL",
                                       (time.time(), batch)).rowcount
            if changed != 1:
                raise UsageError(f"batch {batch} of buffer {self.path} is not open; nothing was consumed")
            self._db.execute("UPDATE samples SET state = 'consumed' WHERE batch = ? AND state = 'labelled'", (batch,))
            self._db.execute("INSERT INTO generations VALUES (?, ?, ?, ?, ?)",
                             (generation, batch, sha256, json.dumps(info or {}), time.time()))

    # ------------------------------------------------------------------ invariants
    def check(self) -> list[str]:
        """Problems with the buffer's invariants (empty: none); the tests' and ``--check``'s audit."""
        problems = []
        q = self._db.execute
        for batch, size, consumed in q("SELECT id, size, consumed_at FROM batches"):
            states = dict(q("SELECT state, COUNT(*) FROM samples WHERE batch = ? GROUP BY state", (batch,)))
            want = "consumed" if consumed is not None else "labelled"
            if states != {want: size}:
                problems.append(f"batch {batch}: samples {states}, expected {size} {want}")
            gens = q("SELECT generation FROM generations WHERE batch = ?", (batch,)).fetchall()
            if (consumed is not None) != (len(gens) == 1):
                problems.append(f"batch {batch}: consumed={consumed is not None} but {len(gens)} generations")
        if q("SELECT COUNT(*) FROM batches WHERE consumed_at IS NULL").fetchone()[0] > 1:
            problems.append("more than one open batch")
        gens = [g.generation for g in self.generations()]
        if gens != list(range(len(gens))):
            problems.append(f"generations are not 0, 1, 2, ...: {gens}")
        return problems


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rollback on any exception): one writer, all or nothing."""

    def __init__(self, buffer: Buffer):
        self.db = buffer._db
        self.buffer = buffer

    def __enter__(self):
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as err:  # locked by another writer past the timeout
            raise UsageError(f"buffer {self.buffer.path} is busy ({err}); is another 'aflkd update' using it?") from None
        except sqlite3.DatabaseError as err:
            raise self.buffer._corrupt(err) from None
        return self

    def __exit__(self, kind, value, tb):
        if kind is None:
            try:
                self.db.execute("COMMIT")
            except sqlite3.DatabaseError as err:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise self.buffer._corrupt(err) from None
        else:
            if self.db.in_transaction:  # SQLite rolls some failures (SQLITE_FULL) back by itself
                self.db.execute("ROLLBACK")
            if isinstance(value, sqlite3.DatabaseError):  # mid-transaction: a full disk, or a damaged file
                raise self.buffer._corrupt(value) from None
        return False
