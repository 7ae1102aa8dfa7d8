"""Every metric of one sample set in one pass: what `python -m launch.evaluate` runs.

Settings are checked (paths, metric names, what each metric needs, the Inception and CLIP weights
on disk) before any image is read. The sample set then goes through Inception once, keeping
statistics, and, only when a metric needs them, pool_3 features (precision/recall) and logits (IS);
the reference and teacher sets go through once each when their statistics are not stored.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from trainer.metrics.frechet import frechet_distance
from trainer.metrics.images import ImageSet, open_images
from trainer.metrics.inception import SPATIAL_DIM, FeatureSummary, InceptionFeatures, extract, find_weights
from trainer.metrics.manifold import inception_score, precision_recall
from trainer.metrics.reference import can_give_features, load_reference, save_reference

METRICS = ("fid", "sfid", "is", "pr", "teacher_fid", "teacher_mse", "clip")
INCEPTION_METRICS = frozenset({"fid", "sfid", "is", "pr", "teacher_fid"})
NEEDS = {"fid": "ref", "sfid": "ref", "pr": "ref", "teacher_fid": "teacher", "teacher_mse": "teacher", "clip": "clip_model"}
FLAG = {"ref": "--ref", "teacher": "--teacher", "clip_model": "--clip-model"}


@dataclass
class EvalSettings:
    samples: str
    ref: Optional[str] = None
    teacher: Optional[str] = None
    metrics: Optional[list[str]] = None  # None: every metric the inputs allow
    inception: Optional[str] = None  # weights file; None: $DITILL_INCEPTION_WEIGHTS or torch hub's folder
    device: str = "cpu"
    batch_size: int = 50
    resolution: Optional[int] = None  # folder/shard images are centre-cropped to this (default: the samples')
    is_splits: int = 10
    pr_k: int = 3
    pr_batch: int = 10000
    prompts: Optional[str] = None
    images_per_prompt: int = 1
    clip_model: Optional[str] = None
    clip_weights: Optional[str] = None
    save_ref_stats: Optional[str] = None


class EvalError(ValueError):
    """Settings that cannot work; raised before any image is read."""


def plan_metrics(s: EvalSettings) -> tuple[list[str], dict[str, str]]:
    """(metrics to compute, {metric: why it is left out}) for these settings."""
    skipped: dict[str, str] = {}
    if s.metrics is not None:
        unknown = [m for m in s.metrics if m not in METRICS]
        if unknown:
            raise EvalError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
        for m in s.metrics:
            need = NEEDS.get(m)
            if need and not getattr(s, need):
                raise EvalError(f"metric {m!r} needs {FLAG[need]}")
        if "pr" in s.metrics and s.ref and not can_give_features(s.ref):
            raise EvalError(f"precision/recall needs reference images, but {s.ref} holds only statistics (no arr_0)")
        return [m for m in METRICS if m in s.metrics], skipped
    plan = [m for m in METRICS if not NEEDS.get(m) or getattr(s, NEEDS[m])]
    if "pr" in plan and not can_give_features(s.ref):
        plan.remove("pr")
        skipped["pr"] = f"{s.ref} holds statistics only (no arr_0 images to take features from)"
    return plan, skipped


def check_settings(s: EvalSettings) -> tuple[list[str], dict[str, str]]:
    """`plan_metrics`' answer, after every check that needs no image."""
    for name, path in (("samples", s.samples), ("--ref", s.ref), ("--teacher", s.teacher), ("--prompts", s.prompts)):
        if path is not None and not os.path.exists(path):
            raise EvalError(f"{name} {path!r} does not exist")
    for name, value, low in (("--batch-size", s.batch_size, 1), ("--is-splits", s.is_splits, 1), ("--pr-k", s.pr_k, 1),
                             ("--pr-batch", s.pr_batch, 1), ("--images-per-prompt", s.images_per_prompt, 1)):
        if value < low:
            raise EvalError(f"{name} must be ≥ {low}, got {value}")
    if s.device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"--device {s.device}: CUDA is not available here; use --device cpu")
    plan, skipped = plan_metrics(s)
    if s.save_ref_stats and not ({"fid", "sfid"} & set(plan)):
        raise EvalError("--save-ref-stats needs fid or sfid in the metrics (and --ref)")
    if INCEPTION_METRICS & set(plan):
        try:
            find_weights(s.inception)
        except FileNotFoundError as e:
            raise EvalError(f"{e} Without it only the weight-free metrics run: --metrics teacher_mse (and clip).") from e
    if "clip" in plan:
        from trainer.metrics.clip import resolve_clip

        resolve_clip(s.clip_model, s.clip_weights)  # raises ClipWeightsError (a FileNotFoundError) with the fix
    return plan, skipped


