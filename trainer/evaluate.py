"""Evaluation during training: sample grids, router maps, and quality vs step (FID, teacher-relative error).

Every rank runs them (sharded models need all ranks in the forward); only rank 0 writes what they
produce. Family-agnostic: shapes come from the family (`latent_shape`), conditions from the family
and a batch of the run's data (`eval_condition`), or the run's evaluation prompts.

The quality evaluation samples with `trainer.sampling`, the code `launch.sample` runs: sample i
comes from (sample.seed, i) and chunks of `sample.eval_batch` are spread over the ranks, so the
values logged do not depend on the world size and equal what `launch.sample` + `launch.evaluate`
give for the checkpoint's EMA weights with the same seed and chunk size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist

from models import family_of
from models.diffusion.samplers import sample
from trainer.config import RunConfig, SampleConfig
from trainer.sampling import Decoder, Sampler, chunk_ranges, guidance_inputs, sample_latents


def fixed_inputs(model, cfg: SampleConfig, device: torch.device, batch: Mapping[str, Any] | None = None) -> tuple[torch.Tensor, dict]:
    """The same noise and condition at every evaluation, so grids are comparable across steps."""
    g = torch.Generator().manual_seed(cfg.seed)
    family = family_of(model)
    shape = family.latent_shape(model.config)
    noise = torch.randn(cfg.num, *shape, generator=g).to(device)
    cond = family.eval_condition(model, cfg.num, batch)
    return noise, {k: v.to(device) if torch.is_tensor(v) else v for k, v in cond.items()}


@torch.no_grad()
def sample_images(module, raw_model, objective, cfg: SampleConfig, device: torch.device, autocast,
                  batch: Mapping[str, Any] | None = None) -> torch.Tensor:
    """`cfg.num` samples of `module` from fixed inputs. A model with a guidance input (guidance-
    distilled) is told g = cfg.cfg_scale and runs once per step; others use classifier-free guidance."""
    was_training = module.training
    module.eval()
    noise, cond = fixed_inputs(raw_model, cfg, device, batch)
    own = getattr(module, "module", module)  # DDP's wrapper
    cond, null, cfg_scale = guidance_inputs(own, cond, cfg.cfg_scale)
    with autocast:
        x = sample(
            lambda x, t, **c: module(x, t, **c),
            objective,
            noise,
            cond,
            null_cond=null,
            cfg_scale=cfg_scale,
            steps=cfg.steps,
            method=cfg.method,
            seq_len=family_of(raw_model).image_tokens(raw_model.config, tuple(noise.shape[-2:])),
        )
    module.train(was_training)
    return x.float()


# --- router maps ------------------------------------------------------------------------------------

@dataclass
class RouterMap:
    """What a dynamic student's routers did along a real sampling trajectory, per sampling step.

    `timesteps` (T,): the model timestep of each network call, in call order. `units[name]`
    (L, U, T): the fraction of rows (samples, both guidance halves) with unit u of layer l on, for each
    width mask (`head_masks` → "heads", `channel_masks` → "channels"); `tokens` (L, T): the fraction
    of tokens routed to the MLP; `layer_flops` (L, T): multiply-adds per sample of each layer's
    dynamic units, and `flops` (T,): the whole model's (`family.realised_flops`)."""

    timesteps: torch.Tensor
    units: dict[str, torch.Tensor]
    tokens: Optional[torch.Tensor]
    layer_flops: Optional[torch.Tensor]
    flops: torch.Tensor


UNIT_NAMES = {"head_masks": "heads", "channel_masks": "channels"}


