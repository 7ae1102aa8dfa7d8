"""`python -m launch.benchmark models [--json] [--quick]`: do the students' savings become time?

Two measurements, each a ratio taken side by side in one process so that machine load, threads
and library versions cancel:

1. one attention layer forward + backward at DiT-S width (384): softmax with 6 heads (the
   teacher) against LiT's linear attention with 2 heads and the 5x5 DWC, from 256 to 16,384 tokens;
2. a DyDiT-S/2 in inference (eval, sliced path) with its routers driven to about half the FLOPs,
   against the static DiT-S/2 with the same weights: realised speed-up against the ideal speed-up
   static FLOPs / realised FLOPs (whole model, fixed parts and routers included).

Timing: warm-up, then the candidates run interleaved (rotating order) and the median of the
repeats is reported, so a burst of load on a shared machine hits both sides of a ratio alike.
Threads are whatever torch uses by default. The numbers are for this machine only.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from models import build_model, model_config
from models.attention import build_attention
from models.flops import attention_cost, realised_flops, static_flops
from models.inherit import inherit_weights

WIDTH = 384  # DiT-S
SOFTMAX_HEADS, LIT_HEADS, DWC = 6, 2, 5
LIT_BAR_TOKENS, LIT_BAR = 4096, 6.0
DYNAMIC_BAR = 0.8  # realised speed-up ≥ 0.8 × ideal speed-up


@dataclass(frozen=True)
class AttnCase:
    tokens: int
    batch: int
    repeats: int
    warmup: int = 1


# Batches keep every case at >= 4,096 tokens per step; 16,384-token softmax takes ~10 s per
# forward+backward on 2 idle cores (much more on a busy machine), so it runs at batch 1, 3 repeats
# and no warm-up (first-call costs are noise against 10 s) to keep the suite near 5 minutes.
DEFAULT_ATTN = (AttnCase(256, 16, 9), AttnCase(1024, 4, 9), AttnCase(4096, 1, 9), AttnCase(16384, 1, 3, warmup=0))
QUICK_ATTN = (AttnCase(64, 2, 2), AttnCase(256, 1, 2))


@dataclass(frozen=True)
class DynamicCase:
    overrides: dict[str, Any]
    batch: int
    repeats: int
    heads_on: int  # of 6 (unit 0 included)
    groups_on: int  # of 6 MLP channel groups
    token_keep: float  # fraction of tokens routed to the MLP


# 3/6 heads, 4/6 channel groups and 3/4 of the tokens: (½·attn + ⅔·¾·mlp) = ½ of DyDiT's FLOPs.
DEFAULT_DYN = DynamicCase({}, batch=8, repeats=11, heads_on=3, groups_on=4, token_keep=0.75)
QUICK_DYN = DynamicCase({"depth": 2, "input_size": 8}, batch=2, repeats=2, heads_on=3, groups_on=4, token_keep=0.75)


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each fn, the fns taking turns (order rotated every repeat)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over repeats of a[r] / b[r]: each pair ran back to back, so a slow drift in machine
    load cancels within a pair (a ratio of medians can pair a quiet a with a loaded b)."""
    return statistics.median(x / y for x, y in zip(a, b))


def _fwd_bwd(module: torch.nn.Module, x: torch.Tensor, grid: tuple[int, int], grad: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x, grid).backward(grad)

    return step


def bench_attention(cases: tuple[AttnCase, ...]) -> list[dict[str, Any]]:
    """Softmax (6 heads) vs LiT (2 heads + DWC) attention layers, forward + backward."""
    soft_cfg = model_config("dit-s/2")
    lit_cfg = model_config("lit-s/2")
    rows = []
    for case in cases:
        torch.manual_seed(0)
        side = int(round(case.tokens**0.5))
        grid = (side, side)
        x = torch.randn(case.batch, case.tokens, WIDTH, requires_grad=True)
        grad = torch.randn(case.batch, case.tokens, WIDTH)
        soft = build_attention("softmax", WIDTH, SOFTMAX_HEADS, 0, 0.0, "auto")
        lit = build_attention("linear", WIDTH, LIT_HEADS, DWC, lit_cfg.linear_eps, "auto")
        fns = {"softmax": _fwd_bwd(soft, x, grid, grad), "lit": _fwd_bwd(lit, x, grid, grad)}
        t = time_interleaved(fns, case.repeats, case.warmup)
        s_ms, l_ms = 1e3 * statistics.median(t["softmax"]), 1e3 * statistics.median(t["lit"])
        rows.append({
            "tokens": case.tokens, "batch": case.batch, "repeats": case.repeats,
            "softmax_ms": s_ms, "lit_ms": l_ms, "speedup": s_ms / l_ms,
            "speedup_paired": paired_ratio(t["softmax"], t["lit"]),
            "speedup_best": min(t["softmax"]) / min(t["lit"]),  # best-of-repeats: least disturbed by load
            "flops_ratio": attention_cost(soft_cfg, case.tokens) / attention_cost(lit_cfg, case.tokens),
            "softmax_all_ms": [1e3 * v for v in t["softmax"]], "lit_all_ms": [1e3 * v for v in t["lit"]],
        })
    return rows


