"""Children that take Ctrl-C as a terminal's programs do, however the test run itself was started."""
import signal


def sigint_as_from_a_terminal() -> None:
    """``preexec_fn``: SIGINT back to its default disposition in the child.

    A job started in the background by a non-interactive shell (``cmd &``, as some
    CI runners and nohup'd runs do) inherits SIGINT *ignored*; Python then installs
    no KeyboardInterrupt handler and MPI launchers pass the signal on to nobody, so a
    Ctrl-C test would wait for its timeout.  Every process a user starts from a
    terminal has the default disposition, which is what these tests are about.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
