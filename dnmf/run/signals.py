"""Stop a fit cleanly on a batch system's signal: finish the iteration, checkpoint, exit.

Batch systems warn a job before they end it: Slurm sends the signal ``--signal=B:USR1@SECONDS``
asks for before the wall time, and SIGTERM at the wall time or on pre-emption (then SIGKILL
after ``KillWait``); PBS sends SIGTERM (then SIGKILL after ``kill_delay``); Kubernetes sends
SIGTERM to the container (then SIGKILL after ``terminationGracePeriodSeconds``).

While a fit writes checkpoints, :func:`stop_on_signals` turns SIGTERM and SIGUSR1 into a
request the driver honours between iterations (:class:`StopRequest`, a driver hook): the
iteration under way finishes, the checkpoint writer writes its state (unless that iteration's
state is saved already), and :func:`dnmf.run.pipeline.fit` raises
:class:`~dnmf.errors.FitInterrupted`. The command line exits with status
:data:`EXIT_INTERRUPTED` then, the cue for a batch script to requeue itself; rerunning the
same command with ``--resume auto`` continues bitwise where it stopped.

Python runs signal handlers in the main thread only, so the handlers are installed only when
the fit runs there (elsewhere a signal keeps its previous effect), and the previous handlers
are restored when the fit ends, however it ends.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from .driver import Hook

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_INTERRUPTED = 75
"""The exit status of a ``dnmf fit`` / ``dnmf resume`` stopped by a signal after writing its
checkpoint (``EX_TEMPFAIL`` of sysexits.h: run the same command again)."""


class StopRequest(Hook):
    """A driver hook that asks the loop to stop once a stop signal has arrived.

    ``signal_name`` is the first signal received ("SIGTERM", "SIGUSR1"), None while none has.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def handle(self, signum, frame) -> None:
        """The signal handler: only records the request (the loop acts on it)."""
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    def stop_reason(self) -> str | None:
        return None if self.signal_name is None else "signal"


@contextlib.contextmanager
def stop_on_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[StopRequest]:
    """Route ``signals`` to a :class:`StopRequest` for the ``with`` block, then restore the
    previous handlers; outside the main thread nothing is installed (the request never fires)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {}
    try:
        for signum in signals:
            previous[signum] = signal.signal(signum, request.handle)
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def _exit_interrupted(signum, frame) -> None:
    raise SystemExit(EXIT_INTERRUPTED)


@contextlib.contextmanager
def exit_on_signals_outside_fits(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """For a command that fits with checkpoints, for a ``with`` block: SIGTERM / SIGUSR1
    arriving outside the fit (while the command starts up, or writes its result) end it with
    :data:`EXIT_INTERRUPTED` too (``SystemExit``), so a batch script requeues it; nothing is
    lost, as the rerun starts or resumes and a result is written whole or not at all. During
    the fit :func:`stop_on_signals` takes over. The previous handlers come back at the end;
    outside the main thread nothing is installed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    try:
        for signum in signals:
            previous[signum] = signal.signal(signum, _exit_interrupted)
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
