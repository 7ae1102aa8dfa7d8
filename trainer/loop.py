"""The linear story of a run: build → resume → for each step: data, step, log, checkpoint, preempt?

Everything a step needs is built by the modules it imports; this file only orders them.
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from data import build_loader, merge_rank_states
from models import family_of
from models.lazy import close_sources
from trainer.build import (
    attach_null_condition, build_objective, build_student, count_parameters, open_teacher, seed_everything,
    teacher_placement,
)
from trainer.checkpoint import (
    CheckpointError, Checkpointer, check_teacher, config_changes, rng_state, set_rng_state, step_dir_name,
)
from trainer.config import RunConfig, config_hash, to_yaml
from trainer.distributed import DistEnv, agree, all_reduce_mean, destroy_distributed, init_distributed
from trainer.engines import build_engine
from trainer.evaluate import evaluate_quality, router_map, sample_images
from trainer.faults import Faults
from trainer.monitor import Monitor, peak_memory_gb
from trainer import peft
from trainer.preemption import REQUEUE_EXIT_CODE, PreemptionFlag
from trainer.step import DistillStep, Stopwatch, teacher_needed
from trainer.watchdog import StallWatchdog


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a NaN/Inf loss or gradient (each one's update was skipped)."""


@dataclass
class RunResult:
    step: int
    preempted: bool = False
    exit_code: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


def _every(step: int, n: int) -> bool:
    return n > 0 and step % n == 0


def train(cfg: RunConfig, preempt: PreemptionFlag | None = None) -> RunResult:
    """Run (or resume) the training described by `cfg` (validated); returns where it stopped and why.

    Models are built and loaded here, on every rank once the process group exists, each rank reading
    only its own share of the teacher. `preempt`: a flag a launcher installed early (else the loop
    installs `train.preempt_signals`)."""
    env = init_distributed(cfg.engine.collective_timeout_s)
    own_flag = preempt is None
    preempt = preempt or PreemptionFlag(tuple(cfg.train.preempt_signals))
    try:
        return _train(cfg, env, preempt)
    finally:
        if own_flag:
            preempt.restore()
        destroy_distributed()


