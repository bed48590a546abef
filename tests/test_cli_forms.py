"""Option forms every command shares: ``--net`` as 3 or edge3 everywhere, and type errors that give a reason."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.cli import build_parser

REPO = Path(__file__).parent.parent


@pytest.mark.parametrize("argv", [
    ["control", "--dataset", "cifar10"],
    ["train", "edge", "--dataset", "cifar10"],
    ["system", "--dataset", "cifar10", "--topology", "t.toml", "--out", "o"],
    ["experiment", "frozen-time", "--dataset", "cifar10"],
])
@pytest.mark.parametrize("form", ["3", "edge3", "EDGE3"])
def test_every_edge_net_option_takes_both_forms(argv, form):
    assert build_parser().parse_args([*argv, "--net", form]).net == 3


def test_a_bad_ratio_names_the_option_and_the_reason():
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "schedule", "simulate", "--ratio", "1-1"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("aflkd: error: argument --ratio:") and "Comp:Comm" in line and "_ratios" not in line


def _aflkd(*argv, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "launch.cli", *argv], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("name, why", [("fig.txt", "ends in .txt, not an image format"), ("fig", "has no extension")])
def test_a_plot_file_matplotlib_would_not_write_as_named_is_refused_before_any_work(tmp_path, name, why):
    """matplotlib raised on an unknown extension only after the whole run, and wrote FILE.png for FILE."""
    plot = tmp_path / "sub" / name
    proc = _aflkd("schedule", "simulate", "--c-totals", "6", "--plot", str(plot), "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"aflkd: error: --plot {plot} {why}: name it .png, .pdf or .svg (matplotlib writes ")
    listed = line.split("matplotlib writes ")[1].rstrip(")").split(", ")
    assert {"pdf", "png", "svg"} <= set(listed) and not {"pgf", "raw", "rgba"} & set(listed)  # files to look at
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "sub").exists()  # refused before any work


def test_an_unknown_option_points_to_the_subcommands_help():
    proc = _aflkd("train", "edge", "--dataset", "cifar10", "--epochs", "3")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "aflkd: error: unrecognized arguments: --epochs 3 (see 'aflkd train edge --help')"]


def test_help_and_refusals_answer_without_importing_torch():
    code = ("import sys\nfrom launch.cli import main\n"
            "for argv in (['--help'], ['schedule', '--help'], ['train', 'edge', '--dataset', 'x', '--epochs', '3']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "False", proc.stderr[-2000:]


@pytest.mark.parametrize("argv", [["schedule", "--help"], ["control", "--help"], ["system", "--help"]])
def test_help_reads_as_text(argv):
    out = _aflkd(*argv).stdout
    assert "``" not in out  # docstrings' reST literals read 'x'
    if "--data-root DATA_ROOT\n" in out:
        entry = out.split("--data-root DATA_ROOT\n", 1)[1].split("\n  --", 1)[0]
        assert entry.count("(default") == 1  # the default data root is said once


@pytest.mark.parametrize("argv", [["train", "edge", "--dataset", "cifar10"], ["update", "status", "--buffer", "b"],
                                  ["experiment", "accuracy", "--dataset", "cifar10", "--out", "o"]])
def test_one_process_commands_are_refused_under_mpiexec_instead_of_running_on_every_rank(argv, tmp_path):
    proc = subprocess.run([str(Path(sys.executable).parent / "mpiexec"), "-n", "2", sys.executable, "-m", "launch.cli", *argv], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("aflkd")]
    assert lines == [f"aflkd: error: 'aflkd {' '.join(argv[:2])}' runs as one process: start it without mpiexec "
                     f"(this job has 2 ranks)"]
    assert not (tmp_path / "o").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("after_s", [0.3, 1.0])  # (earlier, SIGINT lands in Python's own start-up: not ours)
def test_ctrl_c_while_starting_is_one_line_not_a_traceback(after_s):
    """Regression: SIGINT during start-up printed tracebacks from the imports.  The console script's own
    import is now a few modules (torch loads inside main, where Ctrl-C is one line); caught during and after
    torch's import.  Before about 0.1 s the signal lands in the interpreter's own start-up (site), which no
    code of ours can catch."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-c", "import sys; from launch.entry import run; "  # the script's code
                             "sys.argv[1:] = ['bench', 'train-step', '--threads', '1']; sys.exit(run())"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a background job
    time.sleep(after_s)                                                # inherits SIGINT ignored: undo that
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err[-3000:]
    assert proc.returncode in (130, -signal.SIGINT) and (proc.returncode != 130 or "aflkd: interrupted" in err)


def _help_examples():
    """Every ``.venv/bin/aflkd ...`` example in a command's --help (continuation lines joined, comments cut)."""
    import argparse
    import re

    def parsers(parser, path=()):
        yield path, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from parsers(sub, (*path, name))

    found = []
    for path, parser in parsers(build_parser()):
        text = re.sub(r"\\\n\s*", " ", f"{parser.epilog or ''}\n{parser.description or ''}")
        for line in text.splitlines():
            match = re.search(r"\.venv/bin/aflkd\s+(.*)", line)
            if match:
                found.append((" ".join(path), match.group(1).split(" #")[0].strip()))
    return found


def test_every_example_in_the_help_parses():
    """A help example that names an option the command does not have (it once showed --cores for --c-totals)."""
    import shlex

    examples = _help_examples()
    assert len(examples) >= 40
    for where, example in examples:
        try:
            build_parser().parse_args(shlex.split(example))
        except (SystemExit, Exception) as err:  # noqa: BLE001 -- argparse exits, our parser raises UsageError
            raise AssertionError(f"'aflkd {where} --help' shows '{example}', which does not parse: {err!r}")
