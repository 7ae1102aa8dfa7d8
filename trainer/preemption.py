"""Signals only set a flag; the loop acts on it at a step boundary, after all ranks agree.

A handler that saved or exited from inside the signal would race the training step and leave
ranks in different collectives. SLURM sends SIGUSR1 (with `--signal`) or SIGTERM before a
preemption or time-out, submitit sends SIGUSR2; we checkpoint (blocking) and exit with
REQUEUE_EXIT_CODE so the scheduler, or our submitit callable, requeues the job.

A launcher may install the flag early (before the heavy imports), so a signal that arrives while
the run is still starting is not lost: `train(cfg, preempt=flag)` then uses that flag.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType

REQUEUE_EXIT_CODE = 124  # what our launchers treat as "checkpointed, please requeue"


class PreemptionFlag:
    def __init__(self, signals: tuple[str, ...] | list[str] = ("SIGTERM", "SIGUSR1")) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for name in signals:
            sig = getattr(signal, name)
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        """Give the signals back to whoever held them before (the default, submitit, torchrun)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous = {}
