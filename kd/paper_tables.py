"""The AFLKD paper's accuracy tables (Tables 2, 3 and 4), as printed, to set our grids beside.

Test accuracy in %, keyed ``(dataset, method, net, size)``.  Transcribed from the
paper's text; ``tests/test_paper_tables.py`` re-reads the paper's file (when it
is beside the checkout) and checks every figure here against it.
"""
from __future__ import annotations

from typing import Optional

__all__ = ["PAPER", "paper_figure", "TABLE_OF"]

_SIZES_10 = (500, 1000, 1500, 2000, 2500, 3000, 3500, 4000, 4500, 5000)
_SIZES_FM = (500, 1000, 1500, 2000, 2500, 3000)

_ROWS = {
    "cifar10": (_SIZES_10, {
        ("aflkd", 1): "49.5 56 59.9 62.1 62.8 65.6 66.2 67.4 69.3 70.2",
        ("sslf", 1): "40.4 50 58 59.7 61 64.7 65.4 66.9 68.1 68.3",
        ("baseline", 1): "33.8 43.2 46.4 44.4 50.4 53.7 56.5 58.2 58.6 62.3",
        ("aflkd", 2): "51.7 60 62 63.8 63.8 68.9 70.2 71.0 73.3 74.6",
        ("sslf", 2): "50.6 58.9 55.9 62.6 61.1 67.6 68.2 69.7 70.3 70.3",
        ("baseline", 2): "35.8 44 41.8 50.2 52.8 56.4 61.0 64.0 64.6 65.7",
        ("aflkd", 3): "53.9 61.5 65 70 69.8 72.1 73 73.4 74.3 75.3",
        ("sslf", 3): "51.3 56.9 58.5 64.5 67.3 66.6 67.8 72 72.5 74",
        ("baseline", 3): "38.3 43.9 49.6 49.1 55.2 55.7 61.4 62.3 64.5 66.1",
    }),
    "fashion-mnist": (_SIZES_FM, {
        ("aflkd", 1): "85.3 86.5 89.1 89 89.4 89.7",
        ("sslf", 1): "83.4 85.3 88.3 87.4 88.9 89.1",
        ("baseline", 1): "77.3 78.6 82.9 83.1 83.9 86.9",
        ("aflkd", 2): "85.9 87.4 90.1 89.7 90.3 91.5",
        ("sslf", 2): "83.1 85 86.2 87.2 89.8 89.6",
        ("baseline", 2): "79.9 82.3 84.1 85.1 87.6 88.6",
    }),
    "cifar100": (_SIZES_10, {
        ("aflkd", 1): "9.7 15.8 19.5 23.5 23.4 24.7 27.8 28.4 32.4 34.2",
        ("sslf", 1): "8.4 9.2 11.6 15.4 15.1 22.2 22.6 22.5 25.1 27.4",
        ("baseline", 1): "5.1 6.7 8.9 12.4 11.8 13.4 16.9 19 17.9 19.3",
        ("aflkd", 2): "15.9 20.6 28.3 31.3 31.5 35.8 38.4 38.9 40.2 40.6",
        ("sslf", 2): "9 13.8 17.9 22.5 22.3 23.4 25.9 29.9 30.4 36.2",
        ("baseline", 2): "5.9 7.8 9.2 11.4 15.5 15.6 15.2 17.9 18.8 20.5",
        ("aflkd", 3): "36.8 43.7 44.1 49.1 48.6 50.6 53 53.3 54.1 55.6",
        ("sslf", 3): "17.6 26.1 32.7 39.4 41.6 42.2 42.6 44.9 48.1 48.9",
        ("baseline", 3): "6.1 8.1 8.7 10.5 13.2 15.6 14.8 16.2 18.6 19.2",
    }),
}

TABLE_OF = {"cifar10": "Table 2", "fashion-mnist": "Table 3", "cifar100": "Table 4"}

PAPER: dict[tuple[str, str, int, int], float] = {
    (dataset, method, net, size): float(value)
    for dataset, (sizes, rows) in _ROWS.items()
    for (method, net), text in rows.items()
    for size, value in zip(sizes, text.split(), strict=True)
}


def paper_figure(dataset: str, method: str, net: int, size: int) -> Optional[float]:
    """The paper's accuracy (%) for this cell, or None where it prints none (KD, CTKD, other sizes)."""
    return PAPER.get((dataset, method, net, size))
