"""Option forms every command shares: ``--net`` as 3 or edge3 everywhere, and type errors that give a reason."""
from __future__ import annotations

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
