"""`python -m launch.submit CONFIG [key=value ...] --nodes N --gpus-per-node G [--cluster PROFILE]
[--partition P --account A --time T --qos Q --constraint C] [--max-requeues K] [--wait] [--dry-run]`

Queues a training run with submitit: one task per GPU (`tasks_per_node = G`), each task sets up
`torch.distributed` from the job environment (rank, world size, master address and port) and runs
the same trainer as `launch.train`. The cluster profile (`configs/clusters/<name>.yaml`, or a path)
gives the executor (`slurm` or `local`) and its defaults; flags override it.

Preemption and time-out: SLURM (or the local controller) sends USR2 `signal_delay_s` before the
limit, SIGTERM/SIGUSR1 may come on preemption. Each only sets the trainer's flag; at the next step
boundary every rank saves (blocking) and leaves the loop, then rank 0 hands the signal back to
submitit, which calls `TrainJob.checkpoint()` — it returns a resubmission of the same callable, so
the same run directory is used and the job resumes from its checkpoint — and requeues the job.
Requeues are capped by `max_requeues` (all causes) and submitit's `max_num_timeout` (time-outs).
Every submission, start, requeue and end is appended to `<run_dir>/launch/jobs.jsonl` with the job
id and the command; submitit's scripts and logs are in `<run_dir>/launch/submitit/`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PROFILES = REPO / "configs" / "clusters"
PROFILE_KEYS = {"executor", "partition", "account", "qos", "constraint", "time", "signal_delay_s", "max_num_timeout",
                "max_requeues", "cpus_per_task", "mem_gb", "exclusive", "additional", "setup"}


# --- the run directory's launch record --------------------------------------------------------------
def jobs_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / "launch" / "jobs.jsonl"


def record(run_dir: str | Path, event: str, **fields: Any) -> None:
    path = jobs_file(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields}
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jobs(run_dir: str | Path) -> list[dict[str, Any]]:
    path = jobs_file(run_dir)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


# --- what runs in every task -----------------------------------------------------------------------
class TrainJob:
    """The submitit callable: picklable, re-submitted as-is on requeue (same config, same run dir)."""

    def __init__(self, config: str, overrides: list[str], run_dir: str, command: str, max_requeues: int,
                 signals: list[str]) -> None:
        self.config, self.overrides, self.run_dir = config, list(overrides), run_dir
        self.command, self.max_requeues, self.signals = command, max_requeues, list(signals)

    def __call__(self) -> dict[str, Any]:
        import submitit

        from trainer.preemption import REQUEUE_EXIT_CODE, PreemptionFlag

        usr_sig = submitit.JobEnvironment._usr_sig()  # what submitit sends before a time-out (USR2)
        flag = PreemptionFlag(sorted({*self.signals, usr_sig.name}))  # first, so no signal is lost while starting
        job = submitit.JobEnvironment()
        dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        if job.global_rank == 0:
            record(self.run_dir, "start", job_id=job.job_id, nodes=job.num_nodes, tasks=job.num_tasks,
                   hostnames=list(job.hostnames), master=f"{dist_env.master_addr}:{dist_env.master_port}",
                   command=self.command)
        try:
            result = self._train(flag)
        except BaseException as e:
            if job.global_rank == 0:
                record(self.run_dir, "failed", job_id=job.job_id, error=f"{type(e).__name__}: {e}"[:2000])
            raise
        finally:
            flag.restore()  # submitit's handlers are back
        if result.preempted:
            if job.global_rank == 0:
                record(self.run_dir, "requeue", job_id=job.job_id, step=result.step, signal=flag.signal_name)
            # Hand the signal to submitit: on rank 0 it calls checkpoint() and requeues (and exits);
            # on other ranks it only logs. Every rank then leaves with the requeue status.
            os.kill(os.getpid(), usr_sig)
            raise SystemExit(REQUEUE_EXIT_CODE)
        if job.global_rank == 0:
            record(self.run_dir, "finished", job_id=job.job_id, step=result.step)
        return {"step": result.step, "metrics": result.metrics}

    def _train(self, flag):
        from trainer.config import load_config
        from trainer.loop import train

        cfg = load_config(self.config, self.overrides)
        return train(cfg, preempt=flag)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit on rank 0 when the job is preempted or times out: the resubmission."""
        import submitit

        requeues = sum(1 for e in read_jobs(self.run_dir) if e["event"] == "requeue")
        if requeues > self.max_requeues:
            record(self.run_dir, "requeue-refused", reason=f"{requeues} requeues > max_requeues={self.max_requeues}")
            return None  # submitit then ends the job instead of requeuing it
        return submitit.helpers.DelayedSubmission(self)


