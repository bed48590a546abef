"""``aflkd bench pipeline`` and ``aflkd profile`` as users run them: JSON fields, exact outputs, one-line refusals."""
import json

import pytest

from tests.test_cli import aflkd, error_lines, needs_mpiexec

FIELDS = {"stages", "images", "throughput_ratio", "balance_planned", "balance_measured",
          "equal_split_balance_measured", "max_abs_error", "one_rank_images_per_s", "latency_ms", "runs"}


@needs_mpiexec
def test_bench_pipeline_json_and_plot(tmp_path):
    out = tmp_path / "deep" / "pipe.json"
    proc = aflkd(2, "bench", "pipeline", "--net", "edge2", "--size", "32", "--images", "3", "--latency-repeat", "1",
                 "--speeds", "2,1", "--json", str(out), "--plot", str(tmp_path / "pipe.png"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert FIELDS <= set(report)
    assert report["stages"] == 2 and report["images"] == 3 and report["speeds"] == [1.0, 0.5]
    assert report["max_abs_error"] <= 1e-5
    cuts = [run["cut"] for run in report["runs"]]
    assert cuts in (["planned", "equal layers"], ["planned", "equal layers", "re-planned"])
    # the re-plan from the measured busy times: run only when its cut differs from the planned one
    assert (report["replanned_bounds"] != report["runs"][0]["bounds"]) == (len(cuts) == 3)
    if len(cuts) == 3:
        assert report["runs"][2]["bounds"] == report["replanned_bounds"] and "re-planned" in proc.stdout
    assert all(sum(run["layers_per_stage"]) == report["layers"] for run in report["runs"])
    assert (tmp_path / "pipe.png").stat().st_size > 1000
    assert "throughput ratio" in proc.stdout and "equal layers" in proc.stdout


@needs_mpiexec
def test_bench_pipeline_with_a_topology_and_a_profile(tmp_path):
    profile = tmp_path / "p.json"
    proc = aflkd(1, "profile", "--net", "edge1", "--size", "32", "--repeat", "1", "--json", str(profile))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(profile.read_text())["labels"][0] == "conv1_1"
    proc = aflkd(4, "bench", "pipeline", "--net", "edge1", "--size", "32", "--images", "2", "--latency-repeat", "1",
                 "--topology", "hostfiles/local-2x2.toml", "--profile", str(profile), "--json", str(tmp_path / "b.json"),
                 timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["clusters"] == 2 and report["stages"] == 2 and report["max_abs_error"] <= 1e-5


@needs_mpiexec
@pytest.mark.parametrize("ranks, args, message", [
    (2, ["--topology", "hostfiles/local-2x2.toml"], "mpiexec -n"),
    (3, ["--clusters", "2"], "does not divide"),
    (2, ["--speeds", "1,1,1"], "one per rank"),
    (2, ["--profile", "/nonexistent/p.json"], "aflkd profile"),
    (2, ["--net", "edge1", "--size", "32", "--clusters", "1", "--speeds", "1,1", "--images", "0"], "images"),
])
def test_bench_pipeline_bad_input_is_one_line_on_every_rank(ranks, args, message):
    proc = aflkd(ranks, "bench", "pipeline", "--size", "32", *args)
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


def test_a_topology_of_real_boards_plans_with_its_speeds_but_emulates_nothing(tmp_path):
    """Regression: on real boards the topology's speeds were also emulated, counting a slow board twice."""
    from argparse import Namespace

    from launch.pipeline import _grid_and_speeds

    def topology(address):
        path = tmp_path / f"{address}.toml"
        path.write_text("".join(f'[[host]]\nname = "b{i}"\naddress = "{address if i else "localhost"}"\n'
                                f'role = "master"\ncluster = {i}\nspeed = {1.0 / (i + 1)}\n' for i in range(2)))
        return str(path)
    given = Namespace(speeds=None, clusters=1)
    assert _grid_and_speeds(Namespace(**vars(given), topology=topology("10.0.0.7")), 2) == ((2, 1), [1.0, 0.5], False)
    assert _grid_and_speeds(Namespace(**vars(given), topology=topology("localhost")), 2) == ((2, 1), [1.0, 0.5], True)
    explicit = Namespace(speeds=[1.0, 0.25], clusters=1, topology=topology("10.0.0.7"))
    assert _grid_and_speeds(explicit, 2) == ((2, 1), [1.0, 0.25], True)  # --speeds: always emulated
