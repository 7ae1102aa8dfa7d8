"""`python -m launch.benchmark checkpoint` runs end to end (a tiny student here; the quickstart size is its default).

No wall-clock value is asserted. What is: the async save really runs beside training (its commit is
held until the loop has taken a step, which a save that blocked the loop would never see), the
blocking times are the Checkpointer's own measure of each save, the reported size is that of the
checkpoint on disk, and every derived figure is the one its parts give. The benchmark's own clock is a
work clock (tests/bench_clocks.py): one unit per read plus WORK units per distillation step and per
optimizer step, so a timed step is exactly 1 + 2·WORK units and the load and raw-I/O windows (no step
inside) one unit each: their rates are the bytes they moved.
"""
import json
import shutil
import statistics
import threading
from pathlib import Path
from types import SimpleNamespace

from launch import benchmark
from launch.benchmarks import checkpoint as bench
from tests.bench_clocks import TickClock, install_clocks
from trainer.checkpoint import Checkpointer
from trainer.step import DistillStep

WORK = 1000.0  # clock units per distillation step and per optimizer step
ARGV = ["checkpoint", "--json", "--hidden", "32", "--depth", "2", "--batch", "8", "--warmup", "1", "--steps", "2",
        "--repeats", "1"]


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_checkpoint_benchmark_reports_blocking_times_and_rates(capsys, tmp_path, monkeypatch):
    steps = [0]
    step_call = DistillStep.__call__

    def counted_step(self, *args, **kwargs):
        steps[0] += 1
        return step_call(self, *args, **kwargs)

    def commit_after_a_step() -> None:
        """In the background commit of an async save: wait until the loop has taken one more step."""
        if threading.current_thread() is threading.main_thread():
            return
        seen = steps[0]
        deadline = threading.Event()
        for _ in range(600):  # 30 s: a save that blocks the loop leaves no step to wait for
            if steps[0] > seen:
                return
            deadline.wait(0.05)

    init, save = Checkpointer.__init__, Checkpointer.save
    held = {False: [], True: []}  # the Checkpointer's own measure of how long each save held the loop

    def gated_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.before_commit = commit_after_a_step

    def recorded_save(self, *args, **kwargs):
        save(self, *args, **kwargs)
        held[self.async_save].append(self.last_blocking_s)

    optimizer_steps = [0]
    trainer_init = bench.Trainer.__init__

    def counted_trainer(self, *args, **kwargs):
        trainer_init(self, *args, **kwargs)
        engine_step = self.engine.step

        def counted(*a, **k):
            optimizer_steps[0] += 1
            return engine_step(*a, **k)

        self.engine.step = counted

    tick = TickClock()
    monkeypatch.setattr(bench.Trainer, "__init__", counted_trainer)
    install_clocks(monkeypatch, bench, perf_counter=lambda: tick() + WORK * (steps[0] + optimizer_steps[0]))
    kept = []  # the benchmark's work directory, removed by the test after measuring it
    monkeypatch.setattr(DistillStep, "__call__", counted_step)
    monkeypatch.setattr(Checkpointer, "__init__", gated_init)
    monkeypatch.setattr(Checkpointer, "save", recorded_save)
    monkeypatch.setattr(bench, "shutil", SimpleNamespace(rmtree=lambda path, ignore_errors=False: kept.append(Path(path))))
    assert benchmark.main([*ARGV, "--dir", str(tmp_path)]) == 0
    r = json.loads(capsys.readouterr().out)["results"]
    work, = kept
    final = sorted((work / "run" / "checkpoints").glob("step_*"))[-1]  # the async one; the sync one was retired
    on_disk = _dir_size(final)
    shutil.rmtree(work)

    assert r["step_during_async_s"] is not None and r["step_during_async_s"] > 0  # the loop stepped during the save
    assert r["sync_blocked_s"] == statistics.median(held[False]) and len(held[False]) == 1
    assert r["async_blocked_s"] == statistics.median(held[True]) and len(held[True]) == 1
    assert r["async_blocked_s"] <= r["async_background_s"]  # blocked while staging, a part of the whole save
    assert abs(r["bytes"] - on_disk) <= 256, (r["bytes"], on_disk)  # same files; extras' JSON differs by a few digits
    assert r["bytes"] >= 16 * r["params"]  # student, EMA and both AdamW moments in fp32
    for key in ("sync", "async"):
        assert r[f"{key}_blocked_steps"] == r[f"{key}_blocked_s"] / r["step_s"], key
    assert r["save_bytes_per_s"] == r["bytes"] / r["sync_blocked_s"]
    assert r["bar_async_blocks_less_than_one_step"] == (r["async_blocked_s"] < r["step_s"])
    # work clock: a timed step is one distillation step and one optimizer step, nothing more or less
    assert r["step_s"] == r["step_during_async_s"] == 1 + 2 * WORK
    # the load and the raw passes each in a one-unit window of their own: the rate is the checkpoint's bytes
    for key in ("load_bytes_per_s", "raw_write_bytes_per_s", "raw_read_bytes_per_s"):
        assert r[key] == r["bytes"], key
    assert list(tmp_path.iterdir()) == []  # its files are removed