def _side(images: ImageSet) -> Optional[int]:
    r = images.resolution
    return r[0] if r and r[0] == r[1] else None


def evaluate(s: EvalSettings) -> dict[str, Any]:
    """{"metrics": {...}, "settings": {...}, "inputs": {...}, "skipped": {...}, "notes": [...]}."""
    plan, skipped = check_settings(s)
    samples = open_images(s.samples)
    if "is" in plan and len(samples) < s.is_splits:
        raise EvalError(f"{len(samples)} samples cannot make {s.is_splits} Inception Score splits; lower --is-splits")
    if "pr" in plan and len(samples) <= s.pr_k:
        raise EvalError(f"precision/recall with k={s.pr_k} needs more than {s.pr_k} samples, got {len(samples)}")
    side = s.resolution or _side(samples)
    teacher = open_images(s.teacher, side) if s.teacher else None
    m: dict[str, Any] = {}
    out: dict[str, Any] = {"metrics": m, "settings": {**asdict(s), "metrics": plan}, "skipped": skipped, "notes": [],
                           "inputs": {"samples": samples.describe()}}
    if INCEPTION_METRICS & set(plan):
        net = InceptionFeatures(s.inception, s.device)
        out["inception"] = net.describe()
        if not net.standard:
            out["notes"].append("the Inception weights are not the standard file (sha256 does not start with 6726825d): "
                                "scores are not comparable with published FIDs")

        def summarize(images: ImageSet, keep_pool: bool = False, keep_logits: bool = False, desc: str = "") -> FeatureSummary:
            return extract(images.chunks(s.batch_size), net, keep_pool, keep_logits, total=len(images), desc=desc)

        _inception_metrics(s, plan, samples, teacher, side, summarize, out)
    if "teacher_mse" in plan:
        from trainer.metrics.teacher import teacher_mse

        m.update(teacher_mse(samples, teacher, s.batch_size))
        if m["teacher_mse_latents"] is None:
            out["notes"].append("teacher_mse_latents: the student and teacher sets do not both hold latents")
    if teacher is not None:
        out["inputs"]["teacher"] = teacher.describe()
    if "clip" in plan:
        _clip(s, samples, out)
    return out


def _inception_metrics(s: EvalSettings, plan: list[str], samples: ImageSet, teacher: Optional[ImageSet],
                       side: Optional[int], summarize, out: dict[str, Any]) -> None:
    m = out["metrics"]
    summ = summarize(samples, keep_pool="pr" in plan, keep_logits="is" in plan, desc="samples")
    m["samples"] = summ.n
    if summ.n < 2048:
        out["notes"].append(f"{summ.n} samples: with fewer than 2,048 the pool_3 covariance is rank-deficient and FID "
                            "is biased upward (the standard is 50,000 samples)")
    if "is" in plan:
        m["inception_score"], m["inception_score_std"] = inception_score(summ.logits, s.is_splits)
    if {"fid", "sfid", "pr"} & set(plan):
        need = ({"pool"} if "fid" in plan else set()) | ({"spatial"} if "sfid" in plan else set())
        need |= ({"features"} if "pr" in plan else set()) | ({"pool", "spatial"} if s.save_ref_stats else set())
        ref = load_reference(s.ref, need, lambda im: summarize(im, keep_pool="features" in need, desc="reference"), side)
        out["inputs"]["reference"] = ref.describe()
        if "fid" in plan:
            m["fid"] = frechet_distance(summ.pool, ref.pool)
        if "sfid" in plan:
            if ref.spatial.mu.shape[0] != SPATIAL_DIM:
                raise EvalError(f"{s.ref}: mu_s has {ref.spatial.mu.shape[0]} entries, expected {SPATIAL_DIM} "
                                "(17·17·7 of mixed_6/conv); it was not made by ADM's evaluator")
            m["sfid"] = frechet_distance(summ.spatial, ref.spatial)
        if "pr" in plan:
            m["precision"], m["recall"] = precision_recall(ref.pool_features, summ.pool_features, s.pr_k, s.pr_batch, s.device)
        if s.save_ref_stats:
            out["saved_reference"] = save_reference(s.save_ref_stats, ref)
    if "teacher_fid" in plan:
        m["teacher_fid"] = frechet_distance(summ.pool, summarize(teacher, desc="teacher").pool)


