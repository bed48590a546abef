"""``aflkd bench layers --head``: both head placements in one run, each with its end-to-end time and peak memory."""
import json

import pytest

from tests.test_cli import aflkd, error_lines, needs_mpiexec


@needs_mpiexec
def test_both_placements_are_reported_with_their_memory(tmp_path):
    proc = aflkd(2, "bench", "layers", "--net", "edge2", "--size", "32", "--repeat", "2", "--warmup", "1",
                 "--weights", "2,1", "--json", str(tmp_path / "r.json"), "--no-progress", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "head: split: flatten of 'pool2' -> Linear 'fc1' (3072 -> 1024)" in proc.stdout
    assert "head placement" in proc.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    heads = {h["head"]: h for h in report["heads"]}
    assert set(heads) == {"gather", "split"}
    for h in heads.values():
        assert h["end_to_end_ms"] > 0 and len(h["peak_rss_mb"]) == 2 and all(m > 0 for m in h["peak_rss_mb"])
        assert h["max_abs_error"] <= 1e-5
    # weights 2,1 over pool2's 8 rows: 5 and 3 rows of 48 channels x 8 columns, 1024 outputs, float32
    assert [round(m * 2**20) for m in heads["split"]["weight_mb_per_rank"]] == [4 * 1024 * 48 * 8 * 5,
                                                                               4 * 1024 * 48 * 8 * 3]
    assert heads["gather"]["peak_rss_mb"] == report["peak_rss_mb"]


@needs_mpiexec
def test_auto_says_why(tmp_path):
    proc = aflkd(2, "bench", "layers", "--net", "edge1", "--size", "32", "--repeat", "1", "--warmup", "0",
                 "--head", "auto", "--no-progress", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "head: auto -> " in proc.stdout and "ns/weight measured" in proc.stdout


@needs_mpiexec
def test_global_pool_head_says_which_case_applies(tmp_path):
    proc = aflkd(2, "bench", "layers", "--net", "tv:resnet18", "--size", "64", "--repeat", "1", "--warmup", "0",
                 "--head", "split", "--json", str(tmp_path / "r.json"), "--no-progress", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "global pool 'avgpool' reduces partial sums before the Linear" in proc.stdout
    assert [h["head"] for h in json.loads((tmp_path / "r.json").read_text())["heads"]] == ["gather"]


@needs_mpiexec
def test_unknown_head_is_one_line():
    proc = aflkd(2, "bench", "layers", "--head", "rows", "--no-progress")
    assert proc.returncode != 0
    (line,) = error_lines(proc)
    assert "--head: invalid choice: 'rows'" in line




@needs_mpiexec
def test_head_split_headline_figures_are_the_splits(tmp_path):
    proc = aflkd(2, "bench", "layers", "--net", "edge2", "--size", "32", "--repeat", "2", "--warmup", "1",
                 "--head", "split", "--json", str(tmp_path / "r.json"), "--no-progress", timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    heads = {h["head"]: h for h in report["heads"]}
    assert report["end_to_end_ms"] == heads["split"]["end_to_end_ms"] != heads["gather"]["end_to_end_ms"]
    assert report["peak_rss_mb"] == heads["split"]["peak_rss_mb"]


def test_noisy_or_inconsistent_timings_are_said():
    import numpy as np

    from runtime.benchmark import _timing_notes

    calm = np.array([0.030, 0.031, 0.0305, 0.0302, 0.0308])
    assert _timing_notes(calm, end_to_end_ms=33.0, split_ms=30.5) == []
    busy = np.array([0.030, 0.031, 0.090, 0.045, 0.030, 0.060])
    (note,) = _timing_notes(busy, end_to_end_ms=50.0, split_ms=38.0)
    assert "vary by" in note and "busy" in note
    (note,) = _timing_notes(calm, end_to_end_ms=25.0, split_ms=30.5)
    assert "below the split part" in note
