"""The paper's Tables 2-4 as transcribed, checked against the paper's own text when it is beside the checkout."""
import re
from pathlib import Path

import pytest

from kd.paper_tables import PAPER, paper_figure

PAPER_FILE = Path(__file__).resolve().parents[2] / "shared" / "papers" / "000_26f5d4ef5485f7fb.txt"
NAMES = {"AFLKD": "aflkd", "SSLF": "sslf", "Baseline": "baseline"}


def test_transcription_has_every_row():
    assert len(PAPER) == 9 * 10 + 6 * 6 + 9 * 10
    assert paper_figure("cifar10", "aflkd", 3, 500) == 53.9
    assert paper_figure("cifar100", "baseline", 3, 5000) == 19.2
    assert paper_figure("cifar10", "kd", 3, 500) is None


@pytest.mark.skipif(not PAPER_FILE.exists(), reason="needs ../shared/papers")
def test_transcription_matches_the_papers_text():
    text = PAPER_FILE.read_text()
    found = {}
    for table, dataset in (("Table 2", "cifar10"), ("Table 3", "fashion-mnist"), ("Table 4", "cifar100")):
        body = text[text.index(f"\n{table}\n") + 1:]
        body = body[: body.find("\nFig.")]  # up to the next figure caption: this table's rows only
        sizes = [int(s) for s in re.search(r"Number of training images\t([\d\t]+)", body).group(1).split()]
        for m in re.finditer(r"^(AFLKD|SSLF|Baseline)\(Edge network(\d)\)\t([\d.\t]+)", body, re.M):
            for size, value in zip(sizes, m.group(3).split()):
                found[(dataset, NAMES[m.group(1)], int(m.group(2)), size)] = float(value)
    assert found == PAPER