class RouterTrace:
    """An `observe` callback for `sample_latents` that records each call's masks and FLOPs."""

    def __init__(self, model) -> None:
        self.model, self.family = model, family_of(model)
        self.t: list[float] = []
        self.units: dict[str, list[torch.Tensor]] = {}
        self.tokens: list[torch.Tensor] = []
        self.layer_flops: list[torch.Tensor] = []
        self.flops: list[float] = []
        self.hw: tuple[int, int] = (0, 0)
        self.text_len: Optional[int] = None

    def __call__(self, step: int, t: torch.Tensor, aux: Mapping[str, torch.Tensor]) -> None:
        masks = {k: v.detach().float() for k, v in aux.items() if k.endswith("_masks") and v.ndim == 3}
        if not masks:
            return
        self.t.append(float(t.flatten()[0]))
        for key, m in masks.items():
            if key == "token_masks":
                self.tokens.append(m.mean(dim=(0, 2)).cpu())
            else:
                self.units.setdefault(UNIT_NAMES.get(key, key[: -len("_masks")]), []).append(m.mean(dim=0).cpu())
        cfg = self.model.config
        total = self.family.realised_flops(cfg, aux, self.hw, self.text_len).double()
        self.flops.append(float(total.mean()))
        depth = {m.shape[1] for m in masks.values()}
        if len(depth) == 1:  # per layer: what the model costs less with that layer's dynamic units all off
            per_layer = []
            for layer in range(depth.pop()):
                off = {k: (v if k not in masks else _zero_layer(v, layer)) for k, v in aux.items()}
                per_layer.append(float((total - self.family.realised_flops(cfg, off, self.hw, self.text_len).double()).mean()))
            self.layer_flops.append(torch.tensor(per_layer, dtype=torch.float64))

    def result(self) -> RouterMap:
        return RouterMap(
            timesteps=torch.tensor(self.t),
            units={k: torch.stack(v, dim=-1) for k, v in self.units.items()},
            tokens=torch.stack(self.tokens, dim=-1) if self.tokens else None,
            layer_flops=torch.stack(self.layer_flops, dim=-1) if self.layer_flops else None,
            flops=torch.tensor(self.flops, dtype=torch.float64),
        )


def _zero_layer(masks: torch.Tensor, layer: int) -> torch.Tensor:
    out = masks.clone()
    out[:, layer] = 0
    return out


@torch.no_grad()
def router_map(module, raw_model, objective, cfg: SampleConfig, device: torch.device, batch: Mapping[str, Any] | None = None,
               autocast=None, samples: int = 8) -> RouterMap:
    """Sample `min(cfg.num, samples)` images with the grids' sampler and record the routers at every step:
    width masks are a function of t alone, token masks of the real x_t along the trajectory."""
    family = family_of(raw_model)
    n = min(cfg.num, samples)
    cond = family.eval_condition(raw_model, n, batch)
    shape = tuple(family.latent_shape(raw_model.config))
    trace = RouterTrace(raw_model)
    trace.hw = shape[-2:]
    trace.text_len = _text_len(cond)
    sampler = Sampler(method=cfg.method, steps=cfg.steps, cfg_scale=cfg.cfg_scale, seed=cfg.seed)
    sample_latents(raw_model, objective, sampler, torch.arange(n), cond, shape=shape, device=device, module=module,
                   autocast=autocast, observe=trace)
    return trace.result()


def _text_len(cond: Mapping[str, Any]) -> Optional[int]:
    emb = cond.get("text_emb")
    return int(emb.shape[1]) if torch.is_tensor(emb) else None


# --- teacher-relative error ----------------------------------------------------------------------------

class PairedError:
    """Sums of squared differences of paired student/teacher samples: latents as the models output them,
    images as uint8 scaled to [0, 1] (`launch.evaluate`'s teacher_mse convention)."""

    def __init__(self) -> None:
        self.sums = np.zeros(4, dtype=np.float64)  # latent sq-sum, latent count, image sq-sum, image count

    def add(self, student_latents: torch.Tensor, teacher_latents: torch.Tensor,
            student_images: Optional[np.ndarray] = None, teacher_images: Optional[np.ndarray] = None) -> None:
        d = student_latents.double() - teacher_latents.double()
        self.sums[0] += float((d * d).sum())
        self.sums[1] += d.numel()
        if student_images is not None:
            di = (student_images.astype(np.float64) - teacher_images.astype(np.float64)) / 255.0
            self.sums[2] += float(np.square(di).sum())
            self.sums[3] += di.size

    def reduce(self, device: torch.device) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor(self.sums, device=device)
            dist.all_reduce(t)
            self.sums = t.cpu().numpy()

    def values(self) -> dict[str, float]:
        out = {"teacher_mse_latents": self.sums[0] / max(self.sums[1], 1)}
        if self.sums[3]:
            mse = self.sums[2] / self.sums[3]
            out.update(teacher_mse_images=mse, teacher_psnr_images=math.inf if mse == 0 else 10 * math.log10(1 / mse))
        return out


