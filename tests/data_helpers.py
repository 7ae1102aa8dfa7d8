"""Builders shared by the tests/test_data_*.py files: small shard sets, images, tiny encoders."""
from __future__ import annotations

import io
import os
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from data.manifest import Group, Manifest, ShardRecord, write_manifest
from data.sources import Source, digits_source
from data.tiny_encoders import TinyTextEncoders, build_tiny_text_encoders
from data.writers import group_dir, shard_name, write_dataset, write_mds_index, write_shard

LATENT = (4, 4, 4)
TEXT = (6, 8)


def digits_subset(n: int) -> Source:
    src = digits_source()
    return Source(src.name, src.items[:n], src.channels, src.classes)


def write_digits(path: str, fmt: str, n: Optional[int] = None, samples_per_shard: int = 250, **kw: Any) -> str:
    write_dataset(digits_subset(n) if n else digits_source(), path, fmt, samples_per_shard=samples_per_shard, **kw)
    return path


def latent_sample(i: int, rng: np.random.Generator, latent=LATENT, text=TEXT, label: Optional[int] = None,
                  pooled: Optional[int] = None) -> dict[str, Any]:
    mask = np.zeros(text[0], np.uint8)
    mask[: 1 + i % text[0]] = 1
    s = {"key": f"{i:06d}", "latent": rng.standard_normal(latent).astype(np.float16),
         "text_emb": rng.standard_normal(text).astype(np.float16), "text_mask": mask, "caption": f"caption {i}",
         "json": {"source": "test", "original_size": [latent[1] * 8, latent[2] * 8]}}
    if label is not None:
        s["cls"] = label
    if pooled is not None:  # a CLIP pooled vector (FLUX's conditioning)
        s["text_pooled"] = rng.standard_normal(pooled).astype(np.float16)
    return s


def write_raw(path: str, fmt: str, shards: list[list[dict[str, Any]]], latent=LATENT, text=TEXT,
              group: str = "", classes: Optional[list[str]] = None, pooled: Optional[int] = None) -> Manifest:
    """Write the given samples shard by shard (no checks, so tests can plant bad samples) plus a manifest."""
    records, entries = [], []
    for n, samples in enumerate(shards):
        rel = os.path.join(group_dir(group), shard_name(fmt, n))
        nbytes, entry = write_shard(fmt, os.path.join(path, rel), samples)
        records.append(ShardRecord(rel, len(samples), nbytes))
        if entry:
            entries.append(entry)
    if fmt == "mds":
        write_mds_index(os.path.join(path, group_dir(group)), entries)
    fields = sorted(shards[0][0])
    manifest = Manifest(format=fmt, fields=fields, groups=[Group(group, records, list(latent))], source="test", classes=classes,
                        latent={"scaling_factor": 0.5, "shift_factor": 0.0},
                        text={"max_length": text[0], "dim": text[1], **({"pooled_dim": pooled} if pooled else {})})
    write_manifest(path, manifest)
    return manifest


def latent_dataset(path: str, fmt: str, n: int, per_shard: int, seed: int = 0, **kw: Any) -> list[list[dict[str, Any]]]:
    rng = np.random.default_rng(seed)
    samples = [latent_sample(i, rng) for i in range(n)]
    shards = [samples[i:i + per_shard] for i in range(0, n, per_shard)]
    write_raw(path, fmt, shards, **kw)
    return shards


def png(h: int, w: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def take(loader, n: int) -> list[dict[str, Any]]:
    """n batches, tensors cloned (the loader reuses its buffers once a batch is dropped)."""
    return [{k: v.clone() if torch.is_tensor(v) else list(v) for k, v in next(loader).items()} for _ in range(n)]


def assert_same_batches(got: list[dict[str, Any]], ref: list[dict[str, Any]]) -> None:
    """Batch for batch, field for field, bit-identical (a message names the first difference)."""
    assert len(got) == len(ref), f"{len(got)} batches, expected {len(ref)}"
    for i, (x, y) in enumerate(zip(got, ref)):
        assert x.keys() == y.keys(), f"batch {i}: fields {sorted(x)} vs {sorted(y)}"
        for k in x:
            same = torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k]
            assert same, f"batch {i}, field {k!r} differs"


def tiny_encoders(root: str, dim: int = 16, clip_dim: int = 24) -> tuple[str, TinyTextEncoders]:
    """A random-weight AutoencoderKL (2× downsampling) and T5 + CLIP text encoders with the byte tokenizer, saved locally."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae_dir = os.path.join(root, "vae")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=4, norm_num_groups=8, sample_size=8, scaling_factor=0.5).save_pretrained(vae_dir)
    return vae_dir, build_tiny_text_encoders(os.path.join(root, "text"), seed=0, dim=dim, clip_dim=clip_dim)
