"""Stopping cleanly when the scheduler (SIGTERM) or the user (Ctrl-C, SIGINT) says so."""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence


class GracefulStop:
    """While active, SIGTERM and SIGINT do not end the process: they only set `received`.

    Schedulers send SIGTERM before pre-emption or at the time limit (SLURM follows with SIGKILL
    after `KillWait`, 30 s by default), and torchrun forwards it to every worker (then kills them
    after `--shutdown-timeout`, 30 s by default); Ctrl-C sends SIGINT, which torchrun forwards too.
    The training loop polls `requested` once per step, agrees with the other ranks, writes a
    checkpoint and returns, so the job can be requeued and resumed, and says which signal stopped
    it (`received.name`). A second SIGINT while the stop is under way raises `KeyboardInterrupt`
    at once, as a user pressing Ctrl-C again expects (no checkpoint then). Outside the `with`
    block the previous handlers are back.
    """

    def __init__(self, signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = tuple(signals)
        self.received: signal.Signals | None = None  # the first signal: the one that asked for the stop
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    def __enter__(self) -> GracefulStop:
        # Python only lets the main thread install handlers; elsewhere the defaults stay.
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def ignore_sigterm(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: loading workers ignore SIGTERM and SIGINT.

    A scheduler signals every process of the job, and Ctrl-C every process of the terminal's
    foreground group (a single-process run's workers too): a worker ended by either would crash
    the training process mid-step, or print a traceback, instead of letting it checkpoint. The
    workers still end with their parent.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
