"""Pure row geometry: property tests against brute force and against torch's own shapes."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.geometry import RowRange, Window, input_rows_for, output_height, split_rows

weights_st = st.lists(st.floats(min_value=0.05, max_value=20, allow_nan=False), min_size=1, max_size=8)
window_st = st.builds(
    Window,
    kernel=st.integers(1, 7),
    stride=st.integers(1, 3),
    padding=st.integers(0, 3),
    dilation=st.integers(1, 3),
)


@given(height=st.integers(0, 300), weights=weights_st)
def test_split_rows_cover_height_in_order_without_overlap(height, weights):
    ranges = split_rows(height, weights)
    assert len(ranges) == len(weights)
    assert ranges[0].start == 0 and ranges[-1].stop == height
    for a, b in zip(ranges, ranges[1:]):
        assert a.stop == b.start
    total = sum(weights)
    for r, w in zip(ranges, weights):
        assert abs(len(r) - height * w / total) < 1 + 1e-9  # floor boundaries: off by < 1 row


@given(height=st.integers(1, 200), ranks=st.integers(1, 12))
def test_even_split_sizes_differ_by_at_most_one(height, ranks):
    sizes = [len(r) for r in split_rows(height, [1] * ranks)]
    assert max(sizes) - min(sizes) <= 1
    if height % ranks == 0:
        assert len(set(sizes)) == 1


def test_more_ranks_than_rows_leaves_empty_ranges():
    sizes = [len(r) for r in split_rows(3, [1] * 5)]
    assert sum(sizes) == 3 and sizes.count(0) == 2


@pytest.mark.parametrize("bad", [[], [1, 0], [1, -2]])
def test_split_rows_rejects_bad_weights(bad):
    with pytest.raises(ValueError, match="weight"):
        split_rows(10, bad)


@settings(max_examples=300)
@given(window=window_st, height=st.integers(1, 40), data=st.data())
def test_input_rows_match_brute_force(window, height, data):
    reach = height + 2 * window.padding - window.span
    if reach < 0:
        with pytest.raises(ValueError, match="smaller than the window"):
            output_height(height, window)
        return
    out_h = output_height(height, window)
    a = data.draw(st.integers(0, out_h))
    b = data.draw(st.integers(a, out_h))
    need = input_rows_for(RowRange(a, b), window)
    touched = {o * window.stride - window.padding + j * window.dilation
               for o in range(a, b) for j in range(window.kernel)}
    if a == b:
        assert len(need) == 0
    else:
        assert need.start == min(touched) and need.stop == max(touched) + 1


@settings(max_examples=150, deadline=None)
@given(window=window_st, height=st.integers(1, 30))
def test_output_height_agrees_with_torch(window, height):
    if 2 * window.padding > window.span or height + 2 * window.padding < window.span:
        return  # torch rejects padding > half the effective kernel; too-small input errors elsewhere
    x = torch.zeros(1, 1, height, 3)
    y = F.conv2d(x, torch.zeros(1, 1, window.kernel, 1), stride=(window.stride, 1),
                 padding=(window.padding, 0), dilation=(window.dilation, 1))
    assert y.shape[2] == output_height(height, window)


def test_one_by_one_kernel_needs_no_halo():
    for a, b in [(0, 5), (3, 9), (7, 8)]:
        assert input_rows_for(RowRange(a, b), Window(1)) == RowRange(a, b)


def test_window_rejects_nonsense():
    with pytest.raises(ValueError, match="kernel, stride and dilation must be >= 1"):
        Window(0)


@pytest.mark.parametrize("start, stop, text, described", [
    (9, 10, "9", "row 9"), (9, 11, "9-10", "rows 9-10"), (0, 224, "0-223", "rows 0-223"), (5, 5, "none", "no rows")])
def test_rows_print_first_to_last_both_included_as_aflkd_plan_does(start, stop, text, described):
    """`aflkd plan` printed shares inclusive (0-62) and `--program` half-open (111-112, one row): now both as the
    first and last row."""
    assert str(RowRange(start, stop)) == text and RowRange(start, stop).described() == described