@torch.no_grad()
def teacher_relative_error(student, teacher, objective, sampler: Sampler, num: int, *, chunk: int = 32,
                           device: torch.device | str = "cpu", decoder: Optional[Decoder] = None,
                           cond: Optional[Mapping[str, torch.Tensor]] = None) -> dict[str, float]:
    """MSE of a student's samples against its teacher's from the same noise and condition (sample i ↔
    sample i, seeds as `launch.sample`'s): "teacher_mse_latents", and with images (a decoder, or a
    pixel-space model: identity) "teacher_mse_images" (pixels in [0, 1]) and "teacher_psnr_images".

    One process. `cond`: rows for the `num` samples (default: the family's evaluation condition, every
    class in turn for a class-conditional model)."""
    device = torch.device(device)
    family = family_of(student)
    shape = tuple(family.latent_shape(student.config))
    cond = dict(cond) if cond is not None else family.eval_condition(student, num, None)
    decoder = decoder if decoder is not None else (Decoder() if student.config.in_channels in (1, 3) else None)
    err = PairedError()
    for a, b in chunk_ranges(num, chunk):
        idx = torch.arange(a, b)
        rows = {k: v[a:b] if torch.is_tensor(v) else v for k, v in cond.items()}
        ls, _ = sample_latents(student, objective, sampler, idx, rows, shape=shape, device=device)
        lt, _ = sample_latents(teacher, objective, sampler, idx, rows, shape=shape, device=device)
        err.add(ls, lt, *((decoder(ls), decoder(lt)) if decoder is not None else ()))
    return err.values()


# --- quality vs step ---------------------------------------------------------------------------------

@lru_cache(maxsize=2)
def _inception(path: str, device: str):
    from trainer.metrics.inception import InceptionFeatures

    return InceptionFeatures(path, device)


@lru_cache(maxsize=2)
def _reference(path: str, inception: str, device: str):
    from trainer.metrics.inception import extract
    from trainer.metrics.reference import load_reference

    net = _inception(inception, device)
    return load_reference(path, {"pool"}, lambda im: extract(im.chunks(50), net, desc="reference"), None).pool


@lru_cache(maxsize=2)
def _decoder(vae: Optional[str], device: str, scaling: Optional[float], shift: Optional[float]) -> Decoder:
    return Decoder(vae, device, scaling, shift)


