"""What every command shares: the parser class, defaults, and the checks of option values.

Each check lives here once and is used by every command that takes the option:
net names (``3`` and ``edge3`` mean the same net everywhere), comma lists,
``--threads``, ``--weights``, output paths, the student options.  Checks that
need nothing but the option's text run while parsing (an ``argparse`` type), so
a bad value is refused before anything is imported or loaded; the others
(output folders, sizes against a dataset) run first thing in the command.
"""
from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

from runtime.errors import UsageError

__all__ = [
    "REPO", "DATA_ROOT", "Parser", "HelpFormatter", "ExamplesFormatter", "rank", "edge_net", "edge_nets", "net_name",
    "int_list", "positive_int_list", "positive_int", "non_negative_int", "positive_float", "threads", "weights",
    "check_weights", "prepare_output", "prepare_folder", "data_options", "teacher_path", "student_options",
    "check_student_options", "apply_threads", "device_option",
]

REPO = Path(__file__).resolve().parent.parent
"""The checkout (or install) root: shipped teachers and results live under it, whatever the current folder."""
DATA_ROOT = (REPO.parent / "shared" / "data").resolve()
"""Default --data-root: ``../shared/data`` beside the checkout, not beside the current folder."""
EDGE_NETS = (1, 2, 3)


def job_size() -> int:
    """Ranks in this MPI job, from the launcher's environment (1 outside mpiexec), without initialising MPI."""
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE"):
        if var in os.environ:
            return int(os.environ[var])
    return 1


def rank() -> int:
    """This process's MPI rank without initialising MPI (so ``aflkd test`` can spawn mpiexec)."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def whole_lines() -> None:
    """Make every printed line reach the terminal in one ``write``: whole lines, even from several ranks.

    ``print`` writes the text and its newline separately; with ``PYTHONUNBUFFERED=1`` (set by many
    containers and CI runners) each becomes its own ``write``, and mpiexec, which forwards every rank's
    output as it comes, can put another rank's line between them (``...generation 2cloud: labelled...``).
    Line buffering without write-through joins them and still flushes at every newline.
    """
    import sys

    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(line_buffering=True, write_through=False)
            except (ValueError, OSError):  # a closed or replaced stream (tests capture them): leave it
                pass


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default exactly once.

    ``(default: X)`` is appended to options that have a default value and whose
    help does not already say ``(default: ...)`` in words (options whose default
    is computed, e.g. ``--threads``); flags and required options show none.
    """

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or not action.option_strings or action.required:
            return text
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


class ExamplesFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """:class:`HelpFormatter` that keeps the line breaks of the description and the examples epilog."""


class Parser(argparse.ArgumentParser):
    """argparse that reports errors as :class:`UsageError` (printed once, on rank 0) and helps on rank 0 only."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")

    def print_help(self, file=None):
        if rank() == 0:
            super().print_help(file)

    def format_help(self) -> str:
        """Help as text for a terminal: the reST literals of docstrings used as descriptions (``x``) read 'x'."""
        return re.sub(r"``([^`]+)``", r"'\1'", super().format_help())


def _type(name: str, convert: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse type whose :class:`UsageError` becomes argparse's one-line 'argument --x: ...' error."""

    def parse(text: str):
        try:
            return convert(text)
        except UsageError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = name
    return parse


def as_type(name: str, convert: Callable[[str], object]) -> Callable[[str], object]:
    """``convert`` as an argparse type: its :class:`UsageError` is argparse's one-line error, with the reason."""
    return _type(name, convert)


def _edge_net(text: str) -> int:
    value = text.strip().lower()
    value = value[4:] if value.startswith("edge") else value
    if value in {str(k) for k in EDGE_NETS}:
        return int(value)
    hint = "; the cloud net is trained with 'aflkd train cloud'" if value == "cloud" else ""
    raise UsageError(f"edge net must be 1, 2 or 3 (or edge1, edge2, edge3), got '{text}'{hint}")


