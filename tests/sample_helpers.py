"""Tiny weights files and sampling runs for the `launch.sample` tests."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from models import build_model
from models.convert import save_safetensors
from tests.helpers import randomize_
from tests.trainer_utils import REPO, base_env, free_port

TINY_DYN = dict(depth=2, hidden_size=64, num_heads=4, mlp_groups=4, input_size=8, in_channels=1, num_classes=10,
                width_router_bias=0.3, token_router_bias=0.5)


def dynamic_weights(path: Path, seed: int = 0) -> Path:
    """A DyDiT on 8×8 one-channel images whose routers switch units on and off with t (random router
    weights), so sampling exercises the sliced path, the width-plan cache and realised FLOPs."""
    torch.manual_seed(seed)
    m = randomize_(build_model("dydit-s/2", **TINY_DYN), seed=seed + 1, std=0.05)
    with torch.no_grad():
        for b in m.blocks:
            torch.nn.init.normal_(b.attn_rate.router.weight, std=0.5)
            torch.nn.init.normal_(b.mlp_rate.router.weight, std=0.5)
    save_safetensors(m.state_dict(), m.config, path)
    return path


def sample_cmd(*args: str, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "launch.sample", *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
            "-m", "launch.sample", *args]


def run_sample(*args: str, nproc: int = 1, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(sample_cmd(*args, nproc=nproc), cwd=REPO, env=base_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