# --- submission ------------------------------------------------------------------------------------
def load_profile(name: str) -> dict[str, Any]:
    path = Path(name) if name.endswith((".yaml", ".yml")) else PROFILES / f"{name}.yaml"
    if not path.exists():
        have = sorted(p.stem for p in PROFILES.glob("*.yaml"))
        raise SystemExit(f"error: cluster profile {name!r} not found ({path}); have {have} or pass a .yaml path")
    profile = yaml.safe_load(path.read_text()) or {}
    unknown = set(profile) - PROFILE_KEYS
    if unknown:
        raise SystemExit(f"error: {path}: unknown keys {sorted(unknown)}; allowed: {sorted(PROFILE_KEYS)}")
    if profile.get("executor") not in ("slurm", "local"):
        raise SystemExit(f"error: {path}: executor must be slurm or local, got {profile.get('executor')!r}")
    return profile


def parse_minutes(text: str | int | float) -> float:
    """`90s`, `45m`, `2h`, or SLURM's own forms: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    s = str(text).strip()
    if m := re.fullmatch(r"([\d.]+)\s*([smh])", s):
        return float(m.group(1)) * {"s": 1 / 60, "m": 1, "h": 60}[m.group(2)]
    if m := re.fullmatch(r"(\d+)-(\d+)(?::(\d+))?(?::(\d+))?", s):  # with days, hours come first
        d, h, mi, sec = (int(g) if g else 0 for g in m.groups())
        return d * 1440 + h * 60 + mi + sec / 60
    if m := re.fullmatch(r"(?:(\d+):)?(\d+):(\d+)", s):  # without days, two fields are MM:SS
        h, mi, sec = (int(g) if g else 0 for g in m.groups())
        return h * 60 + mi + sec / 60
    try:
        return float(s)
    except ValueError:
        raise SystemExit(f"error: --time {text!r}: use 90s, 45m, 2h, MM:SS, HH:MM:SS, D-HH[:MM[:SS]] or minutes") from None


def slurm_parameters(profile: dict[str, Any], nodes: int, gpus: int, name: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters: one task per GPU, the time-out signal, the profile's extras."""
    params: dict[str, Any] = dict(job_name=name, nodes=nodes, ntasks_per_node=gpus, gpus_per_node=gpus,
                                  time=max(1, int(round(parse_minutes(profile.get("time", "60m"))))),
                                  signal_delay_s=int(profile.get("signal_delay_s", 120)),
                                  setup=list(profile.get("setup") or []),
                                  additional_parameters=dict(profile.get("additional") or {}))
    for key in ("partition", "account", "qos", "constraint", "cpus_per_task"):
        if profile.get(key) is not None:
            params[key] = profile[key]
    if profile.get("mem_gb"):
        params["mem"] = f"{int(profile['mem_gb'])}GB"
    if profile.get("exclusive"):
        params["exclusive"] = True
    return params


def build_executor(profile: dict[str, Any], folder: Path, nodes: int, gpus: int, name: str):
    import submitit

    if profile["executor"] == "local":
        if nodes != 1:
            raise SystemExit("error: --cluster local runs one node; use --nodes 1 (or torchrun --nnodes for a multi-node test)")
        import torch

        ex = submitit.LocalExecutor(folder, max_num_timeout=int(profile.get("max_num_timeout", 3)))
        ex.update_parameters(timeout_min=parse_minutes(profile.get("time", "60m")), tasks_per_node=gpus, nodes=1,
                             signal_delay_s=int(profile.get("signal_delay_s", 120)),
                             gpus_per_node=gpus if torch.cuda.is_available() else 0, setup=list(profile.get("setup") or []))
        return ex
    try:
        ex = submitit.SlurmExecutor(folder, max_num_timeout=int(profile.get("max_num_timeout", 50)))
    except RuntimeError as e:  # no srun here
        raise SystemExit(f"error: {e} (use --cluster local to run here, or --dry-run to see the job script)") from None
    ex.update_parameters(**slurm_parameters(profile, nodes, gpus, name))
    return ex