def _net_name(text: str) -> str:
    if text.strip().lower() == "cloud":
        return "cloud"
    if text.strip().startswith("tv:"):  # a torchvision classifier, checked against torchvision's list
        from models import check_model_name

        return check_model_name(text.strip())
    try:
        return f"edge{_edge_net(text)}"
    except UsageError:
        raise UsageError(f"unknown net '{text}'; choose one of edge1, edge2, edge3 (or 1, 2, 3), cloud, "
                         "or tv:NAME (a torchvision classifier, e.g. tv:resnet18)") from None


def _split(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _edge_nets(text: str) -> list[int]:
    nets = [_edge_net(v) for v in _split(text)]
    if not nets:
        raise UsageError("give at least one edge net, e.g. 3,2,1")
    return nets


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in _split(text)]
    except ValueError:
        raise UsageError(f"must be comma-separated integers, got '{text}'") from None
    if not values:
        raise UsageError("give at least one value")
    return values


def _positive_int_list(text: str) -> list[int]:
    values = _int_list(text)
    if min(values) < 1:
        raise UsageError(f"every value must be >= 1, got '{text}'")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"must be an integer, got '{text}'") from None
    if value < 1:
        raise UsageError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"must be an integer, got '{text}'") from None
    if value < 0:
        raise UsageError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"must be a number, got '{text}'") from None
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"must be a number > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"must be a number, got '{text}'") from None
    if not (math.isfinite(value) and value >= 0):
        raise UsageError(f"must be a number >= 0, got {text}")
    return value


def _weights(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"must be comma-separated numbers like 2,1,1, got '{text}'") from None
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if bad:
        raise UsageError(f"every value must be a finite number > 0, got '{text}'")
    return values


edge_net = _type("edge net", _edge_net)
"""``3`` or ``edge3`` -> 3 (an edge net for training)."""
edge_nets = _type("edge nets", _edge_nets)
"""``3,2,1`` or ``edge3,edge2`` -> [3, 2, 1]."""
net_name = _type("net", _net_name)
"""``edge3``, ``3`` or ``cloud`` -> the model name of :func:`models.build_net`."""
int_list = _type("integer list", _int_list)
positive_int_list = _type("positive integer list", _positive_int_list)
positive_int = _type("positive integer", _positive_int)
non_negative_int = _type("non-negative integer", _non_negative_int)
positive_float = _type("positive number", _positive_float)
non_negative_float = _type("non-negative number", _non_negative_float)
threads = positive_int
"""--threads: torch threads, >= 1."""
weights = _type("weights", _weights)
"""--weights: per-rank shares of the rows, each finite and > 0."""


def check_weights(values: Optional[Sequence[float]], ranks: int) -> None:
    """One weight per rank (the count is known only under mpiexec)."""
    if values is not None and len(values) != ranks:
        raise UsageError(f"got {len(values)} rank weights for {ranks} ranks; give one weight per rank in --weights")


def prepare_folder(folder: str, option: str, value: Optional[str] = None) -> Path:
    """Create ``folder`` (and its parents) for an output option, or refuse in one line before any work.

    ``value`` is what the user gave the option (a file in ``folder``), for the message.
    """
    path, value = Path(folder), value or folder
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"{option} {value}: cannot create the folder {path}: {blocker} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{option} {value}: cannot create the folder {path} ({err.strerror})") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"{option} {value}: the folder {path} is not writable")
    return path


