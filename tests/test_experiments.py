"""The accuracy grid: resumable (finished cells skipped), table and plot from the CSV."""

from kd import experiments
from kd.experiments import markdown_table, plot_accuracy, read_results, run_grid
from kd.trainer import EdgeConfig
from models import cloud_net
from tests.test_teacher import tiny


def test_grid_is_resumable_and_tabulated(tmp_path, monkeypatch):
    data = tiny(n=60)
    teacher = cloud_net(3, 32, 3).eval()
    path = str(tmp_path / "acc.csv")
    base = EdgeConfig("baseline", 1, steps=2, batch=16)
    rows = run_grid(data, teacher, [1], [30, 60], ["baseline", "kd"], [0], path, base, progress=False)
    assert len(rows) == 4
    calls = []
    monkeypatch.setattr(experiments, "train_edge", lambda *a, **k: calls.append(a))
    rows = run_grid(data, teacher, [1], [30, 60], ["baseline", "kd"], [0], path, base, progress=False)
    assert calls == [] and len(read_results(path)) == 4  # nothing rerun
    table = markdown_table(rows, "tiny")
    assert table.splitlines()[0] == "| tiny | 30 | 60 |"
    assert "| Baseline (Edge network1) |" in table and "| KD (Edge network1) |" in table
    plot_accuracy(rows, "tiny", str(tmp_path / "acc.png"))
    assert (tmp_path / "acc.png").read_bytes()[:4] == b"\x89PNG"


def test_epoch_time_is_reported_for_every_frozen_count():
    from kd.experiments import epoch_time_by_frozen

    rows = epoch_time_by_frozen(tiny(n=60), cloud_net(3, 32, 3).eval(), 1, 30, 4, EdgeConfig("aflkd", 1, batch=8))
    assert [r["frozen"] for r in rows] == [0, 1, 2, 3]
    assert all(r["epoch_seconds"] > 0 for r in rows)


def test_rerun_with_other_settings_is_refused(tmp_path):
    import pytest

    from runtime.errors import UsageError

    data = tiny(n=60)
    path = str(tmp_path / "acc.csv")
    run_grid(data, None, [1], [30], ["baseline"], [0], path, EdgeConfig("baseline", 1, steps=2, batch=16),
             progress=False)
    with pytest.raises(UsageError, match="other settings \\(steps 2 -> 3\\)"):
        run_grid(data, None, [1], [30, 60], ["baseline"], [0], path, EdgeConfig("baseline", 1, steps=3, batch=16),
                 progress=False)
    assert len(read_results(path)) == 1  # nothing written


def test_rerun_with_another_teacher_is_refused(tmp_path):
    import json

    import pytest

    from kd.experiments import file_digest
    from runtime.errors import UsageError

    data = tiny(n=60)
    path = str(tmp_path / "acc.csv")
    base = EdgeConfig("baseline", 1, steps=2, batch=16)
    (tmp_path / "a.pt").write_bytes(b"teacher a")
    (tmp_path / "b.pt").write_bytes(b"teacher b")
    a, b = file_digest(str(tmp_path / "a.pt")), file_digest(str(tmp_path / "b.pt"))
    assert a != b and len(a) == 16
    run_grid(data, None, [1], [30], ["baseline"], [0], path, base, progress=False)  # no teacher used yet
    run_grid(data, None, [1], [30], ["baseline"], [0], path, base, progress=False, teacher_sha256=a)  # first one kept
    assert json.loads((tmp_path / "acc.settings.json").read_text())["teacher_sha256"] == a
    run_grid(data, None, [1], [30], ["baseline"], [0], path, base, progress=False, teacher_sha256=a)  # same: fine
    with pytest.raises(UsageError, match=f"teacher_sha256 {a} -> {b}"):
        run_grid(data, None, [1], [30], ["baseline"], [0], path, base, progress=False, teacher_sha256=b)


def test_a_csv_from_before_the_device_column_gets_it_on_the_next_cell(tmp_path):
    """Appending a row with a 'device' field to a CSV whose header lacks it would shift every column."""
    import csv

    from kd.experiments import FIELDS

    data = tiny(n=60)
    path = tmp_path / "acc.csv"
    base = EdgeConfig("baseline", 1, steps=2, batch=16)
    run_grid(data, None, [1], [30], ["baseline"], [0], str(path), base, progress=False)
    rows = list(csv.DictReader(open(path)))
    old = [f for f in FIELDS if f != "device"]
    with open(path, "w", newline="") as fh:  # as an older version wrote it
        writer = csv.DictWriter(fh, fieldnames=old, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    run_grid(data, None, [1], [30, 60], ["baseline"], [0], str(path), base, progress=False)
    first, second = list(csv.DictReader(open(path)))
    assert list(first) == FIELDS
    assert first["device"] == "" and {k: first[k] for k in old} == {k: rows[0][k] for k in old}
    assert second["size"] == "60" and second["device"] == "cpu" and second["method"] == "baseline"
