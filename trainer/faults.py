"""Fault injection for tests, read from the environment variable DITILL_DEBUG_FAULTS; inert when unset.

Not a config key on purpose: a fault is a property of one test launch, not of the experiment, and
must never end up in a saved config or change its hash. Entries are separated by `;`:

  nan_batch@3,4         the input batch of steps 3 and 4 is all NaN (every rank), as corrupt data would be
  nan_batch@3:rank=1    ... on rank 1 only
  nan_loss@3            the loss of step 3 reads NaN after its backward, its gradients finite, as a
                        non-finite term that no gradient reaches would (so the agreed skip alone acts)
  hang@5:rank=1         rank 1 blocks forever in step 5 (in `_injected_hang`), as a stuck rank would
  wait_preempt@5        step 5 waits until a preemption signal has arrived (so a test's time-out
                        lands at a known step, however slow the machine)
  slow_step=0.1         sleep 0.1 s in every step (so a test can kill a run at a chosen step)
  slow_save=5           a checkpoint's completion waits 5 s before its files are summed and renamed
                        (so a test can kill a run while an async save is in flight)
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

ENV = "DITILL_DEBUG_FAULTS"


@dataclass
class Faults:
    nan_batch: dict[int, int | None] = field(default_factory=dict)  # step -> rank (None: all)
    nan_loss: dict[int, int | None] = field(default_factory=dict)
    hang: dict[int, int | None] = field(default_factory=dict)
    wait_preempt: dict[int, int | None] = field(default_factory=dict)
    slow_step: float = 0.0
    slow_save: float = 0.0

    @classmethod
    def parse(cls, text: str | None) -> "Faults":
        out = cls()
        for entry in filter(None, (e.strip() for e in (text or "").split(";"))):
            if "=" in entry and "@" not in entry:
                key, value = entry.split("=", 1)
                if key not in ("slow_step", "slow_save"):
                    raise ValueError(f"{ENV}: unknown fault {entry!r}")
                setattr(out, key, float(value))
                continue
            kind, _, rest = entry.partition("@")
            steps, _, opt = rest.partition(":")
            rank = int(opt.split("=", 1)[1]) if opt.startswith("rank=") else None
            if kind not in ("nan_batch", "nan_loss", "hang", "wait_preempt") or not steps:
                raise ValueError(f"{ENV}: unknown fault {entry!r}; see trainer/faults.py")
            for s in steps.split(","):
                getattr(out, kind)[int(s)] = rank
        return out

    @classmethod
    def from_env(cls) -> "Faults":
        return cls.parse(os.environ.get(ENV))

    @staticmethod
    def _hits(table: dict[int, int | None], step: int, rank: int) -> bool:
        return step in table and table[step] in (None, rank)

    def batch(self, step: int, rank: int, batch: dict) -> dict:
        if self._hits(self.nan_batch, step, rank):
            batch = {**batch, "x": batch["x"].clone().fill_(float("nan"))}
        return batch

    def loss(self, step: int, rank: int, terms: dict) -> dict:
        if self._hits(self.nan_loss, step, rank):
            terms = {**terms, "loss": float("nan")}
        return terms

    def step(self, step: int, rank: int, preempted: Callable[[], bool]) -> None:
        if self.slow_step:
            time.sleep(self.slow_step)
        if self._hits(self.hang, step, rank):
            _injected_hang()
        if self._hits(self.wait_preempt, step, rank):
            while not preempted():
                time.sleep(0.05)

    def before_commit(self) -> None:
        if self.slow_save:
            time.sleep(self.slow_save)


def _injected_hang() -> None:
    while True:  # a stack dump of a stalled rank names this function
        time.sleep(3600)