def dry_run(profile: dict[str, Any], folder: Path, nodes: int, gpus: int, name: str) -> str:
    """What would be submitted: the sbatch script for SLURM, the parameters for the local executor."""
    if profile["executor"] == "slurm":
        from submitit.slurm.slurm import _make_sbatch_string  # submitit's own script writer

        return _make_sbatch_string(command=f"{sys.executable} -u -m submitit.core._submit {folder}", folder=folder,
                                   **slurm_parameters(profile, nodes, gpus, name))
    return json.dumps({"executor": "local", "tasks_per_node": gpus, "time_min": parse_minutes(profile.get("time", "60m")),
                       "signal_delay_s": profile.get("signal_delay_s")}, indent=1)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.submit", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="YAML experiment")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=1, help="tasks per node: one per GPU")
    p.add_argument("--cluster", default="slurm", help="a profile in configs/clusters/ (local, slurm, ...) or a .yaml path")
    for key in ("partition", "account", "time", "qos", "constraint"):
        p.add_argument(f"--{key}", default=None)
    p.add_argument("--signal-delay-s", type=int, default=None, help="time-out signal this long before the limit")
    p.add_argument("--max-requeues", type=int, default=None, help="requeues allowed for this run (all causes)")
    p.add_argument("--max-num-timeout", type=int, default=None, help="time-outs submitit requeues")
    p.add_argument("--name", default=None, help="job name (default: the run directory's name)")
    p.add_argument("--wait", action="store_true", help="wait for the job (and its requeues) to end; exit with its status")
    p.add_argument("--dry-run", action="store_true", help="validate and print what would be submitted")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    from trainer.config import ConfigError, load_config

    world = args.nodes * args.gpus_per_node
    try:
        cfg = load_config(args.config, args.overrides, world_size=world)  # fail here, not after the queue
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    profile = load_profile(args.cluster)
    for key in ("partition", "account", "time", "qos", "constraint"):
        if getattr(args, key) is not None:
            profile[key] = getattr(args, key)
    for key in ("signal_delay_s", "max_requeues", "max_num_timeout"):
        if getattr(args, key) is not None:
            profile[key] = getattr(args, key)
    run_dir = str(Path(cfg.run_dir).resolve())
    overrides = [o for o in args.overrides if not o.startswith("run_dir=")] + [f"run_dir={run_dir}"]
    command = shlex.join([sys.executable, "-m", "launch.submit", *argv])
    job_fn = TrainJob(str(Path(args.config).resolve()), overrides, run_dir, command,
                      int(profile.get("max_requeues", 10)), list(cfg.train.preempt_signals))
    folder = Path(run_dir) / "launch" / "submitit"
    name = args.name or Path(run_dir).name
    if args.dry_run:
        print(dry_run(profile, folder / "%j", args.nodes, args.gpus_per_node, name))
        print(f"# world size {world} ({args.nodes} node(s) x {args.gpus_per_node} task(s)); run_dir {run_dir}; "
              f"max_requeues {job_fn.max_requeues}")
        return 0
    executor = build_executor(profile, folder / "%j", args.nodes, args.gpus_per_node, name)
    job = executor.submit(job_fn)
    record(run_dir, "submitted", job_id=job.job_id, cluster=args.cluster, executor=profile["executor"],
           nodes=args.nodes, gpus_per_node=args.gpus_per_node, host=socket.gethostname(), command=command,
           submitit_folder=str(folder / str(job.job_id)))
    print(f"submitted job {job.job_id} ({profile['executor']}, {world} tasks); run_dir {run_dir}; "
          f"record {jobs_file(run_dir)}; logs {folder / str(job.job_id)}")
    if not args.wait:
        return 0
    try:
        job.results()  # one per task
    except Exception as e:  # submitit raises the task's failure
        print(f"error: job {job.job_id} failed: {str(e)[-3000:]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
