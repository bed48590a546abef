"""``aflkd serve``'s parts without MPI: the results log (exactly once, resumable, refuses another run) and the
image sources (stable ids, bad input in one line)."""
import sqlite3
import subprocess
import sys

import pytest
import torch

from runtime.errors import UsageError
from runtime.image_sources import ImageSource, parse_source
from runtime.results_log import ResultsLog

IDENTITY = {"source": "synthetic", "seed": 0, "net": "edge3"}


def test_the_log_keeps_each_image_once_across_reopening(tmp_path):
    path = str(tmp_path / "r.db")
    log = ResultsLog(path, IDENTITY)
    log.append([(0, 3, [[3, 1.5]], 0, 2.0), (1, 4, [[4, 0.5]], 0, 2.5)])
    with pytest.raises(RuntimeError, match="already served"):
        log.append([(2, 1, [[1, 0.1]], 0, 1.0), (1, 4, [[4, 0.5]], 0, 2.5)])  # one duplicate: nothing of it lands
    log.close()
    again = ResultsLog(path, IDENTITY)
    assert again.served() == {0, 1} and again.run == 2
    rows = sqlite3.connect(path).execute("SELECT image, top1, run FROM results ORDER BY image").fetchall()
    assert rows == [(0, 3, 1), (1, 4, 1)]


def test_a_log_of_another_run_or_not_a_log_is_refused(tmp_path):
    path = str(tmp_path / "r.db")
    ResultsLog(path, IDENTITY).close()
    with pytest.raises(UsageError, match="another run .*net: 'edge3' there, 'edge1' now"):
        ResultsLog(path, {**IDENTITY, "net": "edge1"})
    junk = tmp_path / "junk.db"
    junk.write_text("not sqlite at all " * 100)
    with pytest.raises(UsageError, match="not a results log"):
        ResultsLog(str(junk), IDENTITY)


def test_a_result_committed_before_a_kill_9_is_there_after_it(tmp_path):
    """A child commits 5 results and is killed with SIGKILL mid-way through the 6th transaction's sleep."""
    path = tmp_path / "r.db"
    code = ("import os, signal\nfrom runtime.results_log import ResultsLog\n"
            f"log = ResultsLog({str(path)!r}, {IDENTITY!r})\n"
            "for i in range(5):\n    log.append([(i, i, [[i, 1.0]], 0, 1.0)])\n"
            "log.db.execute('BEGIN IMMEDIATE')\nlog.db.execute(\"INSERT INTO results VALUES (5, 5, '[]', 0, 1, 1.0, 0)\")\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -9
    assert ResultsLog(str(path), IDENTITY).served() == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("text, message", [
    ("imagenet", "--source must be synthetic"), ("cifar10:val", "split must be test or train"),
    ("folder:", "needs a path"),
])
def test_bad_sources_are_one_line(text, message):
    with pytest.raises(UsageError, match=message):
        parse_source(text)


def test_synthetic_images_depend_on_the_seed_and_id_only():
    a = ImageSource(parse_source("synthetic"), (3, 16, 16), 10, seed=1)
    b = ImageSource(parse_source("synthetic"), (3, 16, 16), 99, seed=1)
    assert torch.equal(a.image(7), b.image(7)) and not torch.equal(a.image(7), a.image(6))
    assert not torch.equal(a.image(7), ImageSource(parse_source("synthetic"), (3, 16, 16), 10, seed=2).image(7))
    with pytest.raises(UsageError, match="needs --images"):
        ImageSource(parse_source("synthetic"), (3, 16, 16), None)


def test_a_folder_is_read_in_name_order_and_resized(tmp_path):
    import numpy as np
    from PIL import Image

    for name, value in (("b.png", 200), ("a.png", 100)):
        Image.fromarray(np.full((8, 6, 3), value, dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "c.txt").write_text("not an image")
    source = ImageSource(parse_source(f"folder:{tmp_path}"), (3, 16, 16), None)
    assert len(source) == 2
    first = source.image(0)
    assert first.shape == (1, 3, 16, 16) and first.dtype == torch.float32
    assert torch.allclose(first, torch.full_like(first, 100 / 255), atol=1e-6)  # a.png first, resized, [0, 1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no image files"):
        ImageSource(parse_source(f"folder:{tmp_path / 'empty'}"), (3, 16, 16), None)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_text("not a png")
    with pytest.raises(UsageError, match="cannot read the image"):
        ImageSource(parse_source(f"folder:{tmp_path / 'bad'}"), (3, 16, 16), None).image(0)
    with pytest.raises(UsageError, match="no such folder"):
        ImageSource(parse_source(f"folder:{tmp_path / 'missing'}"), (3, 16, 16), None)


def test_the_first_plan_takes_a_racks_speeds_only_on_real_boards(tmp_path):
    from launch.serve import initial_weights

    def topology(address, stages=1):
        path = tmp_path / f"{address}-{stages}.toml"
        path.write_text("".join(f'[[host]]\nname = "b{i}"\naddress = "{address}"\nrole = "master"\ncluster = {i}\n'
                                f'speed = {2.0 if i == 0 else 1.0}\nslots = {stages}\n' for i in range(3)))
        return str(path)
    assert initial_weights(3, topology("10.0.0.9")) == [2.0, 1.0, 1.0]
    assert initial_weights(3, topology("localhost")) == [1.0, 1.0, 1.0]  # one host: nothing makes them true
    assert initial_weights(2, topology("10.0.0.9")) == [1.0, 1.0]  # another job size: not this rack's map
    assert initial_weights(3) == [1.0, 1.0, 1.0]  # no topology at all
