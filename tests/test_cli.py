"""The ``aflkd`` command under mpiexec: bad input gives one clear line, non-zero exit, no hang."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.cli import main
from models import build_net

MPIEXEC = Path(sys.executable).parent / "mpiexec"
needs_mpiexec = pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec beside this Python")


def aflkd(ranks: int, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run ``mpiexec -n ranks python -m launch.cli ...``; a hang fails the test by timeout."""
    cmd = [str(MPIEXEC), "-n", str(ranks), sys.executable, "-m", "launch.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parent.parent)


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("aflkd: error:")]


@needs_mpiexec
@pytest.mark.parametrize(
    "ranks, args, message",
    [
        (2, ["--net", "edge9"], r"unknown net 'edge9'; choose one of edge1, edge2, edge3 \(or 1, 2, 3\), cloud"),
        (2, ["--net", "tv:resnet19"], r"torchvision has no classification model 'resnet19'"),
        (2, ["--net", "tv:vit_b_16", "--size", "224"], r"node '.*' \(.*\) is not supported by height-split"),
        (2, ["--net", "edge3", "--size", "4"], "input size 4 is too small for 3 pooling blocks"),
        (3, ["--net", "edge1", "--size", "2"], r"3 ranks with weights .* leave rank\(s\) \[0\] without rows of the 2-row input"),
        (2, ["--weights", "1,2,3"], "got 3 rank weights for 2 ranks"),
        (2, ["--weights", "1,x"], "--weights: must be comma-separated numbers"),
        (2, ["--weights=-1,1"], "--weights: every value must be a finite number > 0, got '-1,1'"),
        (2, ["--json", "/dev/null/r.json"], "--json /dev/null/r.json: cannot create the folder /dev/null: /dev/null is a file, not a folder"),
        (2, ["--checkpoint", "/nonexistent/model.pt"], "checkpoint '/nonexistent/model.pt' does not exist"),
        (2, ["--repeat", "0"], "argument --repeat: must be >= 1, got 0"),
        (2, ["--plot", "out/x.txt"], r"--plot out/x.txt ends in .txt, not an image format: name it .png"),
        (2, ["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_input_is_one_line_and_nonzero_on_every_rank(ranks, args, message):
    proc = aflkd(ranks, "bench", "layers", "--size", "32", "--repeat", "1", "--no-progress", *args)
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr
    import re

    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in proc.stderr


@needs_mpiexec
def test_checkpoint_of_another_net_is_rejected(tmp_path):
    path = tmp_path / "edge1.pt"
    torch.save(build_net("edge1", 3, 32, 10).state_dict(), path)
    proc = aflkd(2, "bench", "layers", "--net", "edge2", "--size", "32", "--checkpoint", str(path), "--no-progress")
    assert proc.returncode != 0
    (line,) = error_lines(proc)
    assert f"checkpoint '{path}' does not match the net" in line and "check --net, --size" in line


@needs_mpiexec
def test_exception_on_one_rank_ends_the_job(tmp_path):
    """Regression: a rank that dies must not leave its peers waiting in the next exchange."""
    script = tmp_path / "die.py"
    script.write_text(
        "from mpi4py import MPI\n"
        "from runtime.transport import abort_on_uncaught_exception\n"
        "abort_on_uncaught_exception()\n"
        "if MPI.COMM_WORLD.rank == 1:\n"
        "    raise RuntimeError('boom on rank 1')\n"
        "MPI.COMM_WORLD.Barrier()\n"
    )
    proc = subprocess.run([str(MPIEXEC), "-n", "3", sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).parent.parent)
    assert proc.returncode != 0
    assert "boom on rank 1" in proc.stderr and "[rank 1]" in proc.stderr


@needs_mpiexec
def test_bench_writes_table_csv_json_and_plot(tmp_path):
    out = tmp_path
    proc = aflkd(2, "bench", "layers", "--net", "edge2", "--size", "32", "--repeat", "2", "--warmup", "1",
                 "--weights", "2,1", "--json", str(out / "r.json"), "--csv", str(out / "r.csv"),
                 "--plot", str(out / "r.png"), "--instructions", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "efficiency (bound / split" in proc.stdout and "conv1_1" in proc.stdout
    assert "persistent request" not in proc.stderr, proc.stderr  # MPICH names each one left unfreed at the end
    report = json.loads((out / "r.json").read_text())
    assert 0 < report["exchange_free_ms"] and 0 < report["exchange_efficiency"]
    # per rank and kind: messages only in the split; the no-message pass and the bound run every compute kind
    kinds = {(r["rank"], r["kind"]): r for r in report["instructions"]}
    assert {rank for rank, _ in kinds} == {0, 1} and "instruction" in proc.stdout and "no msgs" in proc.stdout
    for rank in (0, 1):
        for kind in ("PostHalo", "AwaitHalo"):
            assert kinds[rank, kind]["split_ms"] > 0 and kinds[rank, kind]["no_messages_ms"] is None
            assert kinds[rank, kind]["bound_ms"] is None
        window = kinds[rank, "Window"]
        assert all(window[f"{phase}_ms"] > 0 for phase in ("split", "no_messages", "bound"))
    for key in ("net", "size", "ranks", "unsplit_ms", "split_ms", "bound_ms", "efficiency", "max_abs_error", "layers"):
        assert key in report
    assert report["ranks"] == 2 and report["weights"] == [2.0, 1.0]
    assert report["max_abs_error"] <= 1e-5
    gather = [h for h in report["heads"] if h["head"] == "gather"]
    assert gather and report["end_to_end_ms"] == gather[0]["end_to_end_ms"]  # one end-to-end figure, not two
    for layer in report["layers"]:
        assert set(layer) >= {"name", "unsplit_ms", "split_ms", "halo_ms", "bytes", "bytes_min"}
        assert layer["bytes"] == layer["bytes_min"]
    assert sum(layer["bytes"] for layer in report["layers"]) > 0
    assert (out / "r.csv").read_text().startswith("node,op,unsplit_ms,split_ms,halo_ms,bytes,bytes_min")
    assert (out / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert len(report["peak_rss_mb"]) == 2 and all(m > 0 for m in report["peak_rss_mb"])
    assert report["unsplit_peak_rss_mb"] > 0
    assert report["all_cores_threads"] == 2 * report["threads_per_rank"] and report["unsplit_all_cores_ms"] > 0


@needs_mpiexec
def test_bench_runs_a_torchvision_net(tmp_path):
    proc = aflkd(2, "bench", "layers", "--net", "tv:resnet18", "--size", "64", "--repeat", "1", "--warmup", "0",
                 "--json", str(tmp_path / "r.json"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["max_abs_error"] <= 1e-4 and "layer1_0_conv1" in proc.stdout
    assert all(layer["bytes"] == layer["bytes_min"] for layer in report["layers"])


@needs_mpiexec
def test_bench_without_a_bound_writes_null_and_says_why(tmp_path):
    """Old code wrote "bound_ms": NaN (not JSON) when a rank's rows alone do not run through the net."""
    proc = aflkd(3, "bench", "layers", "--net", "edge3", "--size", "8", "--repeat", "1", "--warmup", "0",
                 "--head", "gather", "--json", str(tmp_path / "r.json"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and json.loads(text)["bound_ms"] is None and json.loads(text)["efficiency"] is None
    assert "note: no bound" in proc.stdout and "oversubscribes" in proc.stdout


def test_bench_on_one_rank_says_so(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "bench", "layers", "--net", "edge1", "--size", "32",
                           "--repeat", "1", "--warmup", "0", "--head", "gather", "--no-progress"], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "note: one rank (started without mpiexec?)" in proc.stdout


def test_help_explains_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "layers", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "efficiency = bound / split" in text and "--weights" in text


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "bench" in capsys.readouterr().out


def test_bench_train_step_prints_images_per_second(capsys):
    assert main(["bench", "train-step", "--batch", "4", "--steps", "2", "--warmup", "1", "--threads", "1",
                 "--classes", "100"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("cloud net training step, batch 4, 1 thread(s), eager: median")
    assert float(line.split("= ")[1].split()[0]) > 0


def test_bench_train_step_rejects_zero_steps(capsys):
    assert main(["bench", "train-step", "--steps", "0"]) == 2
    assert "argument --steps: must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["bench", "train-step"], ["bench", "layers"]] + [
    [group, what, "--dataset", "fashion-mnist"]
    for group, what in [("train", "cloud"), ("train", "edge"), ("experiment", "accuracy"), ("experiment", "frozen-time")]])
def test_every_command_rejects_zero_threads_in_one_line(command, capsys):
    assert main(command + ["--threads", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aflkd: error: argument --threads: must be >= 1, got 0") and "\n" not in err


def test_train_cloud_will_not_overwrite_a_checkpoint_it_cannot_resume(tmp_path, capsys):
    out = tmp_path / "cloud.pt"
    out.write_bytes(b"a shipped teacher")
    assert main(["train", "cloud", "--dataset", "fashion-mnist", "--save", str(out)]) == 2
    assert "exists and there is no" in capsys.readouterr().err and out.read_bytes() == b"a shipped teacher"


@pytest.mark.parametrize("argv, message", [
    (["experiment", "accuracy", "--nets", "1,4", "--methods", "baseline"], "edge net must be 1, 2 or 3 (or edge1, edge2, edge3), got '4'"),
    (["experiment", "accuracy", "--sizes", "2,30", "--methods", "baseline"],
     "--sizes must be between 3 (one image per class) and 60 (the training split), got 2"),
    (["experiment", "accuracy", "--steps", "0", "--methods", "baseline"], "--steps: must be >= 1, got 0"),
    (["experiment", "frozen-time", "--steps", "0"], "--steps: must be >= 1, got 0"),
    (["train", "edge", "--size", "61"], "--size must be between 3 (one image per class) and 60"),
    (["train", "cloud", "--max-lr", "0"], "--max-lr: must be a number > 0, got 0"),
    (["train", "cloud", "--epochs", "2", "--swa-epochs", "3"], "--swa-epochs must be between 0 and --epochs (2), got 3"),
    (["train", "cloud", "--swa-epochs", "1", "--swa-lr", "0"], "--swa-lr: must be a number > 0, got 0"),
])
def test_bad_training_options_fail_in_one_line_before_training(argv, message, tmp_path, monkeypatch, capsys):
    import kd.datasets
    from tests.test_teacher import tiny

    monkeypatch.setattr(kd.datasets, "load_dataset", lambda name, root, download=False: tiny(n=60))
    out = "--save" if argv[0] == "train" else "--out"  # a weights file, or a results folder
    assert main(argv[:2] + ["--dataset", "fashion-mnist", out, str(tmp_path / "o")] * (argv[1] != "frozen-time")
                + ["--dataset", "fashion-mnist"] * (argv[1] == "frozen-time") + argv[2:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_teacher_of_another_dataset_names_the_option_to_fix(tmp_path, monkeypatch, capsys):
    import kd.datasets
    from models import cloud_net, save_atomic
    from tests.test_teacher import tiny

    monkeypatch.setattr(kd.datasets, "load_dataset", lambda name, root, download=False: tiny(n=60))
    path = tmp_path / "ten-classes.pt"
    save_atomic(cloud_net(3, 32, 10).state_dict(), str(path))  # tiny has 3 classes
    assert main(["train", "edge", "--dataset", "fashion-mnist", "--teacher", str(path), "--size", "30"]) == 2
    assert capsys.readouterr().err.strip().endswith("--teacher must be a cloud net trained on tiny")


def test_train_average_records_the_average_and_keeps_an_existing_out(tmp_path, monkeypatch, capsys):
    import csv

    import kd.datasets
    from models import cloud_net, save_atomic
    from tests.test_teacher import tiny

    monkeypatch.setattr(kd.datasets, "load_dataset", lambda name, root, download=False: tiny(n=60))
    paths = []
    for seed in range(2):
        torch.manual_seed(seed)
        paths.append(str(tmp_path / f"n{seed}.pt"))
        save_atomic(cloud_net(3, 32, 3).state_dict(), paths[-1])
    out, results = tmp_path / "avg.pt", tmp_path / "teachers.csv"
    assert main(["train", "average", "--dataset", "fashion-mnist", *paths, "--save", str(out),
                 "--results", str(results)]) == 0
    assert "average of 2 nets, test accuracy" in capsys.readouterr().out
    (row,) = list(csv.DictReader(open(results)))
    assert row["dataset"] == "fashion-mnist" and row["epochs"] == "" and "train average" in row["command"]
    before = out.read_bytes()
    assert main(["train", "average", "--dataset", "fashion-mnist", *paths, "--save", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before


@needs_mpiexec
def test_the_help_example_writes_into_an_out_folder_that_does_not_exist(tmp_path):
    """Regression: the example in 'aflkd --help' ran the whole benchmark, then died with a traceback
    and MPI_Abort because out/ did not exist.  Run as written (smaller and shorter), from an empty folder."""
    import os
    import shlex

    from launch.cli import EXAMPLES

    (line,) = [l for l in EXAMPLES.splitlines() if "--json out/" in l]
    words = shlex.split(line.split("#")[0])
    assert words[:3] == [".venv/bin/mpiexec", "-n", "3"] and words[3] == ".venv/bin/aflkd"
    cmd = [str(MPIEXEC), "-n", "3", sys.executable, "-m", "launch.cli", *words[4:],
           "--size", "32", "--repeat", "1", "--warmup", "0", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "out" / "bench.json").read_text())["weights"] == [2.0, 1.0, 1.0]
    assert (tmp_path / "out" / "fig10.png").read_bytes()[:4] == b"\x89PNG"


@needs_mpiexec
def test_ctrl_c_under_mpiexec_ends_every_rank_with_one_line(tmp_path):
    """Regression: Ctrl-C printed a KeyboardInterrupt traceback; and a rank that finalized MPI on Ctrl-C
    left a peer blocked in an exchange with it, so the job hung."""
    import os
    import signal

    cmd = [str(MPIEXEC), "-n", "2", sys.executable, "-m", "launch.cli", "serve", "--net", "edge1", "--size", "64",
           "--images", "1000000", "--log", str(tmp_path / "s.db"), "--interval", "0.2"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env=env)
    try:
        first = proc.stderr.read(1)  # the first progress line: the ranks are in the serving loop
        proc.send_signal(signal.SIGINT)  # what mpiexec forwards to every rank on Ctrl-C
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = (first + err).decode()
    assert proc.returncode == 130, err
    assert "aflkd: interrupted" in err and "Traceback" not in err
