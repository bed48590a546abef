"""The README, run as written: its Python example (under MPI) and its ``aflkd`` commands (parsed).

The example lives only in README.md (after ``<!-- example:split -->``); this test
reads it from there, so changing the API means changing that one block.
"""
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
CIFAR10 = REPO.parent / "shared" / "data" / "cifar10.npz.xz"


def readme_block(marker: str) -> str:
    """The fenced block after ``<!-- marker -->`` (as .ci/run reads its blocks)."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if f"<!-- {marker} -->" in line)
    fence = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
    end = next(i for i in range(fence + 1, len(lines)) if lines[i].startswith("```"))
    return "\n".join(lines[fence + 1 : end]) + "\n"


def readme_commands() -> list[list[str]]:
    """The arguments of every ``aflkd`` command in the README's bash blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            for command in line.split("&&"):
                words = shlex.split(command, comments=True)
                at = [i for i, w in enumerate(words) if w == "aflkd" or w.endswith("/aflkd")]
                if at:
                    commands.append(words[at[0] + 1 :])
    return commands


@pytest.mark.mpi(min_size=2)
@pytest.mark.skipif(not CIFAR10.exists(), reason="needs ../shared/data/cifar10.npz.xz")
def test_the_readme_python_example_split_runs_a_real_image(monkeypatch, capsys):
    from mpi4py import MPI

    monkeypatch.chdir(REPO)  # the README runs it from the checkout
    exec(compile(readme_block("example:split"), "README.md (example:split)", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    if MPI.COMM_WORLD.rank == 0:
        found = re.search(r"predicted class (\d+), label (\d+), max \|split - unsplit\| (\S+)", out)
        assert found, out
        assert found.group(1) == found.group(2)  # the shipped teacher gets this image right
        assert float(found.group(3)) <= 1e-5
    else:
        assert out == ""


def test_every_readme_command_parses():
    """A README command the CLI refuses (a renamed option, a missing --out) fails here, not for a user."""
    from launch.cli import build_parser

    commands = readme_commands()
    assert len(commands) >= 10 and ["test"] in commands
    for args in commands:
        build_parser().parse_args(args)  # raises UsageError with the reason


def test_the_readme_grid_command_is_not_refused_for_its_teacher(monkeypatch):
    """Regression: the README's grid command wrote into results/, whose grids were made with an earlier
    teacher, so it was refused ('holds cells trained with other settings (teacher_sha256 ...)')."""
    from kd.experiments import check_settings, file_digest
    from kd.trainer import EdgeConfig
    from launch.cli import build_parser
    from launch.options import teacher_path

    monkeypatch.chdir(REPO)
    grids = [build_parser().parse_args(a) for a in readme_commands() if a[:2] == ["experiment", "accuracy"]]
    assert grids
    for args in grids:
        base = EdgeConfig("baseline", 1, steps=args.steps, t_rule=args.t_rule, unit=args.unit)
        check_settings(str(Path(args.out) / f"accuracy-{args.dataset}.csv"), base, file_digest(teacher_path(args)))