def plot_formats() -> list[str]:
    """The file extensions matplotlib's image writer takes (png, pdf, svg, ...), less those that are no image
    file to look at (raw, rgba: bare pixels) or need LaTeX to write (pgf)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return sorted(set(FigureCanvasAgg.get_supported_filetypes()) - {"pgf", "raw", "rgba"})


def check_plot_file(file: str, option: str = "--plot") -> None:
    """Refuse, before any work, a plot file matplotlib would not write as named: an extension it has no
    writer for (it raised only after the whole run), or none at all (it silently wrote FILE.png)."""
    suffix = Path(file).suffix.lower().lstrip(".")
    formats = plot_formats()
    if suffix not in formats:
        what = "has no extension" if not suffix else f"ends in .{suffix}, not an image format"
        raise UsageError(f"{option} {file} {what}: name it .png, .pdf or .svg (matplotlib writes "
                         f"{', '.join(formats)})")


def prepare_output(file: Optional[str], option: str) -> None:
    """Make sure ``file`` can be written: create its folder (as users expect for ``out/...``) or refuse.
    A ``--plot`` file must also end in an image format (:func:`check_plot_file`)."""
    if not file:
        return
    path = Path(file)
    if path.is_dir():
        raise UsageError(f"{option} {file} is a folder; give a file in it, e.g. {path / 'NAME'}")
    if option == "--plot":
        check_plot_file(file, option)
    prepare_folder(str(path.parent), option, file)
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{option} {file}: the file is not writable")


def check_out_settings(out: str, mine: dict, what: str) -> None:
    """An --out folder resumes only the run that made it: refuse, in one line, settings other than those it
    recorded (``settings.json``, see :func:`record_out_settings`), rather than mix them into its files (a
    student of another net, generations of another dataset in one buffer).  A folder without the file
    passes."""
    import json

    path = os.path.join(out, "settings.json")
    if not os.path.exists(path):
        return
    try:
        with open(path, encoding="utf-8") as fh:
            theirs = json.load(fh)
        if not isinstance(theirs, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as err:
        raise UsageError(f"--out {out}: {path} is not the settings file aflkd writes ({err}); move it away, or "
                         "give another --out") from None
    diff = sorted(k for k in mine if theirs.get(k) != mine[k])
    if diff:
        raise UsageError(f"--out {out} holds {what} made with other settings ({', '.join(diff)}); give another "
                         "--out, or the same settings to resume it")


def record_out_settings(out: str, mine: dict) -> None:
    """Write the settings of a run into its --out folder, once every rank has agreed its set-up is sound (a run
    refused at set-up must not record settings the folder never held)."""
    import json

    path = os.path.join(out, "settings.json")
    if os.path.exists(path):
        return
    from models.checkpoint import write_atomic

    write_atomic(path, lambda fh: fh.write(json.dumps(mine, indent=1).encode()))


def data_options(parser: argparse.ArgumentParser, teacher: bool = False) -> None:
    """--dataset and --data-root (and --teacher), shared by the training commands."""
    parser.add_argument("--dataset", required=True, help="cifar10, cifar100 or fashion-mnist")
    where = str(DATA_ROOT).replace("%", "%%")
    parser.add_argument("--data-root", default=str(DATA_ROOT),
                        help=f"folder with the dataset files (default: ../shared/data beside the checkout: {where})")
    if teacher:
        parser.add_argument("--teacher", default=None,
                            help="cloud net weights (default: the shipped checkpoints/cloud-DATASET.pt)")


def test_images_option(parser: argparse.ArgumentParser) -> None:
    """--test-images N, shared by the commands that measure each student generation on the test split."""
    parser.add_argument("--test-images", type=positive_int, default=None, metavar="N",
                        help="measure each generation on N class-balanced test images (default: the whole test split; "
                             "fewer is a quick look on a slow board, and results say how many)")


def device_option(parser: argparse.ArgumentParser, what: str = "nets run") -> None:
    """--device auto|cpu|cuda, shared by every command that trains or runs a teacher (see kd/device.py)."""
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help=f"where the {what}: auto takes CUDA when torch sees a GPU, else the CPU (and says so "
                        "in one line); cuda refuses to start without one. On CUDA forward passes use bfloat16 "
                        "autocast (float16 with loss scaling on GPUs without bfloat16); CPU runs stay float32")


def teacher_path(args) -> str:
    """--teacher, or the shipped teacher of the dataset in the checkout."""
    return args.teacher or str(REPO / "checkpoints" / f"cloud-{args.dataset}.pt")


def load_teacher(args, data, device=None):
    """The cloud net from --teacher (default: the shipped checkpoints/cloud-DATASET.pt), in eval mode, on ``device``.

    The file is read onto the CPU first, so a teacher saved on a GPU loads anywhere.
    """
    from models import cloud_net, load_weights

    teacher = load_weights(cloud_net(data.channels, 32, data.classes), teacher_path(args),
                           f"--teacher must be a cloud net trained on {data.name}").eval()
    return teacher if device is None else teacher.to(device)


def student_options(parser: argparse.ArgumentParser) -> None:
    """--steps, --t-rule and --unit, shared by the edge-training commands; defaults from EdgeConfig."""
    from kd.config import EdgeConfig  # the defaults. one home

    parser.add_argument("--steps", type=positive_int, default=EdgeConfig.steps,
                        help="optimiser steps per student (batches of %d images)" % EdgeConfig.batch)
    parser.add_argument("--t-rule", default=EdgeConfig.t_rule, choices=["reversal", "descent"],
                        help="how AFLKD learns T (descent: the paper's Eq. 5; reversal: curriculum)")
    parser.add_argument("--unit", default=EdgeConfig.unit, choices=["conv", "block"],
                        help="what Eq. 17 counts as a layer")


def check_student_options(sizes: Sequence[int], data, size_option: str) -> None:
    """Refuse subset sizes the dataset cannot give, before any training (not hours into a grid)."""
    lo, hi = data.classes, len(data.y_train)
    bad_sizes = [n for n in sizes if not lo <= n <= hi]
    if bad_sizes:
        raise UsageError(f"{size_option} must be between {lo} (one image per class) and {hi} (the training split), "
                         f"got {', '.join(map(str, bad_sizes))}")


def _torch_version() -> str:
    """``torch.__version__`` (local tag included: +cpu, +cu130), read from torch/version.py when torch is not
    imported yet, so that a set-up error is refused before torch's 1.3 s import; the same string either way."""
    import sys

    if "torch" in sys.modules:
        return str(sys.modules["torch"].__version__)
    import importlib.util
    import re

    spec = importlib.util.find_spec("torch")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        try:
            text = (Path(folder) / "version.py").read_text()
        except OSError:
            continue
        found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, flags=re.M)
        if found:
            return found.group(1)
    import torch

    return str(torch.__version__)


