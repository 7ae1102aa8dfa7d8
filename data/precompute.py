"""Precompute VAE latents and text embeddings: image shards in, latent+embedding shards out.

The encoders load from local directories only (diffusers `AutoencoderKL`, transformers
`T5EncoderModel` and tokenizer), any size. Each input shard becomes one output shard with the same
name, so the work splits across ranks by shard (rank r takes shards r, r+W, …) and a crash costs
at most the shards in flight: a finished shard is renamed into place and then marked done under
`.done/`, and a rerun skips marked shards. Whichever rank finds every shard done writes the
manifest (the same bytes whoever writes it).

Latents are the VAE posterior mean, unscaled, in float16; the manifest records the scaling (and
shift) factor the loader applies. An output shard is held in memory until it is written (PixArt-Σ
sized samples are ≈2.5 MB each), so size input shards with that in mind. Text embeddings are float16 (L, D) with a uint8 mask, padded to
`max_length` tokens (PixArt-Σ: 300, with the mask). Images are resized to their aspect-ratio
bucket when the input is bucketed, else to a square `image_size`.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import torch

from data.buckets import bucket_size
from data.catalog import mds_entries
from data.decode import decode_image
from data.manifest import Group, Manifest, ShardRecord, read_manifest, write_manifest
from data.readers import MdsShard, ShardError, WdsShard
from data.schema import SampleError
from data.writers import shard_name, write_mds_index, write_shard

log = logging.getLogger("ditill.data")
DONE = ".done"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class PrecomputeConfig:
    vae: Optional[str] = None  # local diffusers AutoencoderKL directory
    text_encoder: Optional[str] = None  # local transformers T5EncoderModel directory
    tokenizer: Optional[str] = None  # defaults to text_encoder
    max_length: int = 300
    scaling_factor: Optional[float] = None  # defaults to the VAE config's
    shift_factor: Optional[float] = None  # defaults to the VAE config's (or 0)
    image_size: Optional[int] = None  # square side for unbucketed input; bucket resolution otherwise
    batch_size: int = 16
    device: str = "cpu"
    dtype: str = "fp32"
    format: Optional[str] = None  # output format; defaults to the input's


@dataclass
class PrecomputeReport:
    done: list[str]  # output shards written by this call
    skipped_shards: list[str]  # already finished (resume)
    skipped_samples: int
    manifest_written: bool


class Encoders:
    """The frozen encoders, loaded from local directories (nothing is downloaded)."""

    def __init__(self, cfg: PrecomputeConfig):
        self.device, self.dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
        self.vae = self.text_encoder = self.tokenizer = None
        self.max_length = cfg.max_length
        if cfg.vae:
            from diffusers import AutoencoderKL

            self.vae = AutoencoderKL.from_pretrained(_local_dir(cfg.vae, "--vae"), local_files_only=True)
            self.vae.to(self.device, self.dtype).eval()
            self.scaling_factor = float(cfg.scaling_factor if cfg.scaling_factor is not None else self.vae.config.scaling_factor)
            shift = cfg.shift_factor if cfg.shift_factor is not None else getattr(self.vae.config, "shift_factor", None)
            self.shift_factor = float(shift or 0.0)
            self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if cfg.text_encoder:
            from transformers import AutoTokenizer, T5EncoderModel

            self.text_encoder = T5EncoderModel.from_pretrained(_local_dir(cfg.text_encoder, "--text-encoder"), local_files_only=True)
            self.text_encoder.to(self.device, self.dtype).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(_local_dir(cfg.tokenizer or cfg.text_encoder, "--tokenizer"),
                                                           local_files_only=True)

    @torch.no_grad()
    def latents(self, images: torch.Tensor) -> np.ndarray:
        z = self.vae.encode(images.to(self.device, self.dtype)).latent_dist.mean
        return z.float().cpu().numpy().astype(np.float16)

    @torch.no_grad()
    def text(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        tok = self.tokenizer(captions, max_length=self.max_length, padding="max_length", truncation=True, return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        emb = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return emb.float().cpu().numpy().astype(np.float16), mask.cpu().numpy().astype(np.uint8)


def _local_dir(path: str, flag: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{flag} {path!r} is not a local directory; encoders load only from local "
                                "directories (save them with save_pretrained first) — nothing is downloaded")
    return path


def precompute(in_dir: str, out_dir: str, cfg: PrecomputeConfig, rank: int = 0, world_size: int = 1,
               encoders: Optional[Encoders] = None) -> PrecomputeReport:
    """Encode this rank's share of the input shards into `out_dir`; write the manifest if all are done."""
    if not cfg.vae and not cfg.text_encoder:
        raise ValueError("nothing to precompute: give --vae and/or --text-encoder")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    src = read_manifest(in_dir)
    need = ({"image"} if cfg.vae else set()) | ({"caption"} if cfg.text_encoder else set())
    if need - set(src.fields):
        raise ValueError(f"{in_dir} has fields {src.fields}; precompute needs {sorted(need)} for the encoders given")
    resolution = cfg.image_size or src.bucket_resolution
    if cfg.vae and not resolution:
        raise ValueError("--image-size is required: the input shards are not bucketed, so give the square side to encode at")
    fmt = cfg.format or src.format
    entries = mds_entries(in_dir, src) if src.format == "mds" else {}
    jobs = [(g, rec, _out_path(rec.path, fmt, i)) for g in src.groups for i, rec in enumerate(g.shards)]
    os.makedirs(os.path.join(out_dir, DONE), exist_ok=True)
    encoders = encoders or Encoders(cfg)
    report = PrecomputeReport([], [], 0, False)
    for n, (group, rec, out_rel) in enumerate(jobs):
        if n % world_size != rank:
            continue
        if os.path.exists(_marker(out_dir, out_rel)):
            report.skipped_shards.append(out_rel)
            continue
        for stale in glob.glob(os.path.join(out_dir, glob.escape(out_rel)) + ".tmp*"):  # this shard's leftovers
            shutil.rmtree(stale, ignore_errors=True) if os.path.isdir(stale) else os.remove(stale)
        size = bucket_size(group.key, resolution) if group.key and resolution else (resolution, resolution)
        samples, skipped = _encode_shard(in_dir, rec, entries.get(rec.path), src, encoders, size, cfg.batch_size)
        report.skipped_samples += skipped
        if samples:
            nbytes, entry = write_shard(fmt, os.path.join(out_dir, out_rel), samples)
        else:
            nbytes, entry = 0, None
            log.warning("every sample of %s was skipped; no output shard", rec.path)
        latent_shape = list(samples[0]["latent"].shape) if samples and "latent" in samples[0] else None
        _write_json(_marker(out_dir, out_rel), {"group": group.key, "record": asdict(ShardRecord(out_rel, len(samples), nbytes)),
                                                "latent_shape": latent_shape, "mds_entry": entry,
                                                "fields": sorted(samples[0]) if samples else []})
        report.done.append(out_rel)
    report.manifest_written = _finish(out_dir, src, jobs, fmt, encoders, cfg, resolution)
    return report


