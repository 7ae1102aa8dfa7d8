"""Real jobs that are killed, preempted, resharded, stalled and requeued, then compared step by step
with an uninterrupted run of the same config (bit-identical where the world size is unchanged).

Reference runs (module-scoped): REF1 — one process; REF2 — two ranks (FSDP2, gloo).
Faults are injected with DITILL_DEBUG_FAULTS (trainer/faults.py) only to slow steps down or to
park a step, so a kill lands at a known point; they never change the numbers.
"""
from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fault_utils import (
    finish, kill9, last_step, losses_by_step, start, start_ranks, started_at, tail, torchrun_cmd, train_cmd,
    wait_until,
)
from tests.helpers import assert_state_close
from tests.trainer_utils import REPO, base_env, free_port, write_config

STEPS = 12
RESHARD_RTOL = 1e-4  # another world size reduces in another order: ~1e-5 per few steps, compounding


def _config(path: Path) -> Path:
    return write_config(path, model="lit-s/2", train={"steps": STEPS, "global_batch": 16, "log_every": 1},
                        checkpoint={"every": 2, "async_save": True, "keep_last": 0}, optim={"lr": 3e-3})


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """Uninterrupted runs: one process, and two ranks (FSDP2), started side by side."""
    root = tmp_path_factory.mktemp("refs")
    cfg = _config(root / "c.yaml")
    one = start(train_cmd(cfg, [f"run_dir={root / 'ref1'}"]), root / "ref1.log", base_env())
    two = start(torchrun_cmd(cfg, [f"run_dir={root / 'ref2'}", "engine.kind=fsdp"], 2, f"--master_port={free_port()}"),
                root / "ref2.log", base_env())
    assert finish([one, two]) == [0, 0], tail(root / "ref1.log") + tail(root / "ref2.log")
    return {"cfg": cfg, "ref1": root / "ref1", "ref2": root / "ref2",
            "loss1": losses_by_step(root / "ref1"), "loss2": losses_by_step(root / "ref2")}


