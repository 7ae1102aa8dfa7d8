"""Deterministic clocks for benchmark tests: the benchmark's own code runs, but its `time.perf_counter`
reads a count of work done (FLOPs, or dispatched operators) instead of seconds. A benchmark that times
the right callables then reports exactly the ratios of their work, which a test can compute on its own;
one that times the wrong thing, pairs the wrong rows or divides the wrong way does not.
"""
from __future__ import annotations

import time
from types import ModuleType

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode


class _TimeShim:
    """The `time` module with some of its clocks (`perf_counter`, `process_time`) replaced."""

    def __init__(self, **clocks) -> None:
        self.__dict__.update(clocks)

    def __getattr__(self, name: str):
        return getattr(time, name)


class TickClock:
    """A clock that advances one unit per read: a timed window with no other read inside it lasts
    exactly one unit, so a rate taken over it reads the work done in that window."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def install_clocks(monkeypatch, module: ModuleType, **clocks) -> None:
    """`module.time.<name>()` reads `clocks[name]()` (e.g. perf_counter=TickClock())."""
    monkeypatch.setattr(module, "time", _TimeShim(**clocks))


class OpCountMode(TorchDispatchMode):
    """Counts operators reaching the dispatcher below autograd (a fused custom op counts once)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def op_count(fn) -> int:
    with OpCountMode() as mode:
        fn()
    return mode.count


def flop_count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def install(monkeypatch, module: ModuleType, mode: TorchDispatchMode) -> None:
    """`module.time.perf_counter()` reads `mode`'s running count (FLOPs for FlopCounterMode)."""
    if isinstance(mode, FlopCounterMode):
        read = lambda: float(mode.get_total_flops())  # noqa: E731
    else:
        read = lambda: float(mode.count)  # noqa: E731
    install_clocks(monkeypatch, module, perf_counter=read)

