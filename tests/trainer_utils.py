"""Running tiny real training jobs from tests: in-process (one rank) or under torchrun (gloo)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_ARGS = {"depth": 2, "hidden_size": 64, "num_heads": 2, "input_size": 8, "in_channels": 1, "num_classes": 10}


def write_config(path: Path, model: str = "dit-s/2", args: dict | None = None, **sections) -> Path:
    """A tiny digits run: `sections` override top-level config sections (dicts are merged)."""
    cfg = {
        "student": {"model": model, "args": {**TINY_ARGS, **(args or {})}, "init": "random"},
        "teacher": None,
        "data": {"format": "digits"},
        "train": {"steps": 6, "global_batch": 16, "log_every": 1},
        "checkpoint": {"every": 100, "async_save": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    """A child job's environment: one OpenMP thread per process, the repo importable, and none of the
    launcher or fault-injection variables the test runner may carry (unless passed in `extra`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
           "PYTHONUNBUFFERED": "1", **extra}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DITILL_DEBUG_FAULTS"):
        if var not in extra:
            env.pop(var, None)
    return env


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    """A finished job exited 0; otherwise fail with the tail of what it printed."""
    assert proc.returncode == 0, f"exit {proc.returncode}\n{(proc.stdout or '')[-3000:]}\n{(proc.stderr or '')[-3000:]}"


def run_train(config: Path, overrides: list[str], nproc: int = 1, timeout: int = 300, env: dict | None = None,
              module: str = "launch.train") -> subprocess.CompletedProcess:
    """`python -m launch.train` (nproc=1) or `torchrun --nproc_per_node nproc -m launch.train` (or another
    entry point `module` with launch.train's arguments)."""
    if nproc == 1:
        cmd = [sys.executable, "-m", module, str(config), *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
               "-m", module, str(config), *overrides]
    return subprocess.run(cmd, cwd=REPO, env=base_env(**(env or {})), capture_output=True, text=True, timeout=timeout)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in metrics(run_dir)]
