"""`python -m launch.benchmark checkpoint [--json] [--hidden 384 --depth 12 --batch 32 ...]`

How long a checkpoint holds the training loop, asynchronous against synchronous, in units of the
step time of a quickstart-sized distillation step (default: a LiT student with hidden 384 and depth
12 — DiT-S/2 width and depth — distilled from a same-sized DiT teacher on the bundled 8×8 digits,
batch 32, one process), and the save and load rates beside the raw rate of the same disk.

Measured with the trainer's own pieces (engine, distillation step, Checkpointer):
- step: mean wall time of a training step without any save;
- blocked: the time `Checkpointer.save` keeps the loop (sync: write + fsync + checksums + manifest;
  async: staging a CPU copy of the state, the rest runs on a background thread);
- while async: mean step time while the background save runs (it shares the CPU with training);
- save/load rate: bytes of the checkpoint over the synchronous save time / over `Checkpointer.load`;
- raw write/read: the same number of bytes written with `open().write()` + fsync, then read back,
  in the same directory.
Bar: the async save blocks the loop for less than one step.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def raw_rates(directory: Path, nbytes: int) -> tuple[float, float]:
    """(write, read) bytes/s for `nbytes` in 16 MiB blocks: write + fsync, then read back."""
    block = os.urandom(16 << 20)
    path = directory / "raw.bin"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())
    write = nbytes / (time.perf_counter() - t0)
    buf = bytearray(16 << 20)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    read = nbytes / (time.perf_counter() - t0)
    path.unlink()
    return write, read


class Trainer:
    """The loop's pieces for one process: engine, distillation step, data, checkpointer."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        import torch

        from data import build_loader
        from models import build_model
        from models.convert import save_safetensors
        from trainer.build import build_objective, build_student, count_parameters, open_teacher, seed_everything
        from trainer.checkpoint import Checkpointer
        from trainer.config import load_config
        from trainer.distributed import init_distributed
        from trainer.engines import build_engine
        from trainer.step import DistillStep, Stopwatch

        args_str = f"{{depth: {args.depth}, hidden_size: {args.hidden}, num_heads: {args.heads}, input_size: 8, in_channels: 1, num_classes: 10}}"
        overrides = [f"run_dir={work / 'run'}", f"student.model={args.model}", f"student.args={args_str}",
                     "student.init=random", "data.format=digits", f"train.global_batch={args.batch}",
                     "checkpoint.keep_last=1", "engine.kind=single"]
        if args.no_teacher:
            overrides.append("teacher=null")
        else:
            torch.manual_seed(0)
            heads = 6 if args.hidden % 6 == 0 else 2  # DiT-S has 6 heads
            teacher = build_model(args.teacher, depth=args.depth, hidden_size=args.hidden, num_heads=heads, input_size=8,
                                  in_channels=1, num_classes=10)
            path = work / "teacher.safetensors"
            save_safetensors(teacher.state_dict(), teacher.config, path)
            overrides.append(f"teacher.path={path}")
        self.cfg = cfg = load_config(None, overrides, world_size=1)
        self.env = init_distributed(600)
        source = open_teacher(cfg)
        teacher = source.checkpoint if source is not None else None
        torch.manual_seed(0)
        student, plan = build_student(cfg, teacher)
        seed_everything(0, 0)
        self.engine = build_engine(cfg, self.env)
        self.engine.setup(student, teacher, plan)
        self.params = count_parameters(self.engine.raw_student)
        self.step_fn = DistillStep(cfg, build_objective(cfg), self.engine)
        self.loader = build_loader(cfg.data, 0, 1)
        self.data = iter(self.loader)
        self.watch = Stopwatch(self.env.device)
        self.step = 0
        self.make_ckpt = lambda async_save: Checkpointer(work / "run", self.env, keep_last=1, async_save=async_save)

    def train_step(self) -> float:
        t0 = time.perf_counter()
        with self.engine.accumulate(True):
            self.step_fn(next(self.data), self.step, self.watch, 1.0)
        self.engine.step(self.step)
        self.step += 1
        return time.perf_counter() - t0

    def extra(self) -> dict[str, Any]:
        from trainer.loop import checkpoint_extras

        return checkpoint_extras({"step": self.step}, self.loader)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from trainer.checkpoint import step_dir_name

    base = Path(args.dir) if args.dir else None
    work = Path(tempfile.mkdtemp(prefix="ditill-ckpt-bench-", dir=base))
    try:
        tr = Trainer(args, work)
        for _ in range(args.warmup):
            tr.train_step()
        step = statistics.median(tr.train_step() for _ in range(args.steps))
        res: dict[str, Any] = {"params": tr.params, "step_s": step}
        sync = tr.make_ckpt(False)
        blocked_sync, sizes = [], []
        for _ in range(args.repeats):
            tr.train_step()
            sync.save(tr.step, tr.engine.checkpoint_state(), tr.extra())
            blocked_sync.append(sync.last_blocking_s)
            sizes.append(_dir_bytes(sync.root / step_dir_name(tr.step)))
        nbytes = sizes[-1]
        path = sync.root / step_dir_name(tr.step)
        t0 = time.perf_counter()
        sync.load(path, tr.engine.checkpoint_state())
        load_s = time.perf_counter() - t0
        asyn = tr.make_ckpt(True)
        blocked_async, during, background = [], [], []
        for _ in range(args.repeats):
            tr.train_step()
            t0 = time.perf_counter()
            asyn.save(tr.step, tr.engine.checkpoint_state(), tr.extra())
            blocked_async.append(asyn.last_blocking_s)
            while asyn.in_flight():  # steps while the save runs in the background
                during.append(tr.train_step())
            asyn.wait()
            background.append(time.perf_counter() - t0)
        raw_w, raw_r = raw_rates(work, nbytes)
        b_sync, b_async = statistics.median(blocked_sync), statistics.median(blocked_async)
        res.update({
            "bytes": nbytes,
            "sync_blocked_s": b_sync, "sync_blocked_steps": b_sync / step,
            "async_blocked_s": b_async, "async_blocked_steps": b_async / step,
            "async_background_s": statistics.median(background),
            "step_during_async_s": statistics.median(during) if during else None,
            "save_bytes_per_s": nbytes / b_sync, "load_bytes_per_s": nbytes / load_s,
            "raw_write_bytes_per_s": raw_w, "raw_read_bytes_per_s": raw_r,
            "bar_async_blocks_less_than_one_step": b_async < step,
        })
        from trainer.distributed import destroy_distributed

        destroy_distributed()
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)