def eval_conditions(cfg: RunConfig, raw, n: int, batch: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
    """Conditions of the n evaluation samples: every class in turn, or the run's evaluation prompts
    (`prompts.safetensors` beside the shards) in turn, else the family's rows of a training batch."""
    family = family_of(raw)
    spec = family.conditioning(raw.config)
    if spec.kind != "class" and cfg.data.path:
        from data import load_prompt_embeddings

        found = load_prompt_embeddings(cfg.data.path)
        if found is not None:
            tensors = found[1]
            idx = torch.arange(n) % len(found[0])
            return raw.condition({k: (tensors[k][idx].float() if k != "text_mask" else tensors[k][idx])
                                  for k in spec.batch_keys})
    return family.eval_condition(raw, n, batch)


def _latent_factors(cfg: RunConfig) -> tuple[Optional[float], Optional[float]]:
    """The scaling the run's latents were trained with (its shard manifest), so decoding inverts it."""
    if cfg.data.input != "latent" or not cfg.data.path:
        return None, None
    from data.manifest import read_manifest

    latent = read_manifest(cfg.data.path).latent or {}
    return latent.get("scaling_factor"), latent.get("shift_factor")


@torch.no_grad()
def evaluate_quality(cfg: RunConfig, engine, objective, step: int, batch: Mapping[str, Any] | None) -> dict[str, float]:
    """`sample.eval_num` samples of the EMA student (and the teacher, from the same noise and conditions),
    spread over the ranks in chunks: "eval/teacher_mse_latents", "eval/teacher_mse_images",
    "eval/teacher_psnr_images" (every rank) and "eval/fid" against `sample.fid_ref`, "eval/fid_teacher"
    (rank 0, which gathers the Inception features) — whichever the configuration allows."""
    import time

    s, env = cfg.sample, engine.env
    t0 = time.perf_counter()
    modules = dict(engine.eval_modules())
    name = "ema" if "ema" in modules else "student"
    student_mod, teacher_mod = modules[name], modules.get("teacher")
    raw = engine.raw_student
    teacher_raw = getattr(teacher_mod, "module", teacher_mod)
    family = family_of(raw)
    shape = tuple(family.latent_shape(raw.config))
    sampler = Sampler(method=s.method, steps=s.steps, cfg_scale=s.cfg_scale, seed=s.seed)
    cond = eval_conditions(cfg, raw, s.eval_num, batch)
    chunks = chunk_ranges(s.eval_num, s.eval_batch)
    rounds = -(-len(chunks) // env.world_size)  # every rank calls the (maybe sharded) models equally often
    mine = [c for c in range(env.rank, rounds * env.world_size, env.world_size)]
    dev = str(env.device)
    images = s.inception is not None or raw.config.in_channels in (1, 3) or s.vae is not None
    decoder = _decoder(s.vae, dev, *_latent_factors(cfg)) if images else None
    net = _inception(s.inception, dev) if s.inception else None
    err = PairedError()
    feats: dict[str, list[np.ndarray]] = {"student": [], "teacher": []}
    for c in mine:
        real = c < len(chunks)
        a, b = chunks[c] if real else chunks[0]  # a rank with no chunk left repeats one, and drops it
        idx = torch.arange(a, b)
        rows = {k: v[a:b] if torch.is_tensor(v) else v for k, v in cond.items()}
        out = {}
        for who, mod, model in (("student", student_mod, raw), ("teacher", teacher_mod, teacher_raw)):
            if mod is None:
                continue
            lat, _ = sample_latents(model, objective, sampler, idx, rows, shape=shape, device=env.device, module=mod,
                                    autocast=engine.autocast())
            out[who] = (lat, decoder(lat) if decoder is not None else None)
        if not real:
            continue
        if "teacher" in out:
            err.add(out["student"][0], out["teacher"][0], out["student"][1], out["teacher"][1])
        if net is not None:
            for who, (_, img) in out.items():
                feats[who].append(net(np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img)["pool"])
    values: dict[str, float] = {}
    if teacher_mod is not None:
        err.reduce(env.device)
        values.update({f"eval/{k}": v for k, v in err.values().items()})
    if net is not None:
        values.update(_fids(cfg, feats, dev, env))
    values["eval/seconds"] = time.perf_counter() - t0
    return values


def _fids(cfg: RunConfig, feats: dict[str, list[np.ndarray]], dev: str, env) -> dict[str, float]:
    """Pool_3 features of every rank gathered on rank 0: FID against the reference and the teacher."""
    from trainer.metrics.frechet import frechet_distance, stats_of

    local = {k: np.concatenate(v) if v else np.zeros((0, 2048), np.float32) for k, v in feats.items()}
    if dist.is_initialized() and env.world_size > 1:
        everyone: list[Any] = [None] * env.world_size
        dist.all_gather_object(everyone, local)
        local = {k: np.concatenate([e[k] for e in everyone]) for k in local}
    out: dict[str, float] = {}
    if not env.is_main:
        return out
    student = stats_of(local["student"])
    if cfg.sample.fid_ref is not None:
        out["eval/fid"] = frechet_distance(student, _reference(cfg.sample.fid_ref, cfg.sample.inception, dev))
    if len(local["teacher"]):
        out["eval/fid_teacher"] = frechet_distance(student, stats_of(local["teacher"]))
    return out
