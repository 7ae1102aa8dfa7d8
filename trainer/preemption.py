"""Signals only set a flag; the loop acts on it at a step boundary, after all ranks agree.

A handler that saved or exited from inside the signal would race the training step and leave
ranks in different collectives. SLURM sends SIGUSR1 (with `--signal`) or SIGTERM before a
preemption or time-out; we checkpoint and exit with REQUEUE_EXIT_CODE so the scheduler requeues.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType

REQUEUE_EXIT_CODE = 124  # what our launchers treat as "checkpointed, please requeue"


class PreemptionFlag:
    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for name in signals:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
