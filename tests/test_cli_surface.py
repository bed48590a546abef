"""The user surface of ``aflkd``: help, net names, defaults, output paths, one-line errors, Ctrl-C.

Each test tells the story of a mistake a new user met (issue "The user surface").
"""
import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launch.cli import build_parser, main
from launch.options_table import leaf_commands as _commands
from tests.signals import sigint_as_from_a_terminal

REPO = Path(__file__).resolve().parent.parent


def _help_entries(text: str) -> dict:
    """Option -> its help text (continuation lines joined) from a rendered --help."""
    entries, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (-[-\w]+)", line)
        if m:
            current = m.group(1)
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


LEAVES = list(_commands(build_parser()))


@pytest.mark.parametrize("command, parser", LEAVES, ids=[" ".join(c) for c, _ in LEAVES])
def test_help_shows_each_default_once(command, parser):
    """Regression: '--weights ... (default even) (default: None)'; and many defaults were not shown at all."""
    entries = _help_entries(parser.format_help())
    for action in parser._actions:
        if not action.option_strings or action.required or action.nargs == 0 or action.default == argparse.SUPPRESS:
            continue  # flags, required options and --help have no default to show
        text = entries[action.option_strings[0]]
        assert text.count("(default") == 1, f"aflkd {' '.join(command)}: {text}"


def test_cli_dispatches_through_set_defaults():
    """Every command names its function: cli.py only wires the groups."""
    for command, parser in LEAVES:
        assert callable(parser.get_default("func")), command


@pytest.mark.parametrize("argv, attribute, value", [
    (["train", "edge", "--dataset", "cifar10", "--net", "edge3"], "net", 3),
    (["train", "edge", "--dataset", "cifar10", "--net", "3"], "net", 3),
    (["experiment", "frozen-time", "--dataset", "cifar10", "--net", "edge1"], "net", 1),
    (["experiment", "accuracy", "--dataset", "cifar10", "--out", "o", "--nets", "edge3,2,EDGE1"], "nets", [3, 2, 1]),
    (["bench", "layers", "--net", "3"], "net", "edge3"),
    (["bench", "layers", "--net", "edge2"], "net", "edge2"),
    (["bench", "layers", "--net", "cloud"], "net", "cloud"),
])
def test_net_is_named_the_same_way_everywhere(argv, attribute, value):
    """Regression: 'bench layers --net edge3' but 'train edge --net 3', each refusing the other's form."""
    assert getattr(build_parser().parse_args(argv), attribute) == value


