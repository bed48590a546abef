"""Progress bars: tqdm's redraws on a terminal, whole lines (no carriage returns) in a file or a log."""
import io

from runtime.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_whole_lines_and_no_redraws():
    log = io.StringIO()
    for _ in progress_bar(range(2000), desc="work", file=log):
        pass
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert 1 <= len(lines) <= 3 and "2000/2000" in lines[-1], lines  # the start, the end: not a frame per item


def test_a_terminal_gets_tqdm_as_usual_and_disable_is_kept():
    tty = Terminal()
    for _ in progress_bar(range(10), desc="work", file=tty, mininterval=0):
        pass
    assert "\r" in tty.getvalue()
    quiet = io.StringIO()
    for _ in progress_bar(range(10), file=quiet, disable=True):
        pass
    assert quiet.getvalue() == ""
