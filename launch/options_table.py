"""``docs/options.md``: every command's options and defaults, generated from the parsers themselves.

Run ``.venv/bin/python -m launch.options_table > docs/options.md`` after changing an option;
``tests/test_options_table.py`` fails while the file and the parsers disagree, and checks that an
option name means one thing (one kind of value) in every command that has it.
"""
from __future__ import annotations

import argparse
from typing import Iterator

__all__ = ["leaf_commands", "option_rows", "render"]


def leaf_commands(parser: argparse.ArgumentParser, prefix: tuple = ()) -> Iterator[tuple[tuple, argparse.ArgumentParser]]:
    """Every runnable command's parser, e.g. (('train', 'edge'), parser)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
        return
    for name, child in subs[0].choices.items():
        yield from leaf_commands(child, prefix + (name,))


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.nargs == 0:
        return "off" if not action.default else "on"
    if action.default is None:
        return "—"
    if isinstance(action.default, (list, tuple)):
        return ",".join(map(str, action.default)) or "—"
    text = str(action.default)
    return "…/" + text.split("/")[-1] if text.startswith("/") else text


def option_rows(parser: argparse.ArgumentParser) -> list[tuple[str, str, str, str]]:
    """(command, option, value, default) for every option of every command, in the parsers' order."""
    rows = []
    for words, leaf in leaf_commands(parser):
        for action in leaf._actions:
            if not action.option_strings or action.dest == "help":
                continue
            value = "" if action.nargs == 0 else (action.metavar or action.dest.upper())
            if action.choices and action.nargs != 0:
                value = "{" + ",".join(map(str, action.choices)) + "}"
            rows.append((" ".join(words), ", ".join(action.option_strings), str(value), _default(action)))
    return rows


def render() -> str:
    from .cli import build_parser

    lines = ["# Options of every command", "",
             "Generated from the parsers by `.venv/bin/python -m launch.options_table > docs/options.md`; "
             "`tests/test_options_table.py` checks that it is current. `aflkd COMMAND --help` explains each one.",
             "", "| command | option | value | default |", "|---|---|---|---|"]
    for command, option, value, default in option_rows(build_parser()):
        lines.append(f"| `{command}` | `{option}` | {value.replace('|', '/')} | {default.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
