"""`python -m launch.info MODEL [--json] [--memory ...] [key=value ...]`: parameters and GFLOPs of a registry model.

Thin: parse, build on the meta device (no weights are allocated, so `dit-xl/2` costs nothing), ask
the model's family for the analytic counts, print. FLOPs are multiply-adds per image at the model's
native resolution (the DiT paper's unit), so dit-xl/2 reads 118.6 GFLOPs as in the paper.
`--memory` adds the per-rank training memory of distilling it under full fine-tuning, LoRA and
TD-LoRA (`trainer/memory.py`: trainable parameters, optimizer bytes, peak estimate; meta device).
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
    """`64` → int, `0.5` → float, `true`/`false` → bool, `None` → None, anything else → the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
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
        counts[family.param_group(name)] += p.numel()
    groups = {g: counts.get(g, 0) for g in PARAM_GROUPS}
    return {**groups, "total": sum(counts.values())}


def model_info(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Everything `launch.info` prints, as one JSON-able dict (GFLOPs per image)."""
    family, _ = resolve_name(name)
    check_types(family.config_cls, overrides)
    cfg = model_config(name, **overrides)
    _, h, w = family.latent_shape(cfg)
    flops = family.flops(cfg)
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
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.info", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="registry name, e.g. dit-xl/2, lit-s/2, dydit-xl/2, dylit-b/4")
    parser.add_argument("overrides", nargs="*", help="config overrides as key=value, e.g. input_size=64")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    mem = parser.add_argument_group("training memory (--memory): full fine-tuning vs LoRA vs TD-LoRA, per rank")
    mem.add_argument("--memory", action="store_true", help="plan the training memory of the model as a student")
    mem.add_argument("--rank", type=int, default=32, help="LoRA rank (TD-LoRA: the total over its experts)")
    mem.add_argument("--experts", type=int, default=4, help="TD-LoRA experts per layer")
    mem.add_argument("--batch", type=int, default=32, help="micro-batch per rank")
    mem.add_argument("--world", type=int, default=1, help="ranks (FSDP2 shards weights, gradients, optimizer, EMA)")
    mem.add_argument("--engine", choices=("single", "ddp", "fsdp"), default="fsdp")
    mem.add_argument("--activation-checkpointing", choices=("none", "full"), default="none")
    args = parser.parse_args(argv)
    try:
        info = model_info(args.model, parse_overrides(args.overrides))
        if args.memory:
            info["memory"] = memory_info(args.model, parse_overrides(args.overrides), args)
    except (ValueError, TypeError, NotImplementedError) as err:
        print(f"launch.info: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_table(info) + (f"\n\n{format_memory(info['memory'])}" if args.memory else ""))
    return 0


def memory_info(name: str, overrides: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """`trainer.memory.plan` of full fine-tuning, LoRA and TD-LoRA at the same rank, with the settings."""
    from models.lora import LoraSpec
    from trainer.memory import plan

    cfg = model_config(name, **overrides)
    settings = {"rank": args.rank, "experts": args.experts, "batch": args.batch, "world": args.world,
                "engine": args.engine, "activation_checkpointing": args.activation_checkpointing,
                "compute_dtype": "bf16", "master_dtype": "fp32", "targets": ["attention", "mlp", "adaLN"]}
    rows = []
    for spec in (None, LoraSpec(method="lora", rank=args.rank), LoraSpec(method="tdlora", rank=args.rank, experts=args.experts)):
        rows.append(plan(cfg, spec, batch=args.batch, world=args.world, engine=args.engine,
                         checkpointing=args.activation_checkpointing).as_dict())
    return {"settings": settings, "plans": rows}


def format_memory(mem: dict[str, Any]) -> str:
    s, rows = mem["settings"], mem["plans"]
    gb = 1024**3
    full = rows[0]
    lines = [
        f"training memory per rank (GiB): micro-batch {s['batch']}, {s['world']} rank(s), {s['engine']}, activation "
        f"checkpointing {s['activation_checkpointing']}, bf16 compute, fp32 master weights, AdamW; LoRA rank "
        f"{s['rank']} on {'/'.join(s['targets'])} (TD-LoRA: {s['experts']} experts)",
        f"{'method':<8}{'trainable':>15}{'vs full':>9}{'weights':>9}{'grads':>8}{'optimizer':>11}{'EMA':>8}"
        f"{'teacher':>9}{'activations':>13}{'peak':>8}{'vs full':>9}{'checkpoint':>12}",
    ]
    for r in rows:
        lines.append(
            f"{r['method']:<8}{r['trainable']:>15,}{r['trainable'] / full['trainable']:>9.3f}"
            f"{r['weights_bytes'] / gb:>9.2f}{r['grad_bytes'] / gb:>8.2f}{r['optimizer_bytes'] / gb:>11.2f}"
            f"{r['ema_bytes'] / gb:>8.2f}{r['teacher_bytes'] / gb:>9.2f}{r['activation_bytes'] / gb:>13.2f}"
            f"{r['peak_bytes'] / gb:>8.2f}{r['peak_bytes'] / full['peak_bytes']:>9.3f}{r['checkpoint_bytes'] / gb:>12.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
