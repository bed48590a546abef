"""``aflkd system`` end to end under mpiexec -n 4: cloud, training rank, two inference ranks.

The served outputs are checked against plain torch: each generation's student (as the
training rank wrote it, not as the inference ranks received it) is rebuilt unsplit
and run on every image that generation served.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models import edge_net

REPO = Path(__file__).parent.parent
MPIEXEC = Path(sys.executable).parent / "mpiexec"
needs_mpiexec = pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec beside this Python")
TOPOLOGY = str(REPO / "hostfiles" / "local-system.toml")


def aflkd(ranks: int, *args: str, timeout: int = 150) -> subprocess.CompletedProcess:
    if args[0] == "system" and "--net" not in args:
        args = (*args, "--net", "1")  # the smallest student keeps these tests short (the default is edge net 3)
    cmd = [str(MPIEXEC), "-n", str(ranks), sys.executable, "-m", "launch.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("aflkd: error:")]


@needs_mpiexec
@pytest.mark.slow
@pytest.mark.parametrize("net, control, upload", [(1, "none", "none"), (2, "planner", "jpeg")])
def test_system_serves_swaps_between_images_and_matches_unsplit_students(tmp_path, net, control, upload):
    out, rec = tmp_path / "out", tmp_path / "rec"
    proc = aflkd(4, "system", "--topology", TOPOLOGY, "--out", str(out), "--record", str(rec), "--net", str(net),
                 "--images", "40", "--updates", "2", "--increment", "32", "--steps", "2", "--threads", "1",
                 "--timeout", "60", "--seed", str(net), "--control", control, "--control-cores", "2",
                 "--upload", upload, "--test-images", "50", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = np.load(rec / "served.npz")
    inputs, outputs, gens = served["inputs"], served["outputs"], served["generations"]
    assert len(inputs) == len(outputs) == len(gens) >= 40
    # generations only ever go up, one image at a time; both updates were swapped in, each between two images
    assert gens[0] == 0 and (np.diff(gens) >= 0).all() and set(gens.tolist()) == {0, 1, 2}
    first_use = {g: int(np.argmax(gens == g)) for g in (1, 2)}
    assert 0 < first_use[1] < first_use[2] < len(gens)
    report = json.loads((out / "system.json").read_text())
    assert report["served"]["images"] == len(gens)
    assert {s["generation"]: s["image"] for s in report["served"]["swaps"]} == {0: 0, **first_use}
    assert [r["generation"] for r in report["updates"]] == [1, 2]
    assert all(r["update_s"] > 0 and 0 <= r["test_acc"] <= 1 for r in report["updates"])
    assert report["initial"]["generation"] == 0 and 0 <= report["initial"]["test_acc"] <= 1
    assert report["test_images"] == 50 and all(abs(r["test_acc"] * 50 - round(r["test_acc"] * 50)) < 1e-6
                                                for r in [report["initial"], *report["updates"]])
    assert report["control"] == control and all(isinstance(r["replans"], int) for r in report["updates"])
    # the controller's log: under the planner some phase really split the 2 cores (comm 1, compute 1); under
    # "none" nothing is allocated
    phases = [c for r in report["updates"] for step in r["comm_cores"] for c in step]
    assert report["control_cores"] == 2 and len(phases) == (2 * 2 * 2 if control == "planner" else 0)
    if control == "planner":  # 2 updates x 2 steps x (Forward, Backward)
        assert any(0 < c < 2 for c in phases), phases

    assert report["cloud_labelled"] == 64 and report["served"]["images_per_s"] > 0
    if upload == "jpeg":  # 64 images as 224x224 JPEG frames: bytes on the wire, far fewer than raw frames
        assert report["upload"] == "jpeg@224q90" and 0 < report["upload_bytes"] < 64 * 3 * 224 * 224 / 4
    else:  # the buffer's pixels, as before
        assert report["upload"] is None and report["upload_bytes"] == 64 * 32 * 32 * 3
    # every served output equals what the student of that moment gives unsplit (plain torch)
    worst = 0.0
    students = {}
    for g in (0, 1, 2):
        model = edge_net(net, 3, 32, 10)
        model.load_state_dict(torch.load(rec / f"student-g{g}.pt", weights_only=True))
        students[g] = model.eval()
    with torch.no_grad():
        for g, model in students.items():
            mask = gens == g
            want = model(torch.from_numpy(inputs[mask])).numpy()
            worst = max(worst, float(np.abs(want - outputs[mask]).max()))
            # the check can fail: another generation's student gives other outputs on these images
            other = students[(g + 1) % 3](torch.from_numpy(inputs[mask])).numpy()
            assert np.abs(other - outputs[mask]).max() > 1e-3
    assert worst <= 1e-5, worst
    if net == 1:  # rerun into the same --out with another net: one line on every rank, before any work
        assert json.loads((out / "settings.json").read_text())["net"] == 1
        again = aflkd(4, "system", "--topology", TOPOLOGY, "--out", str(out), "--net", "2", "--seed", "1",
                      "--updates", "1", "--increment", "16", "--steps", "1", "--threads", "1", "--no-progress")
        assert again.returncode != 0 and "Traceback" not in again.stderr, again.stderr[-2000:]
        assert error_lines(again) == [f"aflkd: error: rank 0: --out {out} holds a system run made with other "
                                      "settings (net); give another --out, or the same settings to resume it"]


def test_a_student_left_in_out_must_load_into_the_net(tmp_path):
    """A folder from before settings were recorded: its student.pt is loaded into the net asked for (a net-1
    student under --net 2 was a load_state_dict traceback on the training rank)."""
    from types import SimpleNamespace

    from launch.system import _check_out
    from models import save_atomic
    from runtime.errors import UsageError

    save_atomic(edge_net(1, 3, 32, 10).state_dict(), str(tmp_path / "student.pt"))
    data = SimpleNamespace(channels=3, classes=10)
    args = SimpleNamespace(dataset="synthetic", net=2, teacher=None, seed=0)
    with pytest.raises(UsageError, match=r"holds a student that is not edge net 2 for synthetic \(student.pt\)"):
        _check_out(args, data, str(tmp_path))
    assert not (tmp_path / "settings.json").exists()  # a refused run records nothing: the right net still resumes
    _check_out(SimpleNamespace(**{**vars(args), "net": 1}), data, str(tmp_path))


def test_an_out_folder_records_its_settings_and_refuses_others(tmp_path):
    from launch import options
    from runtime.errors import UsageError

    mine = {"dataset": "synthetic", "net": 1, "teacher": "untrained, seeded", "seed": 0}
    options.check_out_settings(str(tmp_path), mine, "a system run")  # nothing recorded yet: passes, writes nothing
    assert not (tmp_path / "settings.json").exists()
    options.record_out_settings(str(tmp_path), mine)
    assert json.loads((tmp_path / "settings.json").read_text()) == mine
    options.check_out_settings(str(tmp_path), dict(mine), "a system run")  # the same settings resume
    with pytest.raises(UsageError, match=r"holds a system run made with other settings \(dataset, teacher\)"):
        options.check_out_settings(str(tmp_path), {**mine, "dataset": "cifar10", "teacher": "c.pt"}, "a system run")
    (tmp_path / "settings.json").write_text("[1, 2]")  # not ours: one line, not an AttributeError
    with pytest.raises(UsageError, match="is not the settings file aflkd writes"):
        options.check_out_settings(str(tmp_path), mine, "a system run")


@needs_mpiexec
@pytest.mark.parametrize(
    "ranks, args, message",
    [
        (3, ["--topology", TOPOLOGY], "this job has 3 ranks but .*local-system.toml has 4"),
        (2, ["--topology", str(REPO / "hostfiles" / "local-1x2.toml")], "has no cloud host"),
        (5, ["--topology", str(REPO / "hostfiles" / "local-2x2.toml")], "has no cluster 'train' for the training rank"),
        (4, ["--topology", TOPOLOGY, "--student", "/nonexistent/s.pt"], "rank 0: student '/nonexistent/s.pt' does not exist"),
        (4, ["--topology", TOPOLOGY, "--interval", "-1"], "--interval must be >= 0"),
        (4, ["--topology", TOPOLOGY, "--control-cores", "4096"], "--control-cores 4096 is more than the"),
        (4, ["--topology", TOPOLOGY, "--updates", "9", "--increment", "64"], "--updates x --increment = 576 camera "
         "images, more than the 512 training images of synthetic"),
    ],
)
def test_bad_input_one_line_on_every_rank(tmp_path, ranks, args, message):
    import re

    proc = aflkd(ranks, "system", "--out", str(tmp_path / "o"), *args, timeout=90)
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr[-2000:]
    assert re.search(message, lines[0]), lines[0]


@needs_mpiexec
@pytest.mark.parametrize("option, trainer_first, rank", [("--out", True, 0), ("--out", False, 1),
                                                         ("--record", True, 0), ("--record", False, 0)])
def test_an_output_folder_that_is_a_file_is_one_line_on_every_rank(tmp_path, option, trainer_first, rank):
    """--out is checked on the training rank only, --record on it and the inference root: the other ranks must
    not hang, and the job prints one line (rank 0 prints it, even when another rank found it), exit 2."""
    topology = Path(TOPOLOGY)
    if not trainer_first:  # the training rank is rank 1, the inference root rank 0
        text = topology.read_text()
        trainer = text[text.index('[[host]]\nname = "trainer"'):text.index('[[host]]\nname = "infer-0"')]
        topology = tmp_path / "infer-first.toml"
        topology.write_text(text.replace(trainer, "").replace('[[host]]\nname = "infer-1"', trainer + '[[host]]\nname = "infer-1"'))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    folders = {"--out": str(tmp_path / "o"), "--record": str(tmp_path / "r")}
    folders[option] = str(blocker / "sub")
    proc = aflkd(4, "system", "--topology", str(topology), "--out", folders["--out"], "--record",
                 folders["--record"], "--no-progress", timeout=90)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"aflkd: error: rank {rank}: {option} {blocker / 'sub'}: cannot create the folder"), lines[0]
    assert "is a file" in lines[0], lines[0]


@needs_mpiexec
@pytest.mark.slow
def test_stalled_inference_root_ends_the_job_in_bounded_time(tmp_path):
    """The inference ranks stall 60 s after their first image; the trainer waits 8 s for them, then ends the job."""
    proc = aflkd(4, "system", "--topology", TOPOLOGY, "--out", str(tmp_path / "o"), "--interval", "60",
                 "--timeout", "8", "--updates", "1", "--increment", "16", "--steps", "1", "--threads", "1",
                 "--no-progress", timeout=80)
    assert proc.returncode != 0
    assert any("took no weights of generation 1 within 8 s" in line and "died or stalled" in line
               for line in error_lines(proc)), proc.stderr[-2000:]


@needs_mpiexec
@pytest.mark.slow
def test_an_update_longer_than_timeout_is_not_a_stall(tmp_path):
    """The trainer's heartbeats keep the inference root from taking a long update for a dead trainer."""
    out = tmp_path / "o"
    proc = aflkd(4, "system", "--topology", TOPOLOGY, "--out", str(out), "--images", "30", "--updates", "1",
                 "--increment", "32", "--steps", "40", "--threads", "1", "--timeout", "3", "--interval", "0.01",
                 "--no-progress", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "system.json").read_text())
    assert report["updates"][0]["update_s"] > 3  # longer than --timeout, so the heartbeats were needed


@needs_mpiexec
@pytest.mark.slow
def test_serving_longer_than_timeout_after_the_last_update_is_not_a_stall(tmp_path):
    """After "done" the trainer waits for the root's report while the root serves up to --images: the root's
    "serving" messages keep it from taking a long tail of images for a dead root."""
    out = tmp_path / "o"
    proc = aflkd(4, "system", "--topology", TOPOLOGY, "--out", str(out), "--images", "200", "--updates", "1",
                 "--increment", "16", "--steps", "1", "--threads", "1", "--timeout", "3", "--interval", "0.05",
                 "--no-progress", timeout=150)
    assert proc.returncode == 0, proc.stderr[-2000:]
    served = json.loads((out / "system.json").read_text())["served"]
    swapped = {s["generation"]: s["image"] for s in served["swaps"]}[1]
    assert served["images"] == 200
    assert (200 - swapped) * 0.05 > 3  # the tail after the last update took longer than --timeout