def _encode_shard(in_dir: str, rec: ShardRecord, entry: Optional[dict[str, Any]], src: Manifest, enc: Encoders,
                  size: tuple[int, int], batch_size: int) -> tuple[list[dict[str, Any]], int]:
    path = os.path.join(in_dir, rec.path)
    try:
        reader = MdsShard(path, entry) if entry is not None else WdsShard(path, rec.samples)
    except ShardError as e:
        log.warning("input shard skipped: %s", e)
        return [], rec.samples
    fields = frozenset({"image", "caption", "cls", "json"} & set(src.fields))
    channels = src.channels or 3
    samples: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    for i in range(rec.samples):
        try:
            raw = reader.read(i, fields)
            if enc.vae is not None:
                if "image" not in raw:
                    raise SampleError("missing_field", "no image")
                raw["pixels"] = decode_image(raw.pop("image"), (channels, *size))  # a view of the read buffer
                if channels == 1:  # VAEs take RGB
                    raw["pixels"] = raw["pixels"].expand(3, -1, -1)
            pending.append(raw)
        except SampleError as e:
            log.warning("skipped sample #%d of %s: %s: %s", i, path, e.reason, e)
        if len(pending) == batch_size or (i == rec.samples - 1 and pending):
            samples += _encode_batch(pending, enc, path)
            pending = []
    reader.close()
    return samples, rec.samples - len(samples)


