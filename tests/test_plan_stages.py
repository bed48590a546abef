"""``aflkd plan`` with the stage partitioner: every rank's rows and layers, checked against the topology."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch.topology import load_topology
from models import build_model
from runtime.graph import trace_model
from runtime.stages import split_layers

REPO = Path(__file__).resolve().parent.parent


def _fake_profile(path: Path, net: str, size: int, seconds) -> None:
    layers = split_layers(trace_model(build_model(net, size=size).eval(), (3, size, size)))
    labels = [layer.label for layer in layers.layers]
    out = [layer.out_shape[0] * layer.out_shape[1] * layer.out_shape[2] * 4 for layer in layers.layers]
    path.write_text(json.dumps(dict(net=net, size=size, batch=1, threads=1, host="test", labels=labels,
                                    seconds=[seconds(i) for i in range(len(labels))], out_bytes=out,
                                    head_seconds=0.0)))


def _plan(tmp_path, *extra):
    done = subprocess.run([sys.executable, "-m", "launch.cli", "plan", "--hostfile-dir", str(tmp_path / "hf"),
                           "--json", str(tmp_path / "plan.json"), *extra], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    return done


@pytest.mark.parametrize("topology", ["testbed.toml", "testbed-2clusters.toml", "local-2x2.toml", "local-1x2.toml"])
def test_plan_covers_every_row_and_layer_once(tmp_path, topology):
    profile = tmp_path / "profile.json"
    _fake_profile(profile, "edge3", 64, lambda i: 1e-3 * (1 + i % 3))
    done = _plan(tmp_path, "--topology", f"hostfiles/{topology}", "--net", "edge3", "--size", "64",
                 "--profile", str(profile))
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "plan.json").read_text())
    topo = load_topology(REPO / "hostfiles" / topology)
    stages = report["stages_plan"]
    bounds = stages["bounds"]
    assert bounds[0] == 0 and bounds[-1] == 33 and len(bounds) == topo.stages + 1
    assert all(a < b for a, b in zip(bounds, bounds[1:]))
    for k, rows in enumerate(stages["input_rows"]):  # the clusters' bands tile the stage's input map
        assert rows[0][0] == 0 and rows[-1][1] == rows[0][2]
        assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    ranks = report["ranks"]
    assert [r["rank"] for r in ranks] == list(range(topo.size))
    assert ranks[0]["role"] == "master" and ranks[0]["cluster"] == 0 and "+ head" in ranks[0]["layers"]
    for r in ranks:
        layers = int(r["layers"].split("(")[1].split(")")[0])
        assert layers == bounds[r["stage"] + 1] - bounds[r["stage"]]
    assert "input rows" in done.stdout and "planned ms/image" in done.stdout
    # the footer says the plan's own row shares (it printed the speeds' shares, contradicting the plan)
    shares = ", ".join(f"{v:.1%}" for v in stages["shares"])
    assert f"planned shares of the rows: {shares}" in done.stdout, done.stdout


def test_plan_puts_fewer_layers_on_a_slow_board(tmp_path):
    """local-1x2: the master is twice as fast as the worker, so with equal layer costs it takes about 2/3."""
    profile = tmp_path / "profile.json"
    _fake_profile(profile, "edge3", 64, lambda i: 1e-3)
    topo = load_topology(REPO / "hostfiles" / "local-1x2.toml")
    speeds = [r.speed for r in topo.ranks()]
    done = _plan(tmp_path, "--topology", "hostfiles/local-1x2.toml", "--net", "edge3", "--size", "64",
                 "--profile", str(profile), "--bandwidth", "1e9")
    assert done.returncode == 0, done.stderr
    bounds = json.loads((tmp_path / "plan.json").read_text())["stages_plan"]["bounds"]
    first = bounds[1] / 33
    assert abs(first - speeds[0] / sum(speeds)) < 0.05, (bounds, speeds)


def test_plan_refuses_a_profile_of_another_net(tmp_path):
    profile = tmp_path / "profile.json"
    _fake_profile(profile, "edge1", 64, lambda i: 1e-3)
    done = _plan(tmp_path, "--topology", "hostfiles/local-1x2.toml", "--net", "edge3", "--size", "64",
                 "--profile", str(profile))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "rerun 'aflkd profile'" in done.stderr
