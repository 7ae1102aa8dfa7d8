"""Precompute VAE latents and text embeddings: image shards in, latent+embedding shards out.

The encoders load from local directories only (diffusers `AutoencoderKL`; transformers
`T5EncoderModel`, optionally `CLIPTextModel` for FLUX's pooled vector, and their tokenizers), any
size. Each input shard becomes one output shard with the same name, so the work splits across
ranks by shard (rank r takes shards r, r+W, …) and a crash costs at most the shards in flight: a
finished shard is renamed into place and then marked done under `.done/`, and a rerun skips
marked shards. Whichever rank finds every shard done writes the null caption, the encoded
evaluation prompts and, last, the manifest (the same bytes whoever writes them). With the text
encoder sharded (FSDP2, `shard_text_encoder`), every rank keeps encoding in step (see
`data.text_encoders`) and rank 0 writes them after a barrier.

Latents are the VAE posterior mean, unscaled, in float16; the manifest records the scaling (and
shift) factor the loader applies. Optionally the posterior std (`latent_std`, so each step can
draw a latent) and the latents of the mirrored image (`latent_flip`, for random flips). Images are
resized to their aspect-ratio bucket when the input is bucketed, else to a square `image_size`;
without a VAE the images are carried through unchanged.

Text embeddings are bf16, stored as raw 16-bit words. With the attention mask (PixArt-Σ) only the
n real tokens are stored, (n, D), beside the (L,) mask: the loader pads back to max_length. Without
it (FLUX) all L positions are stored, since the pads were encoded and the model attends to them.
An output shard is held in memory until it is written, so size input shards with that in mind.
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
from data.captions import read_prompts, write_prompts
from data.catalog import mds_entries
from data.decode import decode_image
from data.manifest import Group, Manifest, ShardRecord, read_manifest, write_manifest
from data.readers import MdsShard, ShardError, WdsShard
from data.schema import SampleError
from data.text_encoders import TextBatch, TextEncoders, bf16_words, local_dir, token_count
from data.text_files import NULL_TEXT, PROMPT_EMBEDDINGS, write_text_file
from data.writers import shard_name, write_mds_index, write_shard

log = logging.getLogger("ditill.data")
DONE = ".done"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEXT_STORE = "bf16"


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
    dtype: str = "fp32"  # encoders' compute dtype
    format: Optional[str] = None  # output format; defaults to the input's
    text_attention_mask: bool = True  # PixArt-Σ: T5 runs with its mask; FLUX: False, pads encoded and kept
    clip_encoder: Optional[str] = None  # local CLIPTextModel directory: FLUX's pooled vector
    clip_tokenizer: Optional[str] = None  # defaults to clip_encoder
    clip_max_length: int = 77
    shard_text_encoder: bool = False  # FSDP2 over the process group's ranks (T5-XXL: 4.7 B parameters)
    posterior: bool = False  # also store the VAE posterior's std (`latent_std`): each step draws a latent
    flip_copy: bool = False  # also store the latent of the mirrored image (`latent_flip`)

    def validate(self) -> None:
        """Raise ValueError naming the option and the fix."""
        if not self.vae and not self.text_encoder:
            raise ValueError("nothing to precompute: give --vae and/or --text-encoder")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r} is not allowed: one of {', '.join(DTYPES)}")
        for flag, value in (("--max-length", self.max_length), ("--clip-max-length", self.clip_max_length),
                            ("--batch-size", self.batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag} {value!r} is not allowed: an integer ≥ 1")
        if self.clip_encoder and not self.text_encoder:
            raise ValueError("--clip-encoder gives FLUX's pooled vector beside T5's embeddings; give --text-encoder too")
        if self.shard_text_encoder and not self.text_encoder:
            raise ValueError("--shard-text-encoder shards T5; give --text-encoder")
        if (self.posterior or self.flip_copy) and not self.vae:
            raise ValueError("--posterior and --flip-copy store more of the VAE's output; give --vae")


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
        self.vae = self.text = None
        self.posterior, self.flip_copy = cfg.posterior, cfg.flip_copy
        if cfg.vae:
            from diffusers import AutoencoderKL

            self.vae = AutoencoderKL.from_pretrained(local_dir(cfg.vae, "--vae"), local_files_only=True)
            self.vae.to(self.device, self.dtype).eval()
            self.scaling_factor = float(cfg.scaling_factor if cfg.scaling_factor is not None else self.vae.config.scaling_factor)
            shift = cfg.shift_factor if cfg.shift_factor is not None else getattr(self.vae.config, "shift_factor", None)
            self.shift_factor = float(shift or 0.0)
        if cfg.text_encoder:
            self.text = TextEncoders(cfg.text_encoder, tokenizer=cfg.tokenizer, max_length=cfg.max_length,
                                     attention_mask=cfg.text_attention_mask, clip_dir=cfg.clip_encoder,
                                     clip_tokenizer=cfg.clip_tokenizer, clip_max_length=cfg.clip_max_length,
                                     device=self.device, dtype=self.dtype, shard=cfg.shard_text_encoder)

    @torch.no_grad()
    def latents(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """`latent` (+ `latent_std`, + the same of the mirrored images), float16 (B, C, h, w) each."""
        out = self._posterior(images, "latent")
        if self.flip_copy:
            out.update(self._posterior(images.flip(-1), "latent_flip"))
        return out

    def _posterior(self, images: torch.Tensor, name: str) -> dict[str, np.ndarray]:
        dist = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        out = {name: dist.mean.float().cpu().numpy().astype(np.float16)}
        if self.posterior:
            out[f"{name}_std"] = dist.std.float().cpu().numpy().astype(np.float16)
        return out


def precompute(in_dir: str, out_dir: str, cfg: PrecomputeConfig, rank: int = 0, world_size: int = 1,
               encoders: Optional[Encoders] = None) -> PrecomputeReport:
    """Encode this rank's share of the input shards into `out_dir`; write the manifest if all are done."""
    cfg.validate()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    sharded = cfg.shard_text_encoder
    if sharded:
        _check_group(rank, world_size)
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
    mine = [job for n, job in enumerate(jobs) if n % world_size == rank]
    finished = {out_rel for _, _, out_rel in mine if os.path.exists(_marker(out_dir, out_rel))}
    pending = [job for job in mine if job[2] not in finished]
    report.skipped_shards = [out_rel for _, _, out_rel in mine if out_rel in finished]
    if sharded:  # every rank runs as many T5 forwards as the busiest one
        target = _all_max(encoders.text.calls + sum(-(-rec.samples // cfg.batch_size) for _, rec, _ in pending))
    for group, rec, out_rel in pending:
        for stale in glob.glob(os.path.join(out_dir, glob.escape(out_rel)) + ".tmp*"):  # this shard's leftovers
            shutil.rmtree(stale, ignore_errors=True) if os.path.isdir(stale) else os.remove(stale)
        size = bucket_size(group.key, resolution) if group.key and resolution else (resolution, resolution)
        samples, skipped = _encode_shard(in_dir, rec, entries.get(rec.path), src, encoders, size, cfg)
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
    if sharded:
        import torch.distributed as dist

        encoders.text.pad_calls(target)
        dist.barrier()
    report.manifest_written = _finish(in_dir, out_dir, src, jobs, fmt, encoders, cfg, resolution, write=not sharded or rank == 0)
    return report


def _check_group(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
        raise ValueError(f"--shard-text-encoder needs the process group of all ranks (rank {rank} of {world_size}); "
                         "run under torchrun so RANK and WORLD_SIZE match the group")


def _all_max(value: int) -> int:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _encode_shard(in_dir: str, rec: ShardRecord, entry: Optional[dict[str, Any]], src: Manifest, enc: Encoders,
                  size: tuple[int, int], cfg: PrecomputeConfig) -> tuple[list[dict[str, Any]], int]:
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
            elif "image" in raw:
                raw["image"] = bytes(raw["image"])  # carried through: the map closes with the reader
            pending.append(raw)
        except SampleError as e:
            log.warning("skipped sample #%d of %s: %s: %s", i, path, e.reason, e)
        if len(pending) == cfg.batch_size or (i == rec.samples - 1 and pending):
            samples += _encode_batch(pending, enc, path, cfg.text_attention_mask)
            pending = []
    reader.close()
    return samples, rec.samples - len(samples)


def _encode_batch(raws: list[dict[str, Any]], enc: Encoders, path: str, masked: bool) -> list[dict[str, Any]]:
    z = enc.latents(torch.stack([r["pixels"] for r in raws])) if enc.vae is not None else {}
    text = enc.text.encode([r["caption"] for r in raws]) if enc.text is not None else None
    stored = _text_fields(text, [r["caption"] for r in raws], masked) if text is not None else None
    out = []
    for j, raw in enumerate(raws):
        s: dict[str, Any] = {"key": raw["key"]}
        for f in ("image", "caption", "cls", "json"):
            if f in raw:
                s[f] = raw[f]
        s.update({name: value[j] for name, value in z.items()})
        bad = [name for name, value in z.items() if not np.isfinite(value[j].astype(np.float32)).all()]
        if text is not None:
            s.update(stored[j])
            if not (torch.isfinite(text.emb[j]).all() and (text.pooled is None or torch.isfinite(text.pooled[j]).all())):
                bad.append("text_emb")
        if bad:  # e.g. a T5 run in fp16 overflowing: keep it out of the shards
            log.warning("skipped sample %s of %s: non-finite %s from the encoder", raw["key"], path, ", ".join(bad))
            continue
        out.append(s)
    return out


def _text_fields(text: TextBatch, captions: list[str], masked: bool) -> list[dict[str, np.ndarray]]:
    """Per sample: bf16 words of the embedding (its n tokens if masked, all L if not), mask, pooled vector."""
    emb, mask = bf16_words(text.emb), text.mask.numpy()
    pooled = bf16_words(text.pooled) if text.pooled is not None else None
    out = []
    for j, caption in enumerate(captions):
        n = token_count(mask[j], caption) if masked else mask.shape[1]
        s = {"text_emb": emb[j, :n], "text_mask": mask[j]}
        if pooled is not None:
            s["text_pooled"] = pooled[j]
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


def _finish(in_dir: str, out_dir: str, src: Manifest, jobs: list[tuple[Group, ShardRecord, str]], fmt: str, enc: Encoders,
            cfg: PrecomputeConfig, resolution: Optional[int], write: bool) -> bool:
    """Once every shard is marked done: the null caption, the prompts, MDS index.json files, the manifest."""
    marks = []
    for _, _, out_rel in jobs:
        marker = _marker(out_dir, out_rel)
        if not os.path.exists(marker):
            return False
        with open(marker) as f:
            marks.append(json.load(f))
    text = _write_text_files(in_dir, out_dir, enc, cfg, write) if enc.text is not None else None
    if not write:
        return False
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
               "resolution": resolution, "posterior": cfg.posterior, "flip_copy": cfg.flip_copy} if cfg.vae else None)
    manifest = Manifest(format=fmt, fields=sorted(fields), groups=list(groups.values()), source=src.source,
                        channels=src.channels if "image" in fields else None, classes=src.classes,
                        bucket_resolution=src.bucket_resolution, latent=latent, text=text,
                        notes={"writer": "data.precompute", "dtype": cfg.dtype, "batch_size": cfg.batch_size})
    write_manifest(out_dir, manifest)
    return True


def _write_text_files(in_dir: str, out_dir: str, enc: Encoders, cfg: PrecomputeConfig, write: bool) -> dict[str, Any]:
    """Encode T5("") and the input's evaluation prompts (collectively when sharded); write them; the manifest's text entry."""
    assert enc.text is not None
    text: dict[str, Any] = {"max_length": cfg.max_length, "dim": enc.text.dim, "encoder": os.path.abspath(cfg.text_encoder),
                            "dtype": TEXT_STORE, "attention_mask": cfg.text_attention_mask,
                            "storage": "unpadded" if cfg.text_attention_mask else "padded", "null": NULL_TEXT}
    if enc.text.clip is not None:
        text.update(pooled_dim=enc.text.pooled_dim, pooled_encoder=os.path.abspath(cfg.clip_encoder),
                    pooled_max_length=cfg.clip_max_length)
    null = enc.text.encode([""])
    rows = read_prompts(in_dir)
    prompts = None
    if rows:
        parts = [enc.text.encode([r["prompt"] for r in rows[i:i + cfg.batch_size]]) for i in range(0, len(rows), cfg.batch_size)]
        prompts = TextBatch(torch.cat([p.emb for p in parts]), torch.cat([p.mask for p in parts]),
                            torch.cat([p.pooled for p in parts]) if parts[0].pooled is not None else None)
        text["prompts"] = PROMPT_EMBEDDINGS
    if write:
        write_text_file(os.path.join(out_dir, NULL_TEXT), null, TEXT_STORE)
        if prompts is not None:
            write_prompts(out_dir, rows)
            write_text_file(os.path.join(out_dir, PROMPT_EMBEDDINGS), prompts, TEXT_STORE, rows=len(rows))
    return text
