"""Launching, watching and killing tiny training jobs from fault-tolerance tests."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.trainer_utils import REPO, base_env, free_port, metrics


def train_cmd(config: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "launch.train", str(config), *overrides]


def torchrun_cmd(config: Path, overrides: list[str], nproc: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *extra,
            "-m", "launch.train", str(config), *overrides]


def start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """A process in its own session (so the test can kill it and all its children), output to `log`."""
    f = open(log, "ab")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def start_ranks(config: Path, overrides: list[str], nproc: int, log_dir: Path, **env_extra: str) -> list[subprocess.Popen]:
    """`nproc` trainer processes wired together through the environment, as `srun` starts them."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for r in range(nproc):
        env = base_env(RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), **env_extra)
        procs.append(start(train_cmd(config, overrides), log_dir / f"rank{r}.log", env))
    return procs


def last_step(run_dir: Path) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass
    return max(steps)


def wait_until(predicate, procs: list[subprocess.Popen], timeout: float = 240, what: str = "") -> None:
    """Poll `predicate` until true; fail if it times out or every process ended first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if all(p.poll() is not None for p in procs):
            raise AssertionError(f"processes ended before {what} (exit codes {[p.returncode for p in procs]})")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def started_at(log: Path, procs: list[subprocess.Popen], timeout: float = 240) -> int:
    """The step a (re)launched run starts from, once its log says so (its metrics are truncated then)."""
    pattern = re.compile(r"start_step=(\d+)")
    wait_until(lambda: pattern.search(tail(log, 10**6)) is not None, procs, timeout, what=f"start_step in {log}")
    return int(pattern.search(tail(log, 10**6)).group(1))


def kill9(procs: list[subprocess.Popen]) -> None:
    """SIGKILL each process and every descendant (torchrun starts its workers in sessions of their own)."""
    import psutil

    descendants = []
    for p in procs:
        try:
            descendants += psutil.Process(p.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        p.kill()
    for v in descendants:
        try:
            v.kill()
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        p.wait(timeout=60)  # reaped through Popen, so its returncode is -SIGKILL
    psutil.wait_procs(descendants, timeout=60)


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        kill9(procs)
        raise


def losses_by_step(run_dir: Path) -> dict[int, float]:
    rec = metrics(run_dir)
    steps = [m["step"] for m in rec]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {m["step"]: m["loss"] for m in rec}


def tail(path: Path, n: int = 4000) -> str:
    return Path(path).read_text(errors="replace")[-n:] if Path(path).exists() else f"(no {path})"