def _clip(s: EvalSettings, samples: ImageSet, out: dict[str, Any]) -> None:
    from trainer.metrics.clip import ClipScorer, clip_score, read_prompts

    captions = read_prompts(s.prompts, s.images_per_prompt) if s.prompts else samples.captions()
    if captions is None:
        raise EvalError(f"clip needs captions: {s.samples} holds none (no 'captions' array / 'caption' field); "
                        "pass --prompts FILE [--images-per-prompt K]")
    if len(captions) != len(samples):
        raise EvalError(f"{len(captions)} captions for {len(samples)} samples (--images-per-prompt "
                        f"{s.images_per_prompt}); sample i must be prompt i // k")
    scorer = ClipScorer(s.clip_model, s.clip_weights, s.device)
    out["clip"] = scorer.describe()
    out["metrics"].update(clip_score(samples.chunks(s.batch_size), captions, scorer))


def json_safe(obj: Any) -> Any:
    """JSON has no inf/nan: write them as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(result: dict[str, Any], path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(json_safe(result), f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


ROWS = (("fid", "FID"), ("sfid", "sFID"), ("inception_score", "Inception Score"), ("precision", "precision"),
        ("recall", "recall"), ("teacher_fid", "FID vs teacher"), ("teacher_mse_images", "MSE vs teacher (images, [0,1])"),
        ("teacher_psnr_images", "PSNR vs teacher (dB)"), ("teacher_mse_latents", "MSE vs teacher (latents)"),
        ("clip_score", "CLIP score"), ("clip_cosine", "CLIP cosine"))


def format_table(result: dict[str, Any]) -> str:
    """The readable view of `evaluate`'s result."""
    m = result["metrics"]
    lines = [f"{'metric':<32}{'value':>14}"]
    for key, label in ROWS:
        if key not in m or m[key] is None:
            continue
        value = f"{m[key]:.4f}"
        if key == "inception_score":
            value += f" ± {m['inception_score_std']:.3f}"
        lines.append(f"{label:<32}{value:>14}")
    inputs = result["inputs"]
    smp = inputs["samples"]
    lines += ["", f"samples:   {smp['path']} ({smp['images']} images, {smp['kind']})"]
    if "reference" in inputs:
        ref = inputs["reference"]
        lines.append(f"reference: {ref['path']} ({'; '.join(f'{k}: {v}' for k, v in ref['origin'].items())})")
    if "teacher" in inputs:
        lines.append(f"teacher:   {inputs['teacher']['path']} ({inputs['teacher']['images']} images)")
    if "inception" in result:
        inc = result["inception"]
        lines.append(f"inception: {inc['weights']} (sha256 {inc['sha256'][:12]}…, standard: {inc['standard_weights']})")
    if "clip" in result:
        lines.append(f"clip:      {result['clip']['model']} {result['clip']['weights'] or ''}".rstrip())
    for metric, why in result["skipped"].items():
        lines.append(f"skipped {metric}: {why}")
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)