def deployment_fingerprint(args, ranks: int, *files: str) -> str:
    """A digest of what a rank's plan is made from: the options that shape it, the rank count, torch's
    version and the content of the files it reads (a topology, a profile, a checkpoint).  Equal on every
    rank, or the job refuses (:func:`runtime.transport.agree_on`)."""
    import hashlib

    torch_version = _torch_version()
    fields = {k: v for k, v in sorted(vars(args).items())
              if k not in ("func", "command_line", "json", "csv", "plot", "no_progress", "threads", "deadline")
              and isinstance(v, (str, int, float, bool, list, tuple, type(None)))}
    digest = hashlib.sha256(repr((fields, ranks, torch_version)).encode())
    for path in files:
        if path:
            try:
                with open(path, "rb") as fh:
                    digest.update(hashlib.sha256(fh.read()).digest())
            except OSError as err:
                digest.update(f"unreadable {path}: {err.strerror}".encode())
    return digest.hexdigest()[:16]


def deadline_option(parser: argparse.ArgumentParser) -> None:
    """--deadline, shared by the inference commands that run under mpiexec (see runtime/transport.py)."""
    parser.add_argument("--deadline", type=positive_float, default=None, metavar="S",
                        help="seconds any rank waits for another before the job ends with one line naming the "
                        "rank that died or stalled (default: $AFLKD_DEADLINE, else 30; phases where rank 0 "
                        "works alone, such as profiling, may last 20 deadlines)")


def apply_deadline(args) -> None:
    """Set the transport's deadline once, for commands that were given --deadline."""
    value = getattr(args, "deadline", None)
    if value is not None:
        from runtime.transport import set_deadline

        set_deadline(value)


def apply_threads(args) -> None:
    """Set torch's thread count once, for single-process commands that were given --threads."""
    value = getattr(args, "threads", None)
    if value is not None and not getattr(args, "sets_own_threads", False):
        import torch

        torch.set_num_threads(value)
