"""`python -m launch.benchmark step [--json] [--quick]`: what a training step costs.

Side by side in one process, steps interleaved, with the real engine and distillation step
(synthetic batches, so the data layer is not measured): student-only training vs teacher+student distillation at equal size,
and activation checkpointing off vs on. Memory is the peak GPU allocation on CUDA; on the CPU it is
the bytes autograd saves for backward (activation memory, measured exactly by a saved-tensor hook),
because the process's peak RSS cannot be reset between configurations.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import contextmanager
from typing import Iterator

import torch

SIZES = {
    "default": {"model": "dit-s/2", "args": {"depth": 6, "hidden_size": 256, "num_heads": 4, "patch_size": 1,
                                             "input_size": 8, "in_channels": 1, "num_classes": 10}, "batch": 64},
    "quick": {"model": "dit-s/2", "args": {"depth": 2, "hidden_size": 64, "num_heads": 2, "patch_size": 2,
                                           "input_size": 8, "in_channels": 1, "num_classes": 10}, "batch": 16},
}


@contextmanager
def saved_bytes_counter() -> Iterator[list[int]]:
    """Counts bytes of tensors saved for backward (distinct storages) during the block."""
    seen: set[int] = set()
    total = [0]

    def pack(t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def _overrides(size: dict, teacher_path: str | None, ac: str, steps: int) -> list[str]:
    ov = [f"student.args.{k}={v}" for k, v in size["args"].items()]
    ov += [
        f"student.model={size['model']}", f"train.global_batch={size['batch']}",
        f"train.steps={steps}", f"engine.activation_checkpointing={ac}", "checkpoint.async_save=false",
    ]
    if teacher_path is None:
        ov += ["teacher=null", "student.init=random"]
    else:
        ov += [f"teacher.path={teacher_path}", "student.init=inherit"]
    return ov


class Runner:
    """One configuration's engine and step on a fixed synthetic batch."""

    def __init__(self, size: dict, teacher_path: str | None, ac: str, env) -> None:
        from trainer.build import build_objective, build_student, open_teacher
        from trainer.config import load_config
        from trainer.engines import build_engine
        from trainer.step import DistillStep, Stopwatch

        cfg = load_config(None, _overrides(size, teacher_path, ac, 1000), world_size=1)
        source = open_teacher(cfg)
        teacher = source.checkpoint if source is not None else None
        torch.manual_seed(0)
        student, plan = build_student(cfg, teacher)
        self.engine = build_engine(cfg, env)
        self.engine.setup(student, teacher, plan)
        self.step_fn = DistillStep(cfg, build_objective(cfg), self.engine)
        mc = student.config
        g = torch.Generator().manual_seed(0)
        self.batch = {"x": torch.randn(size["batch"], mc.in_channels, mc.input_size, mc.input_size, generator=g),
                      "y": torch.randint(0, mc.num_classes, (size["batch"],), generator=g)}
        self.watch = Stopwatch(env.device)
        self.device = env.device
        self.i = 0
        self.times: list[float] = []
        self.parts: list[dict[str, float]] = []
        self.memory = 0.0

    def step(self, record: bool) -> None:
        self.watch.reset(precise=True)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with saved_bytes_counter() as counter:
            self.step_fn(self.batch, self.i, self.watch, 1.0)
        with self.watch.section("optimizer"):
            self.engine.step(self.i)
        self.i += 1
        if record:
            self.times.append(time.perf_counter() - t0)
            self.parts.append(dict(self.watch.times))
            peak = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else counter[0]
            self.memory = max(self.memory, peak / 2**20)

    def summary(self) -> dict[str, float | str]:
        med = statistics.median
        return {
            "step_s": med(self.times),
            "teacher_s": med(p.get("teacher", 0.0) for p in self.parts),
            "student_s": med(p.get("student", 0.0) for p in self.parts),
            "optimizer_s": med(p.get("optimizer", 0.0) for p in self.parts),
            "memory_mb": self.memory,
            "memory_kind": "cuda_peak" if self.device.type == "cuda" else "saved_activations",
        }


def run(quick: bool, repeats: int) -> dict:
    """Configurations interleaved step by step, so machine load drifts hit all of them alike."""
    import tempfile

    from models import build_model
    from models.convert import save_safetensors
    from trainer.distributed import destroy_distributed, init_distributed

    size = SIZES["quick" if quick else "default"]
    env = init_distributed()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            teacher = build_model(size["model"], **size["args"])
            path = f"{tmp}/teacher.safetensors"
            save_safetensors(teacher.state_dict(), teacher.config, path)
            runners = {
                "student_only": Runner(size, None, "none", env),
                "distill": Runner(size, path, "none", env),
                "distill_ac_full": Runner(size, path, "full", env),
            }
        for i in range(2 + repeats):
            for r in runners.values():
                r.step(record=i >= 2)
        rows = {k: r.summary() for k, r in runners.items()}
    finally:
        destroy_distributed()
    base = rows["student_only"]["step_s"]
    return {
        "config": {**size, "repeats": repeats, "device": env.device.type, "threads": torch.get_num_threads()},
        "rows": rows,
        "ratios": {
            "distill_over_student_only": rows["distill"]["step_s"] / base,
            "ac_time_over_no_ac": rows["distill_ac_full"]["step_s"] / rows["distill"]["step_s"],
            "ac_memory_over_no_ac": rows["distill_ac_full"]["memory_mb"] / max(rows["distill"]["memory_mb"], 1e-9),
        },
        "bar": {"distill_over_student_only_max": 1.5},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.benchmark step", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny model (a smoke run, not a measurement)")
    p.add_argument("--repeats", type=int, default=6)
    args = p.parse_args(argv)
    res = run(args.quick, args.repeats)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    c = res["config"]
    print(f"step benchmark: {c['model']} {c['args']} batch {c['batch']}, {c['device']}, {c['threads']} threads, "
          f"median of {c['repeats']}")
    print(f"{'config':<18}{'step ms':>10}{'teacher ms':>12}{'student ms':>12}{'optim ms':>10}{'memory MB':>12}")
    for name, r in res["rows"].items():
        print(f"{name:<18}{r['step_s'] * 1e3:>10.1f}{r['teacher_s'] * 1e3:>12.1f}{r['student_s'] * 1e3:>12.1f}"
              f"{r['optimizer_s'] * 1e3:>10.1f}{r['memory_mb']:>12.1f}")
    r = res["ratios"]
    kind = next(iter(res["rows"].values()))["memory_kind"]
    print(f"distill / student-only step time: {r['distill_over_student_only']:.2f}x (bar <= 1.5x)")
    print(f"activation checkpointing: time {r['ac_time_over_no_ac']:.2f}x, memory ({kind}) {r['ac_memory_over_no_ac']:.2f}x")
    return 0
