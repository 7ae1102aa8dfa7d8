"""Tiny PixArt-Σ runs for tests: bucketed latent + T5-embedding shards written with the data layer's
own writers, a teacher file, and run configs for the real trainer."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.manifest import read_manifest, write_manifest
from data.sources import Source, SourceItem
from data.writers import write_dataset
from models import build_model
from models.convert import save_safetensors
from tests.helpers import randomize_
from tests.trainer_utils import write_config

TEXT_LEN, TEXT_DIM = 6, 16
TINY_ARGS = dict(depth=2, hidden_size=32, num_heads=2, input_size=8, caption_channels=TEXT_DIM, model_max_length=TEXT_LEN)
LATENTS = ((8, 16), (12, 16))  # a 1:2 and a 3:4 bucket (latent h × w; pixels ×8)


def text_sample(i: int, hw: tuple[int, int], rng: np.random.Generator) -> dict[str, Any]:
    mask = np.zeros(TEXT_LEN, np.uint8)
    mask[: 1 + i % TEXT_LEN] = 1
    emb = rng.standard_normal((TEXT_LEN, TEXT_DIM)).astype(np.float16)
    emb[mask == 0] = 0  # padding as an encoder's unpadded storage leaves it
    return {"latent": (rng.standard_normal((4, *hw)) * 2).astype(np.float16), "text_emb": emb, "text_mask": mask,
            "json": {"source": "test", "original_size": [hw[0] * 8, hw[1] * 8]}}


def write_text_shards(path: Path, per_bucket: int = 16, latents=LATENTS, fmt: str = "wds", seed: int = 0) -> Path:
    """Latent + text-embedding shards bucketed by aspect ratio (PixArt-Σ's table), with the manifest
    entries `launch.precompute` would add (latent scaling, text length and width)."""
    rng = np.random.default_rng(seed)
    samples = [text_sample(i, hw, rng) for hw in latents for i in range(per_bucket)]
    items = [SourceItem(f"{i:05d}", (lambda s=s: s), f"sample {i}") for i, s in enumerate(samples)]
    write_dataset(Source("test-text", items, channels=3), str(path), fmt, samples_per_shard=8, bucket_resolution=64)
    manifest = read_manifest(str(path))
    manifest.latent = {"scaling_factor": 0.5, "shift_factor": 0.0}
    manifest.text = {"max_length": TEXT_LEN, "dim": TEXT_DIM}
    write_manifest(str(path), manifest)
    return path


def teacher_file(path: Path, name: str = "pixart-sigma-xl/2", seed: int = 0, **kw: Any) -> Path:
    """A random PixArt-Σ teacher (every layer non-zero) saved as our safetensors."""
    torch.manual_seed(seed)
    model = randomize_(build_model(name, **{**TINY_ARGS, **kw}), seed=seed, std=0.05)
    save_safetensors(model.state_dict(), model.config, path)
    return path


def pixart_config(tmp_path: Path, name: str, shards: Path, model: str, teacher: Path | None = None, **sections) -> Path:
    """A tiny text-to-image run of `model` on `shards` (buckets on); `sections` override config sections."""
    base: dict[str, Any] = dict(
        student={"model": model, "args": dict(TINY_ARGS), "init": "inherit" if teacher else "random"},
        teacher={"path": str(teacher)} if teacher else None,
        data={"format": "wds", "path": str(shards), "input": "latent", "cond": "text_emb", "buckets": True,
              "image_size": 64},
        diffusion={"objective": "gaussian"},
        distill={"lambda_noise": 1.0, "lambda_var": 0.05},
        dynamic={"flops_target": 0.6, "warmup_steps": 2, "hold_steps": 0, "router_lr_mult": 10.0},
        train={"steps": 6, "global_batch": 4, "log_every": 1},
        checkpoint={"every": 3, "async_save": False},
        optim={"lr": 1e-3},
    )
    for k, v in sections.items():
        base[k] = {**(base.get(k) or {}), **v} if isinstance(v, dict) else v
    return write_config(tmp_path / f"{name}.yaml", model=model, args=TINY_ARGS, **base)