def _train(cfg: RunConfig, env: DistEnv, preempt: PreemptionFlag) -> RunResult:
    run_dir = Path(cfg.run_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    source = open_teacher(cfg)  # mapped, not read; its identity hashed once (cached) by rank 0
    teacher_ckpt = source.checkpoint if source is not None else None
    teacher_id = source.identity if source is not None else {}

    torch.manual_seed(cfg.train.seed)  # identical student initialisation on every rank
    student, report = build_student(cfg, teacher_ckpt)
    inherit_only = teacher_ckpt is not None and not teacher_needed(cfg)  # e.g. DyDiT's recipe, no KD
    attach_null_condition(cfg, student)  # before the engine copies the student into its EMA
    seed_everything(cfg.train.seed, env.rank)
    objective = build_objective(cfg)
    engine = build_engine(cfg, env)
    # each rank reads its own rows of the teacher; one no loss reads is used for inheritance only (never placed)
    engine.setup(student, None if inherit_only else teacher_ckpt, report)
    attach_null_condition(cfg, engine.teacher)
    for state in ([teacher_ckpt.state_dict] if teacher_ckpt else []) + ([report.source] if report else []):
        close_sources(state)  # placed and filled: unmap the weights files
    loader = build_loader(cfg.data, env.rank, env.world_size)
    step_fn = DistillStep(cfg, objective, engine)

    faults = Faults.from_env()  # test-only fault injection; inert unless DITILL_DEBUG_FAULTS is set
    identity = {"config_hash": config_hash(cfg), "teacher": teacher_id or None}
    if peft.enabled(cfg):  # checkpoints hold the trainable tensors; this names the frozen base they adapt
        identity["peft"] = peft.base_identity(cfg, engine.raw_student, teacher_id)
    ckpt = Checkpointer(
        run_dir, env, keep_last=cfg.checkpoint.keep_last, keep_every=cfg.checkpoint.keep_every,
        async_save=cfg.checkpoint.async_save, identity=identity, config_yaml=to_yaml(cfg),
        before_commit=faults.before_commit,
    )
    app = engine.checkpoint_state()
    state = {"step": 0, "nonfinite_in_a_row": 0, "skipped_steps": 0}
    start = _resume(cfg, env, ckpt, app, state, loader, teacher_id, identity.get("peft"))

    monitor = Monitor(run_dir, env, cfg.train.steps, start)
    monitor.text(
        f"[ditill] engine={engine.name} world={env.world_size} device={env.device} "
        f"student={cfg.student.model} ({count_parameters(engine.raw_student) / 1e6:.2f}M params) "
        f"teacher={'none' if engine.teacher is None else f'{cfg.teacher.path} ({teacher_placement(engine.teacher)})'} "
        f"start_step={start}"
        + (f" inherit: {report.summary()}" if report else "")
        + (f" peft={cfg.peft.method}: {peft.peft_summary(engine.raw_student)}" if peft.enabled(cfg) else "")
        + (" (the teacher served inheritance only: no loss reads it, so it is not run)" if inherit_only else "")
    )
    watchdog = StallWatchdog(cfg.engine.collective_timeout_s, run_dir, env.rank)
    accum = cfg.train.global_batch // (env.world_size * cfg.train.micro_batch)
    watch = Stopwatch(env.device)
    data_iter = iter(loader)
    result = RunResult(step=start)
    step = start
    sums: dict[str, float] = {}
    eval_batch = None  # the condition rows evaluation samples use (text families): from the first batch
    try:
        while step < cfg.train.steps:
            watchdog.arm(f"step {step + 1}")
            log_now = _every(step + 1, cfg.train.log_every) or step + 1 == cfg.train.steps
            watch.reset(precise=log_now)
            t_step = time.perf_counter()
            terms: dict[str, torch.Tensor] = {}
            for a in range(accum):
                with watch.section("data"):
                    batch = faults.batch(step + 1, env.rank, next(data_iter))
                if eval_batch is None:
                    eval_batch = _eval_rows(batch, engine.raw_student, max(cfg.sample.num, cfg.sample.eval_num))
                with engine.accumulate(a == accum - 1):
                    micro = step_fn(batch, step, watch, 1.0 / accum, micro=a)
                for k, v in micro.items():
                    terms[k] = terms.get(k, 0.0) + v / accum
            terms = faults.loss(step + 1, env.rank, terms)
            faults.step(step + 1, env.rank, lambda: preempt.requested)
            # one collective: has any rank been signalled, has any rank a non-finite loss?
            stop, bad_loss = agree([preempt.requested, not math.isfinite(float(terms["loss"]))], env.device)
            with watch.section("optimizer"):
                out = engine.step(step, skip=bad_loss)  # a non-finite loss or gradient skips the update
            step += 1
            state["step"] = step
            _count_nonfinite(cfg, monitor, ckpt, state, step, skipped=out["skipped"] > 0)
            step_time = time.perf_counter() - t_step
            for k, v in {**{k: float(v) for k, v in terms.items()}, **out}.items():
                sums[k] = sums.get(k, 0.0) + v
            sums["_n"] = sums.get("_n", 0.0) + 1
            if log_now:
                result.metrics = _log(cfg, env, monitor, step, sums, watch, step_time, loader, state)
                sums = {}
            monitor.progress(step, float(terms["loss"]))
            if _every(step, cfg.sample.every):
                watchdog.arm(f"evaluation after step {step}")
                _evaluate(cfg, engine, objective, monitor, step, eval_batch)
            if _every(step, cfg.sample.eval_every):
                watchdog.arm(f"quality evaluation after step {step}")
                monitor.evaluation(step, evaluate_quality(cfg, engine, objective, step, eval_batch))
            if _every(step, cfg.checkpoint.every) or stop or step == cfg.train.steps:
                watchdog.arm(f"checkpoint of step {step}")
                _save(ckpt, engine_app=app, state=state, loader=loader, step=step, blocking=stop or step == cfg.train.steps)
            if stop:
                monitor.text(f"[ditill] preemption ({preempt.signal_name or 'another rank'}): checkpointed step {step}, exiting for requeue")
                result.preempted, result.exit_code = True, REQUEUE_EXIT_CODE
                break
        result.step = step
        watchdog.arm("the final checkpoint")
        ckpt.wait()
    finally:
        watchdog.close()
        monitor.close()
        if hasattr(loader, "close"):
            loader.close()
    return result


def _count_nonfinite(cfg, monitor: Monitor, ckpt: Checkpointer, state, step: int, skipped: bool) -> None:
    """Count a skipped (non-finite) step; `train.max_nonfinite` in a row stop the run, naming the newest
    checkpoint written before the streak began."""
    state["skipped_steps"] += int(skipped)
    state["nonfinite_in_a_row"] = state["nonfinite_in_a_row"] + 1 if skipped else 0
    if skipped:
        monitor.text(f"[ditill] step {step}: non-finite loss or gradient, update skipped "
                     f"({state['nonfinite_in_a_row']} in a row, {state['skipped_steps']} in all)")
    if state["nonfinite_in_a_row"] >= cfg.train.max_nonfinite:
        ckpt.wait()
        streak_start = step - state["nonfinite_in_a_row"]  # checkpoints after it hold skipped steps
        good = [s for s in ckpt.complete_steps() if s <= streak_start]
        raise NonFiniteError(
            f"{state['nonfinite_in_a_row']} consecutive steps had a NaN/Inf loss or gradient (train.max_nonfinite="
            f"{cfg.train.max_nonfinite}, last at step {step}); the last good checkpoint is "
            f"{ckpt.root / step_dir_name(good[-1]) if good else 'none (no checkpoint was written)'}. "
            "Lower optim.lr, enable optim.grad_clip, or check the data, then resume from it."
        )


def _resume(cfg, env, ckpt: Checkpointer, app, state, loader, teacher_id, base_id=None) -> int:
    request = str(cfg.checkpoint.resume)
    path = ckpt.find_resume(request)
    if path is None:
        if request == "never" and ckpt.complete_steps():
            raise CheckpointError(
                f"checkpoint.resume=never but {ckpt.root} holds checkpoints {ckpt.complete_steps()}; "
                "use a new run_dir, or checkpoint.resume=auto to continue"
            )
        return 0
    manifest = ckpt.manifest(path)
    check_teacher(manifest, teacher_id, bool(cfg.teacher and cfg.teacher.allow_changed), path)
    peft.check_base(manifest, base_id, path)
    saved_cfg = ckpt.saved_config(path)
    if env.is_main and saved_cfg is not None and manifest.get("config_hash") != config_hash(cfg):
        changes = config_changes(saved_cfg, to_yaml(cfg))
        warnings.warn(f"the config changed since {path} was written:\n  " + "\n  ".join(changes))
    extras = ckpt.load(path, app)
    if "resharded_from" in extras:
        # Another world size: model, EMA and optimizer were resharded by the engine's format. A step's
        # randomness is counter-based on (seed, step, sample position) and carries over exactly; the
        # global per-rank streams (not used by the step) are re-seeded from (seed, step). The data
        # position is global and carries over (re-planned by the loader when the global batch changed).
        old = extras["resharded_from"]
        state.update(old[0]["train"])
        seed_everything(cfg.train.seed + 7919 * state["step"], env.rank)
        loader.load_state_dict(merge_rank_states([o["loader"] for o in old]))
        if env.is_main:
            warnings.warn(f"resumed {path} written by {len(old)} ranks on {env.world_size} ranks")
    else:
        state.update(extras["train"])
        set_rng_state(extras["rng"])
        loader.load_state_dict(extras["loader"])
    return int(state["step"])


def checkpoint_extras(state, loader) -> dict:
    """What a checkpoint holds beside the engine's tensors: loop counters, the global RNG streams, data position.

    (A step's own randomness is counter-based and needs no state; first-wave checkpoints also hold a
    `shared_rng`, which is ignored.)"""
    return {"train": dict(state), "rng": rng_state(), "loader": loader.state_dict()}


def _save(ckpt: Checkpointer, *, engine_app, state, loader, step: int, blocking: bool) -> None:
    ckpt.save(step, engine_app, checkpoint_extras(state, loader), blocking=blocking)


def _log(cfg, env, monitor: Monitor, step: int, sums, watch: Stopwatch, step_time: float, loader, state) -> dict[str, float]:
    n = sums.pop("_n", 1.0)
    values = {k: v / n for k, v in sums.items()}
    values.update({f"time/{k}": v for k, v in watch.times.items()})
    values["time/step"] = step_time
    values["throughput/samples_per_s"] = cfg.train.global_batch / max(step_time, 1e-9)
    values["memory/peak_gb"] = peak_memory_gb(env.device)
    stats = loader.stats() if hasattr(loader, "stats") else {}
    values.update({k: float(v) for k, v in stats.items()})
    values = all_reduce_mean(values, env.device)
    values["train/skipped_steps"] = float(state["skipped_steps"])
    monitor.scalars(step, values)
    return values


def _eval_rows(batch: dict, model, n: int) -> dict:
    """Copies of the first `n` rows of the keys the model's condition reads (the loader reuses its buffers)."""
    keys = family_of(model).conditioning(model.config).batch_keys
    return {k: batch[k][:n].clone() for k in keys if k in batch}


def _evaluate(cfg: RunConfig, engine, objective, monitor: Monitor, step: int, batch: dict | None) -> None:
    """Sample grids from fixed noise and conditions on every rank; the EMA student beside the teacher."""
    raw = engine.raw_student
    grids = {}
    for i, (name, module) in enumerate(engine.eval_modules()):
        grids[name] = sample_images(module, raw, objective, cfg.sample, engine.env.device, engine.autocast(), batch)
        monitor.images(step, f"samples/{name}", grids[name])
        if i == 0 and raw.config.dynamic:  # the routers of the student (its EMA when there is one)
            monitor.router_plots(step, router_map(module, raw, objective, cfg.sample, engine.env.device, batch, engine.autocast()))
    if len(grids) > 1:  # each cell: student | teacher, same noise and label
        monitor.images(step, "samples/" + "_vs_".join(grids), torch.cat(list(grids.values()), dim=-1))
    if dist.is_initialized():
        dist.barrier()


def main_exit(result: RunResult) -> None:
    sys.exit(result.exit_code)