def table(args: argparse.Namespace, r: dict[str, Any]) -> str:
    mb = lambda b: f"{b / 1e6:,.0f} MB/s"  # noqa: E731
    who = f"{args.model} hidden {args.hidden} depth {args.depth} ({r['params'] / 1e6:.1f}M params)"
    teacher = "no teacher" if args.no_teacher else f"teacher {args.teacher} of the same size"
    during = r["step_during_async_s"]
    rows = [
        ("step (no save)", f"{r['step_s']:.3f} s", ""),
        ("sync save: loop blocked", f"{r['sync_blocked_s']:.3f} s", f"{r['sync_blocked_steps']:.2f} steps"),
        ("async save: loop blocked", f"{r['async_blocked_s']:.3f} s", f"{r['async_blocked_steps']:.2f} steps  "
         f"(bar < 1: {'PASS' if r['bar_async_blocks_less_than_one_step'] else 'FAIL'})"),
        ("async save: done in background after", f"{r['async_background_s']:.3f} s", ""),
        ("step while it runs", f"{during:.3f} s" if during else "n/a", f"{during / r['step_s']:.2f}x a step" if during else ""),
        ("checkpoint size", f"{r['bytes'] / 1e6:,.0f} MB", "student + EMA + AdamW moments + extras"),
        ("save rate (sync: write+fsync+sha256)", mb(r["save_bytes_per_s"]), ""),
        ("load rate", mb(r["load_bytes_per_s"]), ""),
        ("raw write (open/write/fsync), same dir", mb(r["raw_write_bytes_per_s"]), ""),
        ("raw read, same file", mb(r["raw_read_bytes_per_s"]), ""),
    ]
    w = max(len(a) for a, _, _ in rows)
    lines = [f"checkpoint benchmark: {who}, {teacher}, digits 8x8, batch {args.batch}, 1 process, CPU"]
    lines += [f"  {a:<{w}}  {b:>14}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.benchmark checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--model", default="lit-s/2")
    p.add_argument("--teacher", default="dit-s/2")
    p.add_argument("--no-teacher", action="store_true", help="time a student-only step (no distillation)")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--heads", type=int, default=2, help="student attention heads")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="steps timed without a save")
    p.add_argument("--repeats", type=int, default=2, help="saves of each kind")
    p.add_argument("--dir", default=None, help="where to write (default: the system temp dir)")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    r = measure(args)
    if args.json:
        print(json.dumps({"suite": "checkpoint", "config": vars(args), "results": r}, indent=1))
    else:
        print(table(args, r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