def test_the_cloud_net_given_to_train_edge_names_train_cloud(capsys):
    assert main(["train", "edge", "--dataset", "cifar10", "--net", "cloud"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "edge net must be 1, 2 or 3 (or edge1, edge2, edge3), got 'cloud'" in line and "aflkd train cloud" in line


def test_data_root_defaults_to_the_checkouts_shared_data(tmp_path, monkeypatch):
    """Regression: --data-root defaulted to ../shared/data of the current folder."""
    monkeypatch.chdir(tmp_path)
    for argv in (["train", "edge"], ["train", "cloud"], ["experiment", "accuracy", "--out", "o"],
                 ["experiment", "frozen-time"]):
        args = build_parser().parse_args(argv + ["--dataset", "cifar10"])
        assert Path(args.data_root) == (REPO.parent / "shared" / "data").resolve()


def test_training_defaults_come_from_the_configs():
    """Regression: TeacherConfig said 20 epochs and EdgeConfig 1500 steps while the CLI said 18 and 200."""
    from dataclasses import fields

    from kd.teacher import TeacherConfig
    from kd.trainer import EdgeConfig

    parse = build_parser().parse_args
    cloud = parse(["train", "cloud", "--dataset", "cifar10"])
    for f in fields(TeacherConfig):
        if hasattr(cloud, f.name):
            assert getattr(cloud, f.name) == f.default, f.name
    for argv in (["train", "edge"], ["experiment", "accuracy", "--out", "o"]):
        args = parse(argv + ["--dataset", "cifar10"])
        for name in ("steps", "t_rule", "unit"):
            assert getattr(args, name) == getattr(EdgeConfig, name), (argv, name)


@pytest.mark.parametrize("weights, message", [
    ("0,1", "every value must be a finite number > 0, got '0,1'"),
    ("-2,1", "every value must be a finite number > 0, got '-2,1'"),
    ("nan,1", "every value must be a finite number > 0, got 'nan,1'"),
    ("1,inf", "every value must be a finite number > 0, got '1,inf'"),
    ("1,,1", "must be comma-separated numbers like 2,1,1, got '1,,1'"),
])
def test_bad_weights_are_refused_before_any_work(weights, message, capsys):
    """Regression: negative, zero and NaN weights were taken and died later with a traceback."""
    assert main(["bench", "layers", f"--weights={weights}"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("aflkd: error: argument --weights: ") and message in line


def test_experiment_accuracy_needs_an_explicit_out(monkeypatch, capsys):
    """Regression: with no options it quietly started a 48-cell grid writing into results/."""
    import kd.experiments

    def no_grid(*args, **kwargs):
        raise AssertionError("a grid started")

    monkeypatch.setattr(kd.experiments, "run_grid", no_grid)
    assert main(["experiment", "accuracy", "--dataset", "cifar10"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "the following arguments are required: --out" in line


def test_missing_dataset_offers_download_only_where_there_is_one(tmp_path, capsys):
    """Regression: 'train edge' was told to 'pass --download', an option it does not have."""
    empty = str(tmp_path)
    assert main(["train", "edge", "--dataset", "cifar100", "--data-root", empty]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "dataset 'cifar100' not found" in line and "--download" not in line
    assert main(["experiment", "accuracy", "--dataset", "cifar100", "--data-root", empty,
                 "--out", str(tmp_path / "o")]) == 2
    assert "--download" not in capsys.readouterr().err
    assert main(["train", "cloud", "--dataset", "cifar100", "--data-root", empty, "--save", str(tmp_path / "c.pt"),
                 "--results", str(tmp_path / "t.csv")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "dataset 'cifar100' not found" in line and line.endswith("or pass --download to fetch it")


@pytest.fixture
def tiny_data(monkeypatch):
    import kd.datasets
    from tests.test_teacher import tiny

    monkeypatch.setattr(kd.datasets, "load_dataset", lambda name, root, download=False: tiny(n=60))


@pytest.fixture
def teacher(tmp_path):
    from models import cloud_net, save_atomic

    path = tmp_path / "teacher.pt"
    save_atomic(cloud_net(3, 32, 3).state_dict(), str(path))  # tiny: 3 channels, 3 classes
    return str(path)


def test_train_edge_with_five_steps_and_accuracy_in_percent(tiny_data, teacher, tmp_path, capsys):
    """Regression: '--steps 5' died with ZeroDivisionError inside OneCycleLR (steps 1-4 and 6-8 worked),
    and accuracy was printed as a fraction (0.8772) where every table shows %."""
    out = tmp_path / "new" / "folder" / "student.pt"  # a folder that does not exist yet
    assert main(["train", "edge", "--dataset", "cifar10", "--teacher", teacher, "--net", "edge1", "--size", "30",
                 "--steps", "5", "--no-progress", "--save", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()
    assert re.search(r"5 steps: test accuracy \d+\.\d\d% \(", last[-2]), last[-2]
    assert out.exists()


def test_grid_with_five_steps_and_no_header_only_csv_on_failure(tiny_data, teacher, tmp_path, monkeypatch, capsys):
    """Regression: 'experiment accuracy --steps 5' died in OneCycleLR and left a CSV holding only a header."""
    import kd.experiments

    out = tmp_path / "grid"
    real = kd.experiments.train_edge

    def fail(*args, **kwargs):
        raise RuntimeError("the first cell dies")

    monkeypatch.setattr(kd.experiments, "train_edge", fail)
    with pytest.raises(RuntimeError):
        main(["experiment", "accuracy", "--dataset", "cifar10", "--teacher", teacher, "--nets", "1",
              "--sizes", "30", "--methods", "baseline", "--steps", "3", "--out", str(out), "--no-progress"])
    assert not (out / "accuracy-cifar10.csv").exists() and not (out / "accuracy-cifar10.settings.json").exists()
    monkeypatch.setattr(kd.experiments, "train_edge", real)
    # the same folder, other settings: nothing was finished there, so nothing binds
    assert main(["experiment", "accuracy", "--dataset", "cifar10", "--teacher", teacher, "--nets", "1",
                 "--sizes", "30", "--methods", "baseline,aflkd", "--steps", "5", "--out", str(out),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "2 cell(s) to train (incremental), 0 already in" in text
    assert len((out / "accuracy-cifar10.csv").read_text().splitlines()) == 3


def test_one_cycle_schedule_takes_every_small_step_count():
    """OneCycleLR divides 0 by 0 when its warm-up is exactly one step (5 steps at 20%, 4 at 25%)."""
    import torch

    from kd.schedule import one_cycle

    for pct in (0.2, 0.25):
        for steps in range(1, 13):
            optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
            schedule = one_cycle(optimizer, 0.1, steps, pct_start=pct)
            used = []
            for _ in range(steps):  # as the trainers do: step() after every optimiser step, the last included
                used.append(optimizer.param_groups[0]["lr"])
                optimizer.step()
                schedule.step()
            assert max(used) <= 0.1 + 1e-12 and used[-1] == pytest.approx(0.1 / 1000), (pct, steps, used)


def test_train_average_prints_accuracy_in_percent(tiny_data, tmp_path, capsys):
    import torch

    from models import cloud_net, save_atomic

    paths = []
    for seed in range(2):
        torch.manual_seed(seed)
        paths.append(str(tmp_path / f"n{seed}.pt"))
        save_atomic(cloud_net(3, 32, 3).state_dict(), paths[-1])
    assert main(["train", "average", "--dataset", "cifar10", *paths, "--save", str(tmp_path / "a" / "avg.pt"),
                 "--results", str(tmp_path / "r" / "teachers.csv")]) == 0
    assert re.search(r"average of 2 nets, test accuracy \d+\.\d\d% ->", capsys.readouterr().out)


@pytest.mark.parametrize("argv", [
    ["experiment", "frozen-time", "--dataset", "cifar10", "--csv", "{file}/x.csv"],
    ["experiment", "accuracy", "--dataset", "cifar10", "--methods", "baseline", "--out", "{file}/grid"],
    ["train", "edge", "--dataset", "cifar10", "--method", "baseline", "--save", "{file}/s.pt"],
    ["train", "cloud", "--dataset", "cifar10", "--save", "{file}/c.pt"],
])
def test_output_under_a_file_is_refused_in_one_line_before_work(argv, tiny_data, tmp_path, monkeypatch, capsys):
    """An output folder that cannot be made is refused before training, not after it with a traceback."""
    import kd.experiments  # imported now, so its own name for train_edge is the real one after this test
    import kd.trainer

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(kd.trainer, "train_edge", no_training)
    monkeypatch.setattr(kd.experiments, "train_edge", no_training)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main([a.replace("{file}", str(blocker)) for a in argv]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert re.search(f"cannot create the folder {blocker}.*: {blocker} is a file, not a folder", line), line


def test_frozen_time_csv_into_a_new_folder(tiny_data, teacher, tmp_path, capsys):
    csv_path = tmp_path / "new" / "frozen.csv"
    assert main(["experiment", "frozen-time", "--dataset", "cifar10", "--teacher", teacher, "--net", "1",
                 "--size", "30", "--steps", "2", "--csv", str(csv_path)]) == 0
    assert csv_path.read_text().startswith("net,frozen,units,epoch_seconds")


def test_ctrl_c_is_one_line_and_exit_130(tmp_path):
    """Regression: Ctrl-C printed a KeyboardInterrupt traceback."""
    script = tmp_path / "interrupt.py"
    script.write_text(
        "import os, signal, sys\n"
        "import kd.teacher\n"
        "from launch.cli import main\n"
        "def interrupted(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGINT)  # as the terminal does on Ctrl-C\n"
        "    signal.pause()\n"
        "kd.teacher.step_throughput = interrupted\n"
        "sys.exit(main(['bench', 'train-step', '--steps', '1']))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=REPO, env=env,
                          preexec_fn=sigint_as_from_a_terminal)
    assert proc.returncode == 130, proc.stderr  # 128 + SIGINT, the shell's convention
    assert proc.stderr.strip() == "aflkd: interrupted"


def test_train_cloud_prints_accuracy_in_percent(tiny_data, tmp_path, capsys):
    out, results = tmp_path / "c" / "cloud.pt", tmp_path / "r" / "teachers.csv"
    assert main(["train", "cloud", "--dataset", "cifar10", "--epochs", "1", "--batch", "16", "--no-progress",
                 "--save", str(out), "--results", str(results)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"epoch 1/1: loss \d+\.\d+, test acc \d+\.\d\d%, ", text), text
    assert re.search(r"cifar10: test accuracy \d+\.\d\d% after 1 epochs", text), text
    assert results.exists()


def test_aflkd_test_refuses_zero_ranks_in_one_line(capsys):
    assert main(["test", "--mpi-sizes", "2,0"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "argument --mpi-sizes: every value must be >= 1, got '2,0'" in line


def test_ctrl_c_during_aflkd_test_stops_the_run_it_started(tmp_path):
    """The suite's pytest and mpiexec runs sit in their own session (so a timeout can kill them whole),
    where the terminal's Ctrl-C does not reach them: 'aflkd test' must end them itself."""
    pid_file = tmp_path / "child.pid"
    script = tmp_path / "interrupt.py"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    script.write_text(
        "import os, signal, sys\n"
        "from launch import testsuite\n"
        "signal.signal(signal.SIGALRM, lambda *a: os.kill(os.getpid(), signal.SIGINT))  # Ctrl-C in 3 s\n"
        "signal.alarm(3)\n"
        "try:\n"
        f"    testsuite._run([sys.executable, '-c', {child!r}], timeout=100)\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(130)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=REPO, env=env,
                          preexec_fn=sigint_as_from_a_terminal)
    assert proc.returncode == 130, proc.stderr
    child = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # gone (and reaped), not left running on its own