def randomize_(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Non-zero weights everywhere (DiT zero-initialises adaLN and the final layer) so that every
    layer computes something realistic; routers are set separately."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def fix_width_router_(router: torch.nn.Module, on: int) -> None:
    """A width router that turns on its first `on` units (unit 0 included) for every t: weights 0, biases ±10."""
    with torch.no_grad():
        router.router.weight.zero_()
        router.router.bias.copy_(torch.where(torch.arange(router.router.bias.numel()) < on - 1, 10.0, -10.0))


def keep_tokens_hook(keep: float) -> Callable[..., None]:
    """A forward pre-hook for a `TokenSelect`: sets its final bias to the quantile of its own logits that
    keeps the fraction `keep` of the tokens it actually sees (run one calibration forward, then remove)."""

    def calibrate(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        last = module.mlp_head[2]
        with torch.no_grad():
            last.bias.zero_()
            logits = module.mlp_head(inputs[0]).float().flatten()
            last.bias.fill_(-float(torch.quantile(logits, 1.0 - keep)) + 1e-4)

    return calibrate


def drive_routers_(model: torch.nn.Module, case: DynamicCase, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
    """Deterministic routing at a chosen width and token fraction.

    Width routers: weights 0 and biases ±10, so the first `heads_on` heads and `groups_on` groups
    are on for every t. Token routers: one calibration pass where a pre-hook sets each block's final
    bias to the quantile of its own logits that keeps `token_keep` of the tokens it actually sees.
    """
    handles = []
    for block in model.blocks:
        fix_width_router_(block.attn_rate, case.heads_on)
        fix_width_router_(block.mlp_rate, case.groups_on)
        handles.append(block.token_selection.register_forward_pre_hook(keep_tokens_hook(case.token_keep)))
    with torch.no_grad():
        model(x, t, y)
    for h in handles:
        h.remove()


def bench_dynamic(case: DynamicCase) -> dict[str, Any]:
    """Static DiT-S/2 vs the same weights as a DyDiT-S/2 at ~½ FLOPs, inference (eval, no grad)."""
    torch.manual_seed(0)
    static = build_model("dit-s/2", **case.overrides)
    randomize_(static)
    dynamic = build_model("dydit-s/2", **case.overrides)
    inherit_weights(dynamic, static.state_dict())
    static.eval(), dynamic.eval()
    cfg = dynamic.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(case.batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.full((case.batch,), 500.0)  # one sampling step: the whole batch shares t
    y = torch.randint(0, cfg.num_classes, (case.batch,), generator=g)
    with torch.inference_mode():
        drive_routers_(dynamic, case, x, t, y)
        dynamic.dynamic_exec = "sliced"
        _, aux = dynamic(x, t, y, return_aux=True)

        def run(model: torch.nn.Module, exec_mode: str = "sliced") -> Callable[[], Any]:
            steps = iter(range(999, -1, -1))

            def fn() -> Any:  # a new timestep every call, as in a sampler: no width plan is reused
                model.dynamic_exec = exec_mode
                return model(x, torch.full_like(t, float(next(steps))), y)

            return fn

        times = time_interleaved(
            {"static": run(static), "sliced": run(dynamic), "masked": run(dynamic, "masked")}, case.repeats
        )
        dynamic.dynamic_exec = "auto"
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    flops_static = static_flops(static.config)
    flops_real = float(realised_flops(cfg, aux).mean())
    ideal = flops_static / flops_real
    speedup = ms["static"] / ms["sliced"]
    return {
        "model": "dydit-s/2", "overrides": case.overrides, "batch": case.batch, "tokens": cfg.num_tokens,
        "repeats": case.repeats,
        "heads_on": float(aux["head_masks"].mean()), "groups_on": float(aux["channel_masks"].mean()),
        "tokens_routed": float(aux["token_masks"].mean()),
        "flops_ratio_dydit": float(aux["flops_ratio"].mean()),  # attention+MLP only (FLOPs-loss convention)
        "gflops_static": flops_static / 1e9, "gflops_realised": flops_real / 1e9,
        "flops_ratio_whole": flops_real / flops_static,
        "static_ms": ms["static"], "sliced_ms": ms["sliced"], "masked_ms": ms["masked"],
        "speedup": speedup, "ideal_speedup": ideal, "efficiency": speedup / ideal,
        "speedup_paired": paired_ratio(times["static"], times["sliced"]),
        "speedup_best": min(times["static"]) / min(times["sliced"]),
        "all_ms": {k: [1e3 * v for v in vs] for k, vs in times.items()},
    }


def format_report(res: dict[str, Any]) -> str:
    """The printed table: medians decide; best-of-repeats ratios show how much load moved them."""
    lines = [f"models benchmark: torch {res['torch']}, {res['threads']} threads on {res['cpus']} CPUs, "
             f"quick={res['quick']}, load average before/after {res['load_before'][0]:.2f}/{res['load_after'][0]:.2f}", ""]
    lines.append(f"attention layer fwd+bwd, width {WIDTH}: softmax {SOFTMAX_HEADS} heads vs LiT {LIT_HEADS} heads + DWC{DWC}")
    lines.append("  (median ms; speed-up = ratio of medians; paired = median of per-repeat ratios; best = ratio of")
    lines.append("   fastest repeats; FLOPs ratio = analytic forward attention FLOPs, softmax / LiT)")
    lines.append(f"{'tokens':>7}{'batch':>6}{'reps':>5}{'softmax ms':>12}{'LiT ms':>10}{'speed-up':>10}{'paired':>8}"
                 f"{'best':>8}{'FLOPs ratio':>13}")
    for r in res["attention"]:
        lines.append(f"{r['tokens']:>7}{r['batch']:>6}{r['repeats']:>5}{r['softmax_ms']:>12.1f}{r['lit_ms']:>10.1f}"
                     f"{r['speedup']:>9.2f}x{r['speedup_paired']:>7.2f}x{r['speedup_best']:>7.2f}x{r['flops_ratio']:>12.2f}x")
    d = res["dynamic"]
    lines += ["", f"{d['model']} {d['overrides'] or ''} inference (eval, no grad), batch {d['batch']}, "
              f"{d['tokens']} tokens, median of {d['repeats']}",
              f"routing: heads on {d['heads_on']:.3f}, channel groups on {d['groups_on']:.3f}, "
              f"tokens routed {d['tokens_routed']:.3f}",
              f"FLOPs ratio: attn+MLP (DyDiT loss convention) {d['flops_ratio_dydit']:.3f}; whole model "
              f"{d['gflops_realised']:.3f} / {d['gflops_static']:.3f} GFLOPs = {d['flops_ratio_whole']:.3f}",
              f"{'static DiT-S/2':<28}{d['static_ms']:>9.1f} ms",
              f"{'DyDiT sliced':<28}{d['sliced_ms']:>9.1f} ms   speed-up {d['speedup']:.2f}x "
              f"(paired {d['speedup_paired']:.2f}x, best {d['speedup_best']:.2f}x)",
              f"{'DyDiT masked (train path)':<28}{d['masked_ms']:>9.1f} ms",
              f"ideal speed-up (whole-model FLOPs) {d['ideal_speedup']:.2f}x; realised/ideal {d['efficiency']:.2f}", ""]
    if res["quick"]:
        lines.append("quick mode: tiny sizes, overhead-bound; no bar applies")
    for b in res["bars"].values():
        lines.append(f"bar: {b['what']}: {b['value']:.2f} (need >= {b['need']:.2f}) -> {'PASS' if b['pass'] else 'MISS'}")
    return "\n".join(lines)


def judge(attn: list[dict[str, Any]], dyn: dict[str, Any], quick: bool) -> dict[str, dict[str, Any]]:
    """The two bars of issue 2 item 10, on medians; none in quick mode (its sizes are all overhead)."""
    if quick:
        return {}
    bars: dict[str, dict[str, Any]] = {}
    at = [r for r in attn if r["tokens"] == LIT_BAR_TOKENS]
    if at:
        bars["lit"] = {"what": f"LiT speed-up over softmax at {LIT_BAR_TOKENS} tokens", "value": at[0]["speedup"],
                       "need": LIT_BAR, "pass": at[0]["speedup"] >= LIT_BAR}
    bars["dynamic"] = {"what": "DyDiT realised speed-up", "value": dyn["speedup"],
                       "need": DYNAMIC_BAR * dyn["ideal_speedup"], "pass": dyn["efficiency"] >= DYNAMIC_BAR}
    return bars


def run(quick: bool) -> dict[str, Any]:
    load_before = os.getloadavg()
    # The short dynamic-model section first, the long 16k-token softmax last: on a shared machine
    # a quiet start then covers both bars' measurements.
    dyn = bench_dynamic(QUICK_DYN if quick else DEFAULT_DYN)
    attn = bench_attention(QUICK_ATTN if quick else DEFAULT_ATTN)
    bars = judge(attn, dyn, quick)
    # The load average is recorded because a shared machine's other work skews absolute times
    # (the interleaving keeps the ratios fair, but heavy oversubscription still hurts threaded ops).
    return {"suite": "models", "quick": quick, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "load_before": list(load_before), "load_after": list(os.getloadavg()),
            "attention": attn, "dynamic": dyn, "bars": bars}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.benchmark models", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print every number as one JSON object")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds): checks the suite runs, not speed")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's default)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    res = run(args.quick)
    print(json.dumps(res, indent=2) if args.json else format_report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
