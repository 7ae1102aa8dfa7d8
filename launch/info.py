"""`python -m launch.info MODEL [--json] [--resolution R ...] [key=value ...]`: parameters and GFLOPs of a
registry model. `python -m launch.info MODEL --plan --gpus N --gpu-mem G [--teacher T] [--peft none|lora|tdlora|all]
...`: its per-rank memory when distilled under FSDP2, fully fine-tuned or with adapters (`trainer/memory_plan.py`).

Thin: parse, build on the meta device (no weights are allocated, so `dit-xl/2` costs nothing), ask
the model's family for the analytic counts, print. FLOPs are multiply-adds per image at the model's
native resolution (the DiT paper's unit), so dit-xl/2 reads 118.6 GFLOPs as in the paper; a family
that runs at any size (PixArt-Σ) also reports the resolutions it names (`report_resolutions`), and
`--resolution 512 768x1024` asks for others (pixels, square or H×W).
`--memory` is a deprecated alias of `--plan --peft all`.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import Counter
from dataclasses import fields
from typing import Any

import torch

from models import family_of, model_config
from models.family import resolve_name

# Parameter and FLOPs groups in print order (ModelFamily.param_group / ModelFamily.flops).
PARAM_GROUPS = ("attention", "mlp", "adaLN", "routers", "embeddings", "final_layer")


def parse_value(text: str) -> Any:
    """`64` → int, `0.5` → float, `true`/`false` → bool, `None` → None, `[4,6,6]` → a list of numbers,
    anything else → the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        return list(value)
    return value if isinstance(value, (int, float, str)) else text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["input_size=64", "depth=2"]` → `{"input_size": 64, "depth": 2}`; a malformed item is a ValueError."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value (e.g. input_size=64)")
        out[key.strip()] = parse_value(value.strip())
    return out


# Config field annotation → the Python types a command-line value may have for it.
_ACCEPTS: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "bool": (bool,), "str": (str,),
    "Optional[int]": (int, type(None)), "int | None": (int, type(None)),
}


def check_types(config_cls: type, overrides: dict[str, Any]) -> None:
    """A value of the wrong type (`depth=abc`) is a ValueError naming the key, before any build."""
    kinds = {f.name: str(f.type) for f in fields(config_cls)}
    for key, value in overrides.items():
        accepts = _ACCEPTS.get(kinds.get(key, ""))
        if accepts is None:
            continue  # unknown keys are reported by the registry, with the allowed list
        if isinstance(value, bool) and bool not in accepts or not isinstance(value, accepts):
            raise ValueError(f"model.{key}={value!r} is invalid: expected {kinds[key]}")


def count_params(cfg: Any) -> dict[str, int]:
    """Parameter counts per group and in total, from a model built on the meta device."""
    family = family_of(cfg)
    with torch.device("meta"):
        model = family.build(cfg)
    counts: Counter[str] = Counter()
    for name, p in model.named_parameters():
        counts.update(family.param_split(cfg, name, tuple(p.shape)))
    groups = {g: counts.get(g, 0) for g in PARAM_GROUPS}
    return {**groups, "total": sum(counts.values())}


def parse_resolution(text: str) -> int | tuple[int, int]:
    """`1024` → 1024 (square), `768x1024` → (768, 1024) pixels (height × width)."""
    parts = text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) <= 0:
        raise ValueError(f"resolution {text!r} is not R or HxW in pixels (e.g. 1024 or 768x1024)")
    return sizes[0] if len(sizes) == 1 else (sizes[0], sizes[1])


def at_resolution(family, cfg: Any, resolution: int | tuple[int, int]) -> dict[str, Any]:
    """Latent, tokens and GFLOPs per image at a pixel resolution (the family checks it fits)."""
    _, h, w = family.latent_shape(cfg, resolution)
    flops = family.flops(cfg, (h, w))
    px = (resolution, resolution) if isinstance(resolution, int) else resolution
    return {"resolution": list(px), "latent": [h, w], "tokens": family.image_tokens(cfg, (h, w)),
            "gflops": flops["total"] / 1e9, "gflops_parts": {g: flops.get(g, 0.0) / 1e9 for g in PARAM_GROUPS}}


def model_info(name: str, overrides: dict[str, Any], resolutions: list[int | tuple[int, int]] | None = None) -> dict[str, Any]:
    """Everything `launch.info` prints, as one JSON-able dict (GFLOPs per image). `resolutions`: pixel
    sizes to report besides the native one (default: the family's `report_resolutions`)."""
    family, _ = resolve_name(name)
    check_types(family.config_cls, overrides)
    cfg = model_config(name, **overrides)
    _, h, w = family.latent_shape(cfg)
    flops = family.flops(cfg)
    extra = list(family.report_resolutions) if resolutions is None else resolutions
    return {
        "model": name.lower(),
        "family": family.name,
        "kind": family.student_kind(cfg),
        "overrides": overrides,
        "latent": [h, w],
        "tokens": family.image_tokens(cfg, (h, w)),
        "attention": cfg.attention,
        "dynamic": cfg.dynamic,
        "config": cfg.to_dict(),
        "params": count_params(cfg),
        "gflops": flops["total"] / 1e9,
        "gflops_parts": {g: flops.get(g, 0.0) / 1e9 for g in PARAM_GROUPS},
        "at_resolutions": [at_resolution(family, cfg, r) for r in extra],
    }


def format_table(info: dict[str, Any]) -> str:
    """The human-readable view of `model_info`."""
    p, g, c = info["params"], info["gflops"], info["config"]
    shape = ", ".join(f"{k} {c[k]}" for k in ("depth", "hidden_size", "num_heads") if k in c)
    lines = [
        f"{info['model']}  ({info['family']} family, {info['kind']}: {info['attention']} attention"
        f"{', dynamic' if info['dynamic'] else ''})  overrides={info['overrides'] or '{}'}",
        f"latent {info['latent'][0]}x{info['latent'][1]}, {info['tokens']} image tokens, {shape}",
        f"parameters: {p['total']:,} ({p['total'] / 1e6:.2f} M; fixed buffers such as sin-cos position embeddings are not counted)",
        f"GFLOPs per image (multiply-adds): {g:.3f}",
        "",
        f"{'part':<14}{'params':>16}{'GFLOPs':>14}{'share':>8}",
    ]
    for name in PARAM_GROUPS:
        tot = info["gflops_parts"][name]
        lines.append(f"{name:<14}{p[name]:>16,}{tot:14.4f}{100 * tot / g:7.1f}%")
    lines.append(f"{'total':<14}{p['total']:>16,}{g:14.4f}{100.0:7.1f}%")
    if info.get("at_resolutions"):
        lines += ["", "GFLOPs per image (multiply-adds) at other resolutions:",
                  f"{'pixels':<12}{'latent':<10}{'tokens':>8}{'GFLOPs':>12}" + "".join(f"{n:>12}" for n in PARAM_GROUPS)]
        for r in info["at_resolutions"]:
            px, lat = "x".join(map(str, r["resolution"])), "x".join(map(str, r["latent"]))
            lines.append(f"{px:<12}{lat:<10}{r['tokens']:>8}{r['gflops']:12.1f}"
                         + "".join(f"{r['gflops_parts'][n]:12.2f}" for n in PARAM_GROUPS))
    return "\n".join(lines)


def teacher_of(name: str, overrides: dict[str, Any], teacher: str | None):
    """The teacher config of a plan: `--teacher NAME`, else the student's static softmax configuration."""
    if teacher is not None:
        return None if teacher.lower() == "none" else model_config(teacher)
    from dataclasses import replace

    return replace(model_config(name, **overrides), attention="softmax", dynamic=False).validate()


def peft_specs(args: argparse.Namespace) -> list[Any]:
    """The adapter specs `--peft` asks for (None: full fine-tuning)."""
    from models.lora import LoraSpec

    specs = {"none": None, "lora": LoraSpec(method="lora", rank=args.rank),
             "tdlora": LoraSpec(method="tdlora", rank=args.rank, experts=args.experts)}
    return list(specs.values()) if args.peft == "all" else [specs[args.peft]]


def plan_info(args: argparse.Namespace, overrides: dict[str, Any], resolution=None) -> tuple[list[Any], str]:
    """The plans of `--plan` (one per `--peft` method) and their printed tables."""
    from trainer.memory_plan import format_comparison, format_plan, plan_memory

    family, _ = resolve_name(args.model)
    check_types(family.config_cls, overrides)
    student = model_config(args.model, **overrides)
    teacher = teacher_of(args.model, overrides, args.teacher)
    plans = [plan_memory(student, teacher, args.gpus, args.gpu_mem, micro_batch=args.micro_batch,
                         resolution=resolution, text_len=args.text_len, ac=args.ac,
                         teacher_shard=not args.replicate_teacher, ema=not args.no_ema, reserve_gib=args.reserve,
                         peft=spec) for spec in peft_specs(args)]
    what = f"{args.model} {overrides or ''}".strip()
    title = f"memory plan: student {what}, teacher {args.teacher or 'its static softmax configuration' if teacher else 'none'}"
    tables = [format_plan(p, title) for p in plans]
    if len(plans) > 1:
        tables.append(f"LoRA rank {args.rank} (TD-LoRA: {args.experts} experts) vs full fine-tuning, per rank:\n"
                      + format_comparison(plans))
    return plans, "\n\n".join(tables)


def plan_json(plan: Any) -> dict[str, Any]:
    acts = plan.notes["activation_profile"]
    return {"method": plan.notes["method"], "trainable": plan.notes["trainable"],
            "gpus": plan.gpus, "gpu_mem_gib": plan.gpu_mem / 2**30, "micro_batch": plan.micro_batch, "ac": plan.ac,
            "rows_gib": {k: v / 2**30 for k, v in plan.rows.items()},
            "per_sample_gib": {k: v / 2**30 for k, v in plan.per_sample.items()},
            "total_gib": plan.total / 2**30, "fits": plan.fits, "max_micro_batch": plan.max_micro_batch,
            "checkpoint_gib": plan.checkpoint_bytes / 2**30,
            "saved_bytes_per_token": acts.per_token(), "tokens": acts.tokens}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.info", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="registry name, e.g. dit-xl/2, lit-s/2, dydit-xl/2, flux-dev, dyflux-lite")
    parser.add_argument("overrides", nargs="*", help="config overrides as key=value, e.g. input_size=64")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--resolution", nargs="+", default=None, metavar="R",
                        help="also report GFLOPs at these pixel resolutions (R or HxW), for families that run at any "
                             "size; with --plan, the one resolution planned (default: the model's native size)")
    plan = parser.add_argument_group("memory plan (distilling MODEL under FSDP2)")
    plan.add_argument("--plan", action="store_true", help="print per-rank memory instead of the model's counts")
    plan.add_argument("--gpus", type=int, default=8, help="ranks the student and teacher are sharded over (default 8)")
    plan.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    plan.add_argument("--teacher", default=None, help="teacher registry name, or none (default: MODEL's static softmax config)")
    plan.add_argument("--micro-batch", type=int, default=None, help="per-rank micro-batch (default: the largest that fits)")
    plan.add_argument("--text-len", type=int, default=None, help="text tokens (default: the model's text_len)")
    plan.add_argument("--ac", choices=("full", "none"), default="full", help="activation checkpointing (default full)")
    plan.add_argument("--replicate-teacher", action="store_true", help="teacher.shard: false")
    plan.add_argument("--no-ema", action="store_true", help="a run without the EMA copy")
    plan.add_argument("--reserve", type=float, default=4.0, help="GiB for CUDA context, NCCL, fragmentation (default 4)")
    plan.add_argument("--peft", choices=("none", "lora", "tdlora", "all"), default="none",
                      help="student adapters: full fine-tuning (none), LoRA, TD-LoRA, or all three compared")
    plan.add_argument("--rank", type=int, default=32, help="LoRA rank (TD-LoRA: the total over its experts)")
    plan.add_argument("--experts", type=int, default=4, help="TD-LoRA experts per layer")
    plan.add_argument("--memory", action="store_true", help="deprecated: --plan --peft all")
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.overrides)
        resolutions = None if args.resolution is None else [parse_resolution(r) for r in args.resolution]
        if args.memory:
            print("launch.info: --memory is deprecated; it is --plan --peft all", file=sys.stderr)
            args.plan, args.peft = True, "all"
        if args.plan:
            if resolutions is not None and len(resolutions) > 1:
                raise ValueError("--plan plans one resolution: give --resolution R once")
            plans, table = plan_info(args, overrides, resolutions[0] if resolutions else None)
            rows = [plan_json(p) for p in plans]
            print(json.dumps(rows[0] if len(rows) == 1 else rows, indent=2) if args.json else table)
            return 0
        info = model_info(args.model, overrides, resolutions)
    except (ValueError, TypeError, NotImplementedError) as err:
        print(f"launch.info: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_table(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
