"""Helpers for tests that start `t2dist` as a child process and signal it as a terminal would."""
import signal


def sigint_as_in_a_terminal() -> None:
    """``preexec_fn`` for a child that a test will Ctrl-C: SIGINT's default disposition, whatever this process
    inherited.  A shell that starts jobs in the background, or a nohup-like launcher, leaves SIGINT ignored,
    and Python then installs no KeyboardInterrupt handler: Ctrl-C tests would fail for the launcher's reason,
    not the code's."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