def _encode_batch(raws: list[dict[str, Any]], enc: Encoders, path: str) -> list[dict[str, Any]]:
    z = enc.latents(torch.stack([r["pixels"] for r in raws])) if enc.vae is not None else None
    emb, mask = enc.text([r["caption"] for r in raws]) if enc.text_encoder is not None else (None, None)
    out = []
    for j, raw in enumerate(raws):
        s: dict[str, Any] = {"key": raw["key"]}
        for f in ("caption", "cls", "json"):
            if f in raw:
                s[f] = raw[f]
        if z is not None:
            s["latent"] = z[j]
        if emb is not None:
            s["text_emb"], s["text_mask"] = emb[j], mask[j]
        bad = [f for f in ("latent", "text_emb") if f in s and not np.isfinite(s[f].astype(np.float32)).all()]
        if bad:  # e.g. a T5 run in fp16 overflowing: keep it out of the shards
            log.warning("skipped sample %s of %s: non-finite %s from the encoder", raw["key"], path, ", ".join(bad))
            continue
        out.append(s)
    return out


def _out_path(rel: str, fmt: str, index: int) -> str:
    """The output shard of the group's `index`-th input shard: same folder, standard name."""
    return os.path.join(os.path.dirname(rel), shard_name(fmt, index))


def _marker(out_dir: str, out_rel: str) -> str:
    return os.path.join(out_dir, DONE, out_rel.replace(os.sep, "__") + ".json")


def _write_json(path: str, obj: dict[str, Any]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, sort_keys=True)
    os.replace(tmp, path)


def _finish(out_dir: str, src: Manifest, jobs: list[tuple[Group, ShardRecord, str]], fmt: str, enc: Encoders,
            cfg: PrecomputeConfig, resolution: Optional[int]) -> bool:
    """Write the manifest (and MDS index.json files) once every shard is marked done."""
    marks = []
    for _, _, out_rel in jobs:
        marker = _marker(out_dir, out_rel)
        if not os.path.exists(marker):
            return False
        with open(marker) as f:
            marks.append(json.load(f))
    groups: dict[str, Group] = {}
    mds: dict[str, list[dict[str, Any]]] = {}
    fields: set[str] = set()
    for m in marks:
        if not m["record"]["samples"]:
            continue
        g = groups.setdefault(m["group"], Group(m["group"], [], m["latent_shape"]))
        g.shards.append(ShardRecord(**m["record"]))
        fields.update(m["fields"])
        if m["mds_entry"]:
            mds.setdefault(os.path.dirname(m["record"]["path"]), []).append(m["mds_entry"])
    for folder, entries in mds.items():
        write_mds_index(os.path.join(out_dir, folder), entries)
    latent = ({"scaling_factor": enc.scaling_factor, "shift_factor": enc.shift_factor, "vae": os.path.abspath(cfg.vae),
               "resolution": resolution} if cfg.vae else None)
    text = None
    if cfg.text_encoder:
        text = {"max_length": cfg.max_length, "dim": int(enc.text_encoder.config.d_model), "encoder": os.path.abspath(cfg.text_encoder)}
    manifest = Manifest(format=fmt, fields=sorted(fields), groups=list(groups.values()), source=src.source, channels=None,
                        classes=src.classes, bucket_resolution=src.bucket_resolution, latent=latent, text=text,
                        notes={"writer": "data.precompute", "dtype": cfg.dtype, "batch_size": cfg.batch_size})
    write_manifest(out_dir, manifest)
    return True