def _run_dir_from_checkpoint(src_run: Path, step: int, dst: Path) -> Path:
    """A run directory holding only `src_run`'s checkpoint at `step` (as if the run had stopped there)."""
    (dst / "checkpoints").mkdir(parents=True)
    name = f"step_{step:08d}"
    shutil.copytree(src_run / "checkpoints" / name, dst / "checkpoints" / name)
    shutil.copy(src_run / "config.yaml", dst / "config.yaml")
    lines = [ln for ln in (src_run / "metrics.jsonl").read_text().splitlines() if json.loads(ln)["step"] <= step]
    (dst / "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines))
    return dst


def test_kill9_at_random_steps_and_during_an_async_save_resumes_bit_identically(refs, tmp_path):
    """SIGKILL three times (two seeded random steps, and once while an async save is in flight),
    relaunch the same command each time: every step is logged once with exactly the reference loss."""
    run, cfg = tmp_path / "run", refs["cfg"]
    cmd = train_cmd(cfg, [f"run_dir={run}"])
    targets = sorted(random.Random(5).sample(range(2, STEPS - 1), 2))
    logs = []
    for i, target in enumerate([targets[0], "save", targets[1]]):
        log = tmp_path / f"launch{i}.log"
        logs.append(log)
        slow = "slow_step=0.15" + (";slow_save=60" if target == "save" else "")
        proc = start(cmd, log, base_env(DITILL_DEBUG_FAULTS=slow))
        begin = started_at(log, [proc])
        if target == "save":
            wait_until(lambda: last_step(run) > begin and any((run / "checkpoints").glob(".tmp-step_*")), [proc],
                       what="an async save in flight")
            in_flight = next((run / "checkpoints").glob(".tmp-step_*")).name
            intact = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
        else:
            wait_until(lambda: last_step(run) >= max(target, begin + 1), [proc], what=f"step {target}")
        kill9([proc])
        assert proc.returncode == -signal.SIGKILL
    final = start(cmd, tmp_path / "final.log", base_env())
    assert finish([final]) == [0], tail(tmp_path / "final.log")
    after_save_kill = tail(logs[2], 100000)
    assert f"removing incomplete checkpoint {run / 'checkpoints' / in_flight}" in after_save_kill
    assert f"start_step={int(intact[-1][5:])}" in after_save_kill  # the previous checkpoint, intact, was used
    assert losses_by_step(run) == refs["loss1"]


def test_sigterm_to_one_rank_checkpoints_every_rank_exits_for_requeue_and_resumes_identically(refs, tmp_path):
    run, cfg = tmp_path / "run", refs["cfg"]
    overrides = [f"run_dir={run}", "engine.kind=fsdp"]
    procs = start_ranks(cfg, overrides, 2, tmp_path / "logs", DITILL_DEBUG_FAULTS="slow_step=0.2")
    wait_until(lambda: last_step(run) >= 3, procs, what="step 3")
    procs[1].send_signal(signal.SIGTERM)  # rank 1 only, in the middle of a step
    codes = finish(procs, timeout=120)
    assert codes == [124, 124], tail(tmp_path / "logs" / "rank0.log") + tail(tmp_path / "logs" / "rank1.log")
    stopped = last_step(run)
    assert stopped < STEPS
    assert (run / "checkpoints" / "latest").read_text() == f"step_{stopped:08d}"
    assert f"checkpointed step {stopped}, exiting for requeue" in tail(tmp_path / "logs" / "rank0.log", 100000)
    again = start_ranks(cfg, overrides, 2, tmp_path / "logs2")
    assert finish(again) == [0, 0], tail(tmp_path / "logs2" / "rank0.log")
    assert f"start_step={stopped}" in tail(tmp_path / "logs2" / "rank0.log", 100000)
    assert losses_by_step(run) == refs["loss2"]


@pytest.mark.parametrize("direction", ["2to1", "1to2"])
def test_reshard_between_world_sizes(refs, tmp_path, direction):
    """A checkpoint of 2 FSDP ranks resumes on 1 process, and one of 1 process on 2 FSDP ranks:
    model, EMA and optimizer are resharded, the data position carries over and the per-sample noise is
    counter-based, so the continuation follows the reference within multi-rank rounding."""
    src, nproc, extra = (refs["ref2"], 1, []) if direction == "2to1" else (refs["ref1"], 2, ["engine.kind=fsdp"])
    run = _run_dir_from_checkpoint(src, 6, tmp_path / "run")
    overrides = [f"run_dir={run}", *extra]
    cmd = train_cmd(refs["cfg"], overrides) if nproc == 1 else torchrun_cmd(refs["cfg"], overrides, 2, f"--master_port={free_port()}")
    proc = start(cmd, tmp_path / "log", base_env())
    assert finish([proc]) == [0], tail(tmp_path / "log")
    log = tail(tmp_path / "log", 100000)
    assert "start_step=6" in log and f"written by {3 - nproc} ranks on {nproc} ranks" in log
    got = losses_by_step(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for ref in ("loss1", "loss2"):
        assert [got[s] for s in range(7, STEPS + 1)] == pytest.approx([refs[ref][s] for s in range(7, STEPS + 1)], rel=RESHARD_RTOL)
    from trainer.export import export_run

    mine, ref = export_run(run, tmp_path / "exp"), export_run(refs["ref1"], tmp_path / "exp_ref")
    from safetensors.torch import load_file

    for name in ("student", "ema"):
        assert_state_close(load_file(mine[name]), load_file(ref[name]), rtol=1e-3, atol=1e-5, what=name)


def test_a_rank_that_hangs_makes_every_rank_dump_its_stack(refs, tmp_path):
    run = tmp_path / "run"
    overrides = [f"run_dir={run}", "engine.kind=fsdp", "engine.collective_timeout_s=8"]
    procs = start_ranks(refs["cfg"], overrides, 2, tmp_path / "logs", DITILL_DEBUG_FAULTS="hang@3:rank=1")
    codes = finish(procs, timeout=180)
    assert codes == [125, 125], tail(tmp_path / "logs" / "rank0.log")
    hung, waiting = (run / "stalls" / "rank00001.txt").read_text(), (run / "stalls" / "rank00000.txt").read_text()
    assert "rank 1" in hung and "step 3 stalled" in hung
    assert "_injected_hang" in hung and "faults.py" in hung  # where rank 1 hung
    assert "step 3 stalled" in waiting and "agree" in waiting  # rank 0 waits in the step's collective
    assert "_injected_hang" in tail(tmp_path / "logs" / "rank1.log", 100000)  # also on stderr


def test_two_nodes_one_killed_elastic_restart_resumes_both(refs, tmp_path):
    """Two torchrun agents ("nodes", one rank each) on a c10d rendezvous over loopback; one node's
    worker is SIGKILLed; torchrun restarts both workers, which resume from the latest checkpoint.

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with torch 2.14's shared rendezvous store the restarted
    workers can read the previous round's gloo addresses and fail to connect (seen here without it)."""
    run = tmp_path / "run"
    port = free_port()
    rdzv = ["--nnodes=2", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=ditill-elastic",
            "--max-restarts=2", "--monitor-interval=0.5"]
    cmd = torchrun_cmd(refs["cfg"], [f"run_dir={run}", "engine.kind=fsdp"], 1, *rdzv)
    env = base_env(DITILL_DEBUG_FAULTS="slow_step=0.2", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    nodes = [start(cmd, tmp_path / f"node{i}.log", env) for i in range(2)]
    target = random.Random(7).randint(3, 8)
    wait_until(lambda: last_step(run) >= target, nodes, what=f"step {target}")
    import psutil

    workers = [c for c in psutil.Process(nodes[1].pid).children(recursive=True) if "launch.train" in " ".join(c.cmdline())]
    assert len(workers) == 1
    workers[0].kill()
    codes = finish(nodes, timeout=300)
    assert codes == [0, 0], tail(tmp_path / "node0.log") + tail(tmp_path / "node1.log")
    logs = tail(tmp_path / "node0.log", 200000) + tail(tmp_path / "node1.log", 200000)
    assert "start_step=0" in logs and any(f"start_step={s}" in logs for s in range(2, STEPS, 2))
    assert losses_by_step(run) == refs["loss2"]


def test_submitit_local_time_out_requeues_and_the_job_resumes(refs, tmp_path):
    """`launch.submit --cluster local`: the controller's time-out signal (USR2) arrives while step 4
    is parked; every rank checkpoints, submitit requeues the job through TrainJob.checkpoint(), and the
    requeued job resumes in the same run directory and finishes with the reference losses.
    (On a loaded machine the signal may come before step 4, and the job is requeued once more.)"""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "launch.submit", str(refs["cfg"]), f"run_dir={run}", "engine.kind=fsdp",
           "--cluster", "local", "--nodes", "1", "--gpus-per-node", "2", "--time", "50s", "--signal-delay-s", "20",
           "--max-num-timeout", "5", "--wait"]
    proc = subprocess.run(cmd, cwd=REPO, env=base_env(DITILL_DEBUG_FAULTS="wait_preempt@4"), capture_output=True,
                          text=True, timeout=400)
    jobs = [json.loads(ln) for ln in (run / "launch" / "jobs.jsonl").read_text().splitlines()]
    assert proc.returncode == 0, proc.stderr[-3000:] + json.dumps(jobs)
    events = [j["event"] for j in jobs]
    assert events[0] == "submitted" and events[-1] == "finished" and "requeue" in events, events
    assert events[1:] == ["start", "requeue"] * events.count("requeue") + ["start", "finished"], events
    requeues = [j for j in jobs if j["event"] == "requeue"]
    assert requeues[-1]["step"] == 4 and all(r["signal"] == "SIGUSR2" for r in requeues)
    assert len({j["job_id"] for j in jobs}) == 1  # the same job, requeued
    assert "launch.submit" in jobs[0]["command"] and "--cluster local" in jobs[1]["command"]
    assert losses_by_step(run) == refs["loss2"]


@pytest.mark.slow
@pytest.mark.parametrize("kills", [12])
def test_many_kill9_of_a_two_rank_torchrun_job_resume_bit_identically(tmp_path, kills):
    """The opt-in long version: a 40-step 2-rank torchrun job (agent and workers) SIGKILLed at
    `kills` seeded random points — in a step, a save or a start-up — and relaunched each time."""
    steps = 40
    cfg = write_config(tmp_path / "c.yaml", model="lit-s/2", train={"steps": steps, "global_batch": 16, "log_every": 1},
                       checkpoint={"every": 3, "async_save": True, "keep_last": 2}, optim={"lr": 3e-3})
    cmd = lambda run: torchrun_cmd(cfg, [f"run_dir={run}", "engine.kind=fsdp"], 2, f"--master_port={free_port()}")  # noqa: E731
    ref = start(cmd(tmp_path / "ref"), tmp_path / "ref.log", base_env())
    assert finish([ref]) == [0], tail(tmp_path / "ref.log")
    run, rng, done = tmp_path / "run", random.Random(11), 0
    while done < kills:
        log = tmp_path / f"launch{done}.log"
        proc = start(cmd(run), log, base_env(DITILL_DEBUG_FAULTS="slow_step=0.1"))
        if rng.random() < 0.25:  # sometimes while it is still starting or resuming
            time.sleep(rng.uniform(1.0, 8.0))
        else:
            begin = started_at(log, [proc])
            if begin >= steps - 2:
                kill9([proc])
                break
            target = rng.randint(begin + 1, min(begin + 8, steps - 1))
            wait_until(lambda: last_step(run) >= target, [proc], what=f"step {target}")
            time.sleep(rng.uniform(0.0, 0.3))
        kill9([proc])
        done += 1
    assert done == kills, f"the run finished after {done} kills"
    final = start(cmd(run), tmp_path / "final.log", base_env())
    assert finish([final]) == [0], tail(tmp_path / "final.log")
    assert losses_by_step(run) == losses_by_step(tmp_path / "ref")
