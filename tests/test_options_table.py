"""docs/options.md is the parsers' own table (regenerate it with the command it names); an option name means
one kind of value in every command that has it; torch's version is read the same with or without torch."""
import collections
import subprocess
import sys
from pathlib import Path

from launch.cli import build_parser
from launch.options_table import option_rows, render

REPO = Path(__file__).resolve().parent.parent

#: the same name on purpose with other choices: bench layers also times both head placements at once
SAME_MEANING_OTHER_CHOICES = {"--head", "--dataset"}


def test_docs_options_md_is_current():
    assert (REPO / "docs" / "options.md").read_text() == render(), \
        "run: .venv/bin/python -m launch.options_table > docs/options.md"


def test_one_kind_of_value_per_option_name():
    kinds = collections.defaultdict(set)
    for command, option, value, _ in option_rows(build_parser()):
        kinds[option].add(value)
    mixed = {o: sorted(v) for o, v in kinds.items() if len(v) > 1 and o not in SAME_MEANING_OTHER_CHOICES}
    assert not mixed, mixed  # e.g. --out a file in one command and a folder in another


def test_one_kind_of_value_per_option_name_list_or_single():
    """--seeds was a list of seeds in the grids and a count in 'tables'; control's --cores a count and
    schedule simulate's a list (now --c-totals); the bounds a command checks may differ, the kind may not."""
    from launch.options_table import leaf_commands

    kinds = collections.defaultdict(set)
    for words, leaf in leaf_commands(build_parser()):
        for action in leaf._actions:
            if action.option_strings and action.dest != "help" and action.nargs != 0:
                name = getattr(action.type, "__name__", "")
                kinds[action.option_strings[0]].add("list" if "list" in name or action.nargs else "single")
    assert not {o: k for o, k in kinds.items() if len(k) > 1}


def test_out_is_always_a_folder_and_save_always_a_weights_file():
    rows = option_rows(build_parser())
    assert {v for _, o, v, _ in rows if o == "--out"} == {"FOLDER"}
    assert {v for _, o, v, _ in rows if o == "--save"} == {"FILE"}


def test_every_net_option_defaults_to_edge_net_3():
    """--net defaulted to 2 (train edge), 1 (system), 3 elsewhere and was required in update run."""
    from launch.options_table import leaf_commands

    defaults = {}
    for words, leaf in leaf_commands(build_parser()):
        for action in leaf._actions:
            if action.option_strings and action.option_strings[0] == "--net":
                defaults[" ".join(words)] = (action.default, action.required)
    assert len(defaults) >= 10
    assert {d for d in defaults.values()} == {("edge3", False)}, defaults


def test_torch_version_without_importing_torch_is_torchs_own():
    code = ("import sys; from launch.options import _torch_version; v = _torch_version(); "
            "assert 'torch' not in sys.modules; import torch; print(v == torch.__version__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr
