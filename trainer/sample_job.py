"""`launch.sample`'s job: settings checked before any process group, chunks sampled by every rank,
outputs assembled by rank 0; a relaunch into the same `--out` does only the chunks that are missing.

Sample i is the same image whatever the world size (`trainer.sampling`): its noise, label and step
noise come from (seed, i), and chunks of `chunk` samples are numbered the same for any number of
ranks, computed with the same number of CPU threads, so the same chunk gives the same bytes.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from models import family_of
from trainer.sample_inputs import (
    PromptSet, condition_of, encoded_prompts, is_run_dir, load_model, precomputed_prompts, source_config,
    source_identity,
)
from trainer.sample_store import (
    NPZ, REPORT, SETTINGS, chunk_is_done, chunk_path, read_chunk, remove_stale, sample_key, write_chunk, write_json,
    write_npz, write_pngs,
)
from trainer.sampling import Decoder, Sampler, chunk_ranges, class_labels, forwards_per_sample, rgb, sample_latents

METHODS = {"gaussian": ("ddpm", "ddim"), "flow": ("euler",)}


class SampleError(ValueError):
    """Settings the job cannot start with; the message names the flag and the fix (exit code 2)."""


@dataclass
class SampleSettings:
    source: str  # run directory or weights file
    out: str
    num: Optional[int] = None  # class-conditional: number of samples
    balanced: bool = False  # labels i mod K instead of drawn per sample
    prompts: Optional[str] = None  # text-to-image: .txt / .jsonl prompt file
    images_per_prompt: int = 1
    weights: str = "ema"  # run directory: ema | student
    step: Optional[int] = None  # run directory: checkpoint step (default the newest valid)
    method: Optional[str] = None  # default: ddpm (Gaussian) / euler (flow)
    steps: int = 250
    cfg_scale: float = 1.0
    cfg_channels: Optional[int] = None
    eta: float = 0.0
    seed: int = 0
    chunk: int = 32
    threads: int = 1
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "fp32"  # fp32 | bf16 (autocast)
    resolution: Optional[str] = None  # "256" or "HxW" pixels
    bucket: Optional[str] = None  # aspect-ratio bucket key (data.buckets) at --resolution
    vae: Optional[str] = None
    latent_scale: Optional[float] = None
    latent_shift: Optional[float] = None
    text_encoder: Optional[str] = None
    clip_encoder: Optional[str] = None
    max_length: Optional[int] = None
    text_mask: Optional[bool] = None
    text_batch: int = 16
    prompt_embeddings: Optional[str] = None
    null_text: Optional[str] = None
    objective: Optional[str] = None  # weights file: gaussian | flow
    flow_shift: float = 1.0
    dynamic_shift: bool = False
    png: bool = False
    to_shards: Optional[str] = None
    shard_format: str = "wds"
    samples_per_shard: int = 1000
    timeout_hours: float = 72.0  # the final collective waits this long for the slowest rank
    progress: bool = True


@dataclass
class Plan:
    """What the settings resolve to before any process group: the model config, the objective, the
    kind of conditioning, the text encoder to use, the latent shape, the sample count."""

    settings: SampleSettings
    model_cfg: Any
    run_cfg: Any
    objective: Any
    sampler: Sampler
    kind: str  # class | text | text_pooled
    shape: tuple[int, int, int]
    total: int
    encoder: Optional[dict[str, Any]] = None
    identity: dict[str, Any] = field(default_factory=dict)


def _fail(flag: str, message: str) -> SampleError:
    return SampleError(f"{flag}: {message}")


def plan(s: SampleSettings) -> Plan:
    """Check every setting that needs no tensor; SampleError names the flag and the fix."""
    if not os.path.exists(s.source):
        raise _fail("SOURCE", f"{s.source!r} does not exist: give a run directory (config.yaml + checkpoints/) or a weights file")
    run = is_run_dir(s.source)
    if os.path.isdir(s.source) and not run and not os.path.isfile(os.path.join(s.source, "config.json")):
        raise _fail("SOURCE", f"{s.source!r} is a directory but neither a DiTill run directory (no config.yaml) nor a "
                    "diffusers model directory")
    for flag, value, low in (("--steps", s.steps, 1), ("--chunk", s.chunk, 1), ("--threads", s.threads, 1),
                             ("--images-per-prompt", s.images_per_prompt, 1), ("--text-batch", s.text_batch, 1),
                             ("--samples-per-shard", s.samples_per_shard, 1)):
        if value < low:
            raise _fail(flag, f"must be ≥ {low}, got {value}")
    if s.cfg_scale <= 0:
        raise _fail("--cfg-scale", f"must be > 0 (1 = no guidance), got {s.cfg_scale}")
    for flag, value, allowed in (("--weights", s.weights, ("ema", "student")), ("--device", s.device, ("auto", "cpu", "cuda")),
                                 ("--dtype", s.dtype, ("fp32", "bf16")), ("--shard-format", s.shard_format, ("wds", "mds"))):
        if value not in allowed:
            raise _fail(flag, f"{value!r} is not one of {', '.join(allowed)}")
    if s.device == "cuda" and not torch.cuda.is_available():
        raise _fail("--device", "cuda was asked for but CUDA is not available here; use --device cpu")
    for flag, path in (("--vae", s.vae), ("--text-encoder", s.text_encoder), ("--clip-encoder", s.clip_encoder),
                       ("--prompt-embeddings", s.prompt_embeddings), ("--null-text", s.null_text)):
        if path is not None and not os.path.isdir(path):
            raise _fail(flag, f"{path!r} is not a local directory (nothing is downloaded)")
    if s.prompts is not None and not os.path.isfile(s.prompts):
        raise _fail("--prompts", f"{s.prompts!r} does not exist")
    if not run and (s.step is not None or s.weights != "ema"):
        raise _fail("--step/--weights", "choose a checkpoint and EMA/student weights of a run directory; SOURCE is a weights file")
    try:
        model_cfg, run_cfg = source_config(s.source, s.step)
    except (OSError, ValueError) as e:
        raise _fail("SOURCE", str(e)) from e
    family = family_of(model_cfg)
    spec = family.conditioning(model_cfg)
    objective = _objective(s, model_cfg, run_cfg, family)
    method = s.method or METHODS[objective.kind][0]
    if method not in METHODS[objective.kind]:
        raise _fail("--method", f"{method!r} does not sample a {objective.kind} model; use one of {METHODS[objective.kind]}")
    kind = spec.kind
    total, encoder = _conditioning(s, kind, run_cfg)
    if s.cfg_channels is not None and not 1 <= s.cfg_channels <= model_cfg.in_channels:
        raise _fail("--cfg-channels", f"must be in [1, {model_cfg.in_channels}] (the prediction channels)")
    try:
        shape = family.latent_shape(model_cfg, _resolution(s))
    except ValueError as e:
        raise _fail("--resolution", str(e)) from e
    if s.vae is None and model_cfg.in_channels not in (1, 3):
        raise _fail("--vae", f"the model makes {model_cfg.in_channels}-channel latents: give the local diffusers VAE "
                    "directory that decodes them (pixel-space models have 1 or 3 channels)")
    sampler = Sampler(method=method, steps=s.steps, cfg_scale=s.cfg_scale, seed=s.seed, eta=s.eta, cfg_channels=s.cfg_channels)
    p = Plan(s, model_cfg, run_cfg, objective, sampler, kind, tuple(shape), total, encoder)
    p.identity = _identity(p)
    _check_out(p)
    if s.to_shards and os.path.isdir(s.to_shards) and os.listdir(s.to_shards) and not shards_of_this_job(s.to_shards, p.identity):
        raise _fail("--to-shards", f"{s.to_shards!r} is not empty (and not this job's shards); choose a new directory")
    return p


def _objective(s: SampleSettings, model_cfg: Any, run_cfg: Any, family) -> Any:
    from models.diffusion import build_objective

    if run_cfg is not None:
        if s.objective is not None or s.flow_shift != 1.0 or s.dynamic_shift:
            raise _fail("--objective/--flow-shift/--dynamic-shift", "a run directory samples with its own diffusion "
                        "settings (its config.yaml); these flags are for weights files")
        from trainer.build import build_objective as run_objective

        return run_objective(run_cfg)
    fits = family.objectives(model_cfg)
    kind = s.objective or (fits[0] if len(fits) == 1 else None)
    if kind is None:
        raise _fail("--objective", f"the model's output fits {' or '.join(fits)}; say which it was trained with")
    if kind not in fits:
        raise _fail("--objective", f"{kind!r} does not fit the model's output; use {fits[0]!r}")
    if kind == "gaussian":
        if s.flow_shift != 1.0 or s.dynamic_shift:
            raise _fail("--flow-shift/--dynamic-shift", "rectified-flow options; the objective is gaussian")
        return build_objective("gaussian")
    return build_objective("flow", shift=s.flow_shift, dynamic_shift=s.dynamic_shift)


def _conditioning(s: SampleSettings, kind: str, run_cfg: Any) -> tuple[int, Optional[dict[str, Any]]]:
    """(number of samples, the live text encoder's settings or None)."""
    if kind == "class":
        if s.prompts or s.prompt_embeddings:
            raise _fail("--prompts", "the model is class-conditional; give --num-samples N")
        if not s.num or s.num < 1:
            raise _fail("--num-samples", "give the number of samples (≥ 1) of this class-conditional model")
        return s.num, None
    if s.num is not None:
        raise _fail("--num-samples", "the model is text-to-image: its samples are --images-per-prompt per line of --prompts")
    if s.balanced:
        raise _fail("--balanced", "balances class labels; the model is text-to-image")
    if s.prompt_embeddings is not None:
        from data import load_prompt_embeddings

        found = load_prompt_embeddings(s.prompt_embeddings)
        if found is None:
            raise _fail("--prompt-embeddings", f"{s.prompt_embeddings!r} holds no prompts.jsonl + prompts.safetensors "
                        "(made by launch.precompute from input shards with a prompts.jsonl)")
        return len(found[0]) * s.images_per_prompt, None
    if s.prompts is None:
        raise _fail("--prompts", "the model is text-to-image: give a prompt file (.txt or .jsonl), or --prompt-embeddings DIR")
    from trainer.sample_inputs import read_prompt_file

    n = len(read_prompt_file(s.prompts)) * s.images_per_prompt
    text = _run_text_entry(run_cfg)
    encoder = {"encoder": s.text_encoder or text.get("encoder"), "pooled_encoder": s.clip_encoder or text.get("pooled_encoder"),
               "max_length": s.max_length or text.get("max_length") or 300,
               "attention_mask": s.text_mask if s.text_mask is not None else text.get("attention_mask", kind == "text")}
    if not encoder["encoder"]:
        raise _fail("--text-encoder", "prompts need the local T5 directory that embedded the training captions "
                    "(the run's shard manifest names none here), or --prompt-embeddings DIR")
    for flag, key in (("--text-encoder", "encoder"), ("--clip-encoder", "pooled_encoder")):
        if encoder[key] and not os.path.isdir(encoder[key]):
            raise _fail(flag, f"{encoder[key]!r} (from the run's shard manifest) is not a local directory here; give {flag}")
    if kind == "text_pooled" and not encoder["pooled_encoder"]:
        raise _fail("--clip-encoder", "the model reads a pooled CLIP vector: give the local CLIP text encoder directory")
    return n, encoder


def _run_text_entry(run_cfg: Any) -> dict[str, Any]:
    """The `text` entry of the run's shard manifest: which encoder embedded its captions, and how."""
    if run_cfg is None or not run_cfg.data.path:
        return {}
    from data.manifest import MANIFEST, read_manifest

    if not os.path.isfile(os.path.join(run_cfg.data.path, MANIFEST)):
        return {}
    return dict(read_manifest(run_cfg.data.path).text or {})


def _resolution(s: SampleSettings) -> Optional[tuple[int, int] | int]:
    if s.resolution is None:
        if s.bucket is not None:
            raise _fail("--bucket", "give the base --resolution the bucket is taken at")
        return None
    try:
        parts = [int(v) for v in s.resolution.lower().split("x")]
    except ValueError:
        raise _fail("--resolution", f"{s.resolution!r} is not a size: 256 or HxW such as 512x768") from None
    if s.bucket is not None:
        if len(parts) != 1:
            raise _fail("--bucket", "takes a square base --resolution (e.g. 1024)")
        from data.buckets import bucket_size

        try:
            return bucket_size(s.bucket, parts[0])
        except (KeyError, ValueError) as e:
            raise _fail("--bucket", str(e)) from e
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def _identity(p: Plan) -> dict[str, Any]:
    """Everything that decides the bytes of a chunk (not the world size, not the outputs asked for)."""
    s = p.settings
    keep = ("num", "balanced", "images_per_prompt", "weights", "step", "steps", "cfg_scale", "cfg_channels", "eta", "seed",
            "chunk", "threads", "dtype", "resolution", "bucket", "latent_scale", "latent_shift", "text_batch",
            "objective", "flow_shift", "dynamic_shift")
    ident = {k: getattr(s, k) for k in keep}
    ident.update(method=p.sampler.method, total=p.total, shape=list(p.shape), source=source_identity(s.source, s.step, s.weights),
                 device=_device_type(s), vae=os.path.abspath(s.vae) if s.vae else None, encoder=p.encoder,
                 prompt_embeddings=os.path.abspath(s.prompt_embeddings) if s.prompt_embeddings else None,
                 prompts=_file_sha(s.prompts), null_text=os.path.abspath(s.null_text) if s.null_text else None)
    return ident


def _file_sha(path: Optional[str]) -> Optional[str]:
    if path is None:
        return None
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _device_type(s: SampleSettings) -> str:
    return "cuda" if s.device == "cuda" or (s.device == "auto" and torch.cuda.is_available()) else "cpu"


def _check_out(p: Plan) -> None:
    path = Path(p.settings.out) / SETTINGS
    if not path.exists():
        return
    before = json.loads(path.read_text()).get("identity")
    now = json.loads(json.dumps(p.identity))
    if before != now:
        changed = sorted(k for k in set(before or {}) | set(now) if (before or {}).get(k) != now.get(k))
        raise _fail("--out", f"{p.settings.out!r} holds samples made with other settings (changed: {', '.join(changed)}); "
                    "use a new --out, or the same settings to resume")


# --- the job ---------------------------------------------------------------------------------------

class SampleJob:
    """One rank's share of a planned job (the model, conditions and decoder loaded on its device)."""

    def __init__(self, p: Plan, rank: int, world: int, device: torch.device) -> None:
        s = p.settings
        self.p, self.s, self.rank, self.world, self.device = p, s, rank, world, device
        self.out = Path(s.out)
        self.model = load_model(s.source, s.step, s.weights).to(device)
        self.family = family_of(self.model)
        self.prompts: Optional[PromptSet] = None
        if p.kind != "class":
            self.prompts = (precomputed_prompts(s.prompt_embeddings, s.prompts, s.images_per_prompt) if s.prompt_embeddings
                            else encoded_prompts(s.prompts, s.images_per_prompt, p.encoder, device, s.text_batch))
            self._attach_null()
        self.decoder = Decoder(s.vae, device, s.latent_scale, s.latent_shift)
        self.chunks = chunk_ranges(p.total, s.chunk)
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if s.dtype == "bf16" else None)

    def _attach_null(self) -> None:
        """The null caption of classifier-free guidance: --null-text DIR, else the prompt set's (precomputed
        or encoded by the same encoder), else the run's shards'."""
        from data import load_null_text

        null = load_null_text(self.s.null_text) if self.s.null_text else None
        if self.s.null_text and null is None:
            raise SampleError(f"--null-text: {self.s.null_text} holds no null_text.safetensors")
        null = null or self.prompts.null
        if null is None and self.p.run_cfg is not None and self.p.run_cfg.data.path:
            null = load_null_text(self.p.run_cfg.data.path) if os.path.isdir(self.p.run_cfg.data.path) else None
        if null is not None:
            self.family.set_null_condition(self.model, {k: v.to(self.device) for k, v in null.items()})

    def labels(self, indices: torch.Tensor) -> Optional[torch.Tensor]:
        if self.p.kind != "class":
            return None
        return class_labels(self.s.seed, indices, self.model.config.num_classes, self.s.balanced)

    def run_chunk(self, c: int) -> None:
        start, end = self.chunks[c]
        idx = torch.arange(start, end)
        labels = self.labels(idx)
        cond = condition_of(self.model, idx, labels, self.prompts)
        latents, flops = sample_latents(self.model, self.p.objective, self.p.sampler, idx, cond, shape=self.p.shape,
                                        device=self.device, autocast=self.autocast)
        arrays = {"images": self.decoder(latents), "latents": latents.numpy(), "flops": flops.numpy()}
        if labels is not None:
            arrays["labels"] = labels.numpy()
        path = chunk_path(self.out, c)
        remove_stale(path)
        write_chunk(path, arrays)

    # --- assembly (rank 0) ---------------------------------------------------------------------------
    def _chunk_arrays(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        for c, (start, end) in enumerate(self.chunks):
            arrays = read_chunk(chunk_path(self.out, c), end - start)
            if arrays is None:
                raise RuntimeError(f"{chunk_path(self.out, c)} is missing or damaged; relaunch to sample it again")
            yield start, arrays

    def _column(self, name: str, fn=lambda a: a) -> Iterator[np.ndarray]:
        for _, arrays in self._chunk_arrays():
            yield fn(arrays[name])

    def assemble(self, seconds: float) -> dict[str, Any]:
        first = read_chunk(chunk_path(self.out, 0), self.chunks[0][1] - self.chunks[0][0])
        n = self.p.total
        img = first["images"].shape[1:3]
        members: dict[str, Any] = {
            "arr_0": ((n, *img, 3), np.uint8, lambda: self._column("images", rgb)),
            "latents": ((n, *first["latents"].shape[1:]), np.float32, lambda: self._column("latents")),
        }
        if "labels" in first:
            members["labels"] = ((n,), np.int64, lambda: self._column("labels"))
        if self.prompts is not None:
            captions = np.array([self.prompts.caption(i) for i in range(n)])
            members["captions"] = ((n,), captions.dtype, lambda: iter([captions]))
        dynamic = bool(getattr(self.model.config, "dynamic", False))
        if dynamic:
            members["realised_flops"] = ((n,), np.float64, lambda: self._column("flops"))
        write_npz(self.out / NPZ, members)
        flops = np.concatenate(list(self._column("flops")))
        report = {"settings": asdict(self.s), "identity": self.p.identity, "samples": n, "image_shape": [*img, 3],
                  "latent_shape": list(self.p.shape), "npz": str((self.out / NPZ).resolve()),
                  "model": {"family": self.family.name, "kind": self.family.student_kind(self.model.config),
                            "config": self.model.config.to_dict()},
                  "objective": self.p.objective.kind, "sampler": asdict(self.p.sampler), "decoder": self.decoder.describe(),
                  "flops": self._flops_summary(flops, dynamic), "world_size": self.world, "seconds_this_launch": seconds}
        if self.s.png:
            report["png"] = str(self.out / "png")
            write_pngs(self.out / "png", ((start + j, im) for start, a in self._chunk_arrays() for j, im in enumerate(a["images"])))
        if self.s.to_shards:
            report["shards"] = os.path.abspath(self.s.to_shards)
            self.write_shards()
        write_json(self.out / REPORT, report)
        return report

    def _flops_summary(self, flops: np.ndarray, dynamic: bool) -> dict[str, Any]:
        """Multiply-adds per sample over the whole sampling loop (realised for a dynamic model) and per forward."""
        cfg = self.model.config
        hw = tuple(self.p.shape[-2:])
        text_len = self.prompts.rows(torch.tensor([0]))["text_emb"].shape[1] if self.prompts is not None else None
        static = float(self.family.flops(cfg, hw, text_len)["total"])
        forwards = forwards_per_sample(self.model, self.p.sampler)
        out = {"static_per_forward": static, "forwards_per_sample": forwards, "static_per_sample": static * forwards,
               "per_sample_mean": float(flops.mean()), "per_sample_min": float(flops.min()),
               "per_sample_max": float(flops.max()), "dynamic": dynamic}
        out["ratio_to_static"] = out["per_sample_mean"] / out["static_per_sample"]
        return out

    def write_shards(self) -> None:
        """The samples as training shards (`data.writers`), in sample order, keyed by sample index: written
        beside the target and renamed into place, so a crash mid-way leaves no half dataset."""
        import shutil

        from data.sources import png_bytes
        from data.text_files import NULL_TEXT, write_text_file
        from data.text_encoders import TextBatch
        from data.writers import write_samples

        s, n = self.s, self.p.total
        if shards_of_this_job(s.to_shards, self.p.identity):
            return
        latent = s.vae is not None  # else a pixel-space model: its images are the training input
        first = next(self._chunk_arrays())[1]["images"]

        def samples() -> Iterator[dict[str, Any]]:
            for start, a in self._chunk_arrays():
                rows = len(a["images"])
                text = self._shard_text(start, rows) if self.prompts is not None else None
                for j in range(rows):
                    i, im = start + j, a["images"][j]
                    out: dict[str, Any] = {"key": sample_key(i, n), "image": png_bytes(im[..., 0] if im.shape[-1] == 1 else im),
                                           "json": {"source": "ditill-sample", "index": i, "seed": s.seed,
                                                    "original_size": list(im.shape[:2]), "aspect_ratio": im.shape[0] / im.shape[1]}}
                    if latent:  # unscaled, as precompute stores the VAE mean (the manifest has the factors)
                        out["latent"] = (a["latents"][j] / self.decoder.scaling + self.decoder.shift).astype(np.float16)
                    if "labels" in a:
                        out["cls"] = int(a["labels"][j])
                    if text is not None:
                        out["caption"] = self.prompts.caption(i)
                        out.update(text[j])
                    yield out

        fields: dict[str, Any] = {"source": "ditill-sample", "channels": int(first.shape[-1]),
                                  "notes": {"writer": "launch.sample", "identity": self.p.identity}}
        if self.p.kind == "class":
            fields["classes"] = [str(c) for c in range(self.model.config.num_classes)]
        if latent:
            fields["latent"] = {"scaling_factor": self.decoder.scaling, "shift_factor": self.decoder.shift,
                                "vae": os.path.abspath(s.vae), "resolution": list(first.shape[1:3])}
        if self.prompts is not None:
            fields["text"] = {**self.prompts.manifest_text, "dtype": "bf16"}
        target = Path(s.to_shards)
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        write_samples(samples(), str(tmp), s.shard_format, fields, samples_per_shard=s.samples_per_shard)
        if self.prompts is not None and self.prompts.null is not None:
            null = self.prompts.null
            write_text_file(str(tmp / NULL_TEXT), TextBatch(null["text_emb"][None], null["text_mask"][None].to(torch.uint8),
                                                           null["text_pooled"][None] if "text_pooled" in null else None), "bf16")
        if target.exists():
            target.rmdir()  # empty (checked when planning)
        os.replace(tmp, target)

    def _shard_text(self, start: int, rows: int) -> list[dict[str, np.ndarray]]:
        from data.precompute import _text_fields
        from data.text_encoders import TextBatch

        t = self.prompts.rows(torch.arange(start, start + rows))
        batch = TextBatch(t["text_emb"], t["text_mask"].to(torch.uint8), t.get("text_pooled"))
        return _text_fields(batch, [self.prompts.caption(start + j) for j in range(rows)], self.prompts.masked)


def shards_of_this_job(directory: Optional[str], identity: dict[str, Any]) -> bool:
    """Whether `directory` holds the finished shards of a job with this identity (a relaunch keeps them)."""
    from data.manifest import MANIFEST, read_manifest

    if not directory or not os.path.isfile(os.path.join(directory, MANIFEST)):
        return False
    return read_manifest(directory).notes.get("identity") == json.loads(json.dumps(identity))


def run(p: Plan) -> dict[str, Any]:
    """Sample what is missing on every rank of the launcher's world, then assemble on rank 0."""
    import torch.distributed as dist

    from trainer.distributed import destroy_distributed, init_distributed

    s = p.settings
    torch.set_num_threads(s.threads)  # the same on every rank and every launch: part of a chunk's identity
    env = init_distributed(int(timedelta(hours=s.timeout_hours).total_seconds()))
    t0 = time.perf_counter()
    try:
        device = env.device if s.device != "cpu" else torch.device("cpu")
        out = Path(s.out)
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / SETTINGS, {"identity": p.identity, "settings": asdict(s)})
        chunks = chunk_ranges(p.total, s.chunk)
        todo = [c for c, (a, b) in enumerate(chunks) if not chunk_is_done(chunk_path(out, c), b - a)] if env.is_main else None
        box = [todo]
        if env.world_size > 1:
            dist.broadcast_object_list(box, src=0)
        todo = box[0]
        job = SampleJob(p, env.rank, env.world_size, device)
        mine = todo[env.rank::env.world_size]
        if env.is_main:
            print(f"[sample] {p.total} samples in {len(chunks)} chunks of {s.chunk}: {len(chunks) - len(todo)} done, "
                  f"{len(todo)} to sample on {env.world_size} rank(s) → {out}", flush=True)
        bar = _bar(len(mine), env, s.progress)
        for c in mine:
            job.run_chunk(c)
            _injected_delay()
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if env.world_size > 1:
            dist.barrier()
        report = job.assemble(time.perf_counter() - t0) if env.is_main else {}
        if env.world_size > 1:
            dist.barrier()  # nobody leaves (and torchrun reports success) before the outputs exist
        return report
    finally:
        destroy_distributed()


def _bar(total: int, env, enabled: bool):
    if not (env.is_main and enabled):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"sample (rank 0 of {env.world_size})", unit="chunk", dynamic_ncols=True)


def _injected_delay() -> None:
    """Test-only: `DITILL_DEBUG_FAULTS=slow_step=S` sleeps S seconds after each chunk (trainer/faults.py)."""
    from trainer.faults import Faults

    delay = Faults.from_env().slow_step
    if delay:
        time.sleep(delay)
