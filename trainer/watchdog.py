"""A stalled step dumps this rank's stacks, then the process exits, before anything kills it.

The loop arms the watchdog at the start of every step (and again before a checkpoint or an
evaluation) with `engine.collective_timeout_s`. A rank that hangs (a collective whose peer died or
never came, a deadlock, a stuck read) does not finish its step in time; so does every rank waiting
for it in a collective. Each one's watchdog then writes "rank r: step N stalled" and the stack of
every thread to stderr and to `<run>/stalls/rank<r>.txt`, lingers a few seconds so that the other
stalled ranks (armed a little earlier or later) dump theirs before its exit breaks their
connections, and exits with STALL_EXIT_CODE.

Two mechanisms, because a hang may or may not hold the GIL:
- a Python thread that waits for the deadline (a rank blocked in a C++ collective releases the GIL),
  and writes a header naming rank, step and phase before the stacks;
- `faulthandler.dump_traceback_later`, armed two grace periods later, which runs in a C thread and
  dumps even if the GIL is held forever.
The process group's own timeout is set two grace periods after the watchdog's (see
`trainer.distributed.init_distributed`), so the stacks are written before a collective times out.
"""
from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from pathlib import Path

STALL_EXIT_CODE = 125
GRACE_S = 30.0  # the C-level dump and the process-group timeout come twice this long after the watchdog


def linger_s(timeout_s: float) -> float:
    """How long a rank that dumped waits before exiting (its peers' deadlines may be a little later)."""
    return min(GRACE_S, max(5.0, timeout_s / 4))


class StallWatchdog:
    def __init__(self, timeout_s: float, run_dir: Path | str, rank: int) -> None:
        self.timeout_s = float(timeout_s)
        self.rank = rank
        self.path = Path(run_dir) / "stalls" / f"rank{rank:05d}.txt"
        self._deadline: float | None = None
        self._what = ""
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="ditill-stall-watchdog", daemon=True)
        self._thread.start()

    def arm(self, what: str) -> None:
        """Start the clock for `what` (e.g. "step 12"); the previous phase is done."""
        with self._cond:
            self._deadline = time.monotonic() + self.timeout_s
            self._what = what
            self._cond.notify()
        faulthandler.dump_traceback_later(self.timeout_s + 2 * GRACE_S, repeat=False, file=sys.stderr, exit=True)

    def disarm(self) -> None:
        with self._cond:
            self._deadline = None
            self._cond.notify()
        faulthandler.cancel_dump_traceback_later()

    def close(self) -> None:
        self.disarm()
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                faulthandler.cancel_dump_traceback_later()
                self._dump()
                self._cond.wait(linger_s(self.timeout_s))  # the other stalled ranks dump too
                os._exit(STALL_EXIT_CODE)

    def _dump(self) -> None:
        header = (
            f"[ditill] rank {self.rank} (pid {os.getpid()}): {self._what} stalled for more than {self.timeout_s:.0f}s "
            f"(engine.collective_timeout_s); the stack of every thread follows, then this process exits with "
            f"{STALL_EXIT_CODE}\n"
        )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w") as f:
                f.write(header)
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError:
            pass
        sys.stderr.write(header)
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
