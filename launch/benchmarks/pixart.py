"""`python -m launch.benchmark pixart [--json] [--quick] [--width W] [--device D] [--dtype T] [--sampling]`:
do PixArt-Σ's students turn their FLOPs savings into time?

One PixArt-Σ block of each kind, side by side in one process (interleaved, rotating order, medians):
the teacher (softmax self-attention, heads of 72 channels as PixArt-Σ's), LiT (linear self-attention
with 2 heads and the 5×5 DWC; cross-attention kept) and DyDiT on its sliced inference path with its
routers driven to half the heads, half the MLP channel groups and half the tokens (~50 % of the
block's FLOPs), forward + backward and forward only, at the token counts of 1024² and 2048² images
(4,096 and 16,384 tokens) with a 300-token caption. The width is reduced on the CPU (default 288 = 4
heads of 72, a quarter of PixArt-Σ's 1152) so the 16k-token softmax stays within minutes; that
raises attention's share of the block, so the table also prints the analytic FLOPs ratios at this
width and at 1152. `--sampling` adds whole-model sampling speed of the teacher against LiT (DDIM,
classifier-free guidance) at 1024² and 2048² — meant for a GPU (`--device cuda --dtype bf16`, where
the Triton kernels run); `--quick` shrinks everything to check the suite runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch

from launch.benchmarks.models import fix_width_router_, keep_tokens_hook, paired_ratio, time_interleaved
from models import build_model, model_config
from models.diffusion import build_objective
from models.diffusion.samplers import sample
from models.inherit import default_exclude, inherit_weights
from models.pixart_flops import block_cost

HEAD_DIM = 72  # PixArt-Σ-XL: 1152 = 16 × 72
FULL_WIDTH = 1152
TEXT_TOKENS, PROMPT_TOKENS = 300, 120
KINDS = {"teacher": "pixart-sigma-xl/2", "lit": "lit-pixart-sigma-xl/2", "dydit": "dydit-pixart-sigma-xl/2"}


@dataclass(frozen=True)
class BlockCase:
    grid: tuple[int, int]
    repeats: int
    warmup: int = 1

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]


DEFAULT_CASES = (BlockCase((64, 64), 5), BlockCase((128, 128), 3, warmup=0))  # 1024² and 2048² images
QUICK_CASES = (BlockCase((8, 8), 2), BlockCase((16, 16), 2, warmup=0))
DYDIT_HALF = 0.5  # heads, channel groups and tokens on


def _config(kind: str, width: int, **kw: Any):
    heads = width // HEAD_DIM
    extra = {"mlp_groups": heads} if kind == "dydit" else {}
    return model_config(KINDS[kind], hidden_size=width, num_heads=heads, depth=1, **extra, **kw)


def build_blocks(width: int, device: torch.device) -> dict[str, torch.nn.Module]:
    """One block per kind; the students inherit the teacher's weights (all of them, or all but
    self-attention for LiT), every weight non-zero, DyDiT's routers driven to ~half."""
    torch.manual_seed(0)
    models = {k: build_model(_config(k, width)) for k in KINDS}
    teacher = models["teacher"]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    for k in ("lit", "dydit"):
        inherit_weights(models[k], teacher.state_dict(), default_exclude(teacher.config, models[k].config))
    dy = models["dydit"].blocks[0]
    heads = dy.attn_rate.num_units
    fix_width_router_(dy.attn_rate, int(heads * DYDIT_HALF))
    fix_width_router_(dy.mlp_rate, int(dy.mlp_rate.num_units * DYDIT_HALF))
    return {k: m.blocks[0].to(device).eval() for k, m in models.items()}


def block_inputs(width: int, case: BlockCase, device: torch.device, grad: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    mask = torch.zeros(1, TEXT_TOKENS, dtype=torch.bool)
    mask[:, :PROMPT_TOKENS] = True
    t = {"x": torch.randn(1, case.tokens, width, generator=g), "y": torch.randn(1, TEXT_TOKENS, width, generator=g),
         "t0": torch.randn(1, 6 * width, generator=g) * 0.1, "t_emb": torch.randn(1, width, generator=g)}
    out = {k: v.to(device) for k, v in t.items()}
    out["x"].requires_grad_(grad)
    out["mask"] = mask.to(device)
    return out


def calibrate_tokens(block: torch.nn.Module, inp: dict[str, torch.Tensor], grid: tuple[int, int]) -> None:
    """The token router keeps half the tokens it sees at this size (a quantile of its own logits)."""
    handle = block.token_selection.register_forward_pre_hook(keep_tokens_hook(DYDIT_HALF))
    with torch.no_grad():
        block(inp["x"], inp["y"], inp["mask"], inp["t0"], inp["t_emb"], grid, "sliced")
    handle.remove()


def _call(block, inp, grid, mode: str, grad: torch.Tensor | None, autocast) -> Callable[[], None]:
    def fn() -> None:
        if grad is None:
            with torch.no_grad(), autocast:
                block(inp["x"], inp["y"], inp["mask"], inp["t0"], inp["t_emb"], grid, mode)
            return
        inp["x"].grad = None
        block.zero_grad(set_to_none=True)
        with autocast:
            out, _ = block(inp["x"], inp["y"], inp["mask"], inp["t0"], inp["t_emb"], grid, mode)
        out.backward(grad.to(out.dtype))

    return fn


def _sync(device: torch.device) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        return run

    return wrap


def realised_block_ratio(block: torch.nn.Module, inp, grid, width: int) -> tuple[float, float]:
    """(realised / static FLOPs of the DyDiT block, ideal speed-up over the teacher block)."""
    with torch.no_grad():
        _, m = block(inp["x"], inp["y"], inp["mask"], inp["t0"], inp["t_emb"], grid, "sliced")
    cost = block_cost(_config("dydit", width), 0, grid, TEXT_TOKENS)
    heads, chans, toks = (float(m[k].float().mean()) for k in ("head", "channel", "token"))
    real = heads * cost.self_attn + cost.cross_attn + chans * toks * cost.mlp + cost.routers
    teacher = block_cost(_config("teacher", width), 0, grid, TEXT_TOKENS)
    static = teacher.self_attn + teacher.cross_attn + teacher.mlp
    return real / (cost.self_attn + cost.cross_attn + cost.mlp + cost.routers), static / real


def flops_ratio(width: int, grid: tuple[int, int], kind: str) -> float:
    """Analytic teacher / `kind` block FLOPs (full width for LiT)."""
    t, s = (block_cost(_config(k, width), 0, grid, TEXT_TOKENS) for k in ("teacher", kind))
    return (t.self_attn + t.cross_attn + t.mlp) / (s.self_attn + s.cross_attn + s.mlp)


def bench_blocks(cases: tuple[BlockCase, ...], width: int, device: torch.device, dtype: str) -> list[dict[str, Any]]:
    blocks = build_blocks(width, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    rows = []
    for case in cases:
        for pass_ in ("fwd+bwd", "fwd"):
            grad_on = pass_ == "fwd+bwd"
            inp = block_inputs(width, case, device, grad_on)
            calibrate_tokens(blocks["dydit"], inp, case.grid)
            grad = torch.randn_like(inp["x"]) if grad_on else None
            modes = {"teacher": "static", "lit": "static", "dydit": "sliced"}
            fns = {k: _sync(device)(_call(blocks[k], inp, case.grid, modes[k], grad, autocast)) for k in KINDS}
            t = time_interleaved(fns, case.repeats, case.warmup)
            ms = {k: 1e3 * statistics.median(v) for k, v in t.items()}
            dy_ratio, dy_ideal = realised_block_ratio(blocks["dydit"], inp, case.grid, width)
            rows.append({
                "tokens": case.tokens, "grid": list(case.grid), "pass": pass_, "repeats": case.repeats,
                **{f"{k}_ms": v for k, v in ms.items()},
                "lit_speedup": ms["teacher"] / ms["lit"], "lit_speedup_paired": paired_ratio(t["teacher"], t["lit"]),
                "dydit_speedup": ms["teacher"] / ms["dydit"], "dydit_speedup_paired": paired_ratio(t["teacher"], t["dydit"]),
                "lit_flops_ratio": flops_ratio(width, case.grid, "lit"),
                "lit_flops_ratio_full_width": flops_ratio(FULL_WIDTH, case.grid, "lit"),
                "dydit_flops_fraction": dy_ratio, "dydit_ideal_speedup": dy_ideal,
                "all_ms": {k: [1e3 * x for x in v] for k, v in t.items()},
            })
    return rows


def bench_sampling(resolutions: tuple[int, ...], steps: int, overrides: dict[str, Any], device: torch.device,
                   dtype: str, repeats: int) -> list[dict[str, Any]]:
    """Whole-model sampling (DDIM, CFG 4.5, batch 1) of the teacher and LiT at each resolution."""
    torch.manual_seed(0)
    teacher = build_model(KINDS["teacher"], **overrides).to(device).eval()
    lit = build_model(KINDS["lit"], **overrides)
    inherit_weights(lit, teacher.state_dict(), default_exclude(teacher.config, lit.config))
    lit = lit.to(device).eval()
    cfg = teacher.config
    objective = build_objective("gaussian")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    g = torch.Generator().manual_seed(3)
    mask = torch.zeros(1, cfg.model_max_length, dtype=torch.bool, device=device)
    mask[:, : max(1, cfg.model_max_length // 3)] = True
    cond = {"text_emb": torch.randn(1, cfg.model_max_length, cfg.caption_channels, generator=g).to(device), "text_mask": mask}
    rows = []
    for res in resolutions:
        noise = torch.randn(1, cfg.in_channels, res // 8, res // 8, generator=g).to(device)

        def run(model: torch.nn.Module) -> Callable[[], None]:
            def fn() -> None:
                with autocast:
                    sample(model, objective, noise, cond, null_cond=model.null_condition(cond), cfg_scale=4.5,
                           steps=steps, method="ddim")
                if device.type == "cuda":
                    torch.cuda.synchronize(device)

            return fn

        t = time_interleaved({"teacher": run(teacher), "lit": run(lit)}, repeats, warmup=1)
        ms = {k: 1e3 * statistics.median(v) for k, v in t.items()}
        rows.append({"resolution": res, "tokens": (res // 8 // cfg.patch_size) ** 2, "steps": steps, **{f"{k}_ms": v for k, v in ms.items()},
                     "lit_speedup": ms["teacher"] / ms["lit"], "lit_speedup_paired": paired_ratio(t["teacher"], t["lit"])})
    return rows


def format_report(res: dict[str, Any]) -> str:
    w = res["width"]
    lines = [f"pixart benchmark: torch {res['torch']}, {res['device']} {res['dtype']}, {res['threads']} threads on "
             f"{res['cpus']} CPUs, quick={res['quick']}, load average before/after {res['load_before'][0]:.2f}/"
             f"{res['load_after'][0]:.2f}", "",
             f"one PixArt-Σ block, width {w} ({w // HEAD_DIM} heads of {HEAD_DIM}; PixArt-Σ-XL has {FULL_WIDTH}), caption "
             f"{TEXT_TOKENS} tokens ({PROMPT_TOKENS} real); LiT: 2 heads + DWC5; DyDiT: sliced, half of heads/groups/tokens",
             "  (median ms; speed-up = teacher / student, ratio of medians [paired: median of per-repeat ratios];",
             "   FLOPs ratio = analytic teacher / LiT block FLOPs at this width [at 1152]; DyDiT: realised fraction of",
             "   its block FLOPs and the ideal speed-up it implies)",
             f"{'tokens':>7}{'pass':>9}{'teacher':>10}{'LiT':>9}{'DyDiT':>9}{'LiT x':>14}{'DyDiT x':>14}"
             f"{'LiT FLOPs x':>18}{'DyDiT FLOPs':>17}"]
    for r in res["blocks"]:
        lines.append(
            f"{r['tokens']:>7}{r['pass']:>9}{r['teacher_ms']:>10.1f}{r['lit_ms']:>9.1f}{r['dydit_ms']:>9.1f}"
            f"{r['lit_speedup']:>7.2f} [{r['lit_speedup_paired']:.2f}]{r['dydit_speedup']:>7.2f} [{r['dydit_speedup_paired']:.2f}]"
            f"{r['lit_flops_ratio']:>9.2f} [{r['lit_flops_ratio_full_width']:.2f}]"
            f"{r['dydit_flops_fraction']:>8.2f} ({r['dydit_ideal_speedup']:.2f}x)")
    if res.get("sampling"):
        lines += ["", "whole-model sampling (DDIM, CFG 4.5, batch 1): teacher vs LiT"]
        for r in res["sampling"]:
            lines.append(f"{r['resolution']:>6}px {r['tokens']:>6} tokens {r['steps']:>3} steps: teacher {r['teacher_ms']:.0f} ms, "
                         f"LiT {r['lit_ms']:.0f} ms, speed-up {r['lit_speedup']:.2f}x [{r['lit_speedup_paired']:.2f}]")
    if res["quick"]:
        lines.append("quick mode: tiny sizes, overhead-bound; the ratios mean nothing")
    return "\n".join(lines)


def run(quick: bool, width: int | None = None, device: str = "cpu", dtype: str = "fp32", sampling: bool = False) -> dict[str, Any]:
    dev = torch.device(device)
    width = width or (2 * HEAD_DIM if quick else 4 * HEAD_DIM)
    load_before = os.getloadavg()
    blocks = bench_blocks(QUICK_CASES if quick else DEFAULT_CASES, width, dev, dtype)
    samp = []
    if sampling:
        if quick:
            tiny = dict(depth=2, hidden_size=2 * HEAD_DIM, num_heads=2, caption_channels=32, model_max_length=8)
            samp = bench_sampling((64,), 2, tiny, dev, dtype, repeats=1)
        else:
            samp = bench_sampling((1024, 2048), 20, {}, dev, dtype, repeats=3)
    return {"suite": "pixart", "quick": quick, "width": width, "device": device, "dtype": dtype, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_before": list(load_before),
            "load_after": list(os.getloadavg()), "blocks": blocks, "sampling": samp}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.benchmark pixart", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print every number as one JSON object")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds): checks the suite runs, not speed")
    parser.add_argument("--width", type=int, default=None, help=f"block width, a multiple of {HEAD_DIM} (default 288; "
                        f"{FULL_WIDTH} is PixArt-Σ's, for a GPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast (Triton kernels on CUDA)")
    parser.add_argument("--sampling", action="store_true", help="also time whole-model sampling at 1024² and 2048² (GPU)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's default)")
    args = parser.parse_args(argv)
    if args.width is not None and (args.width % HEAD_DIM or args.width < 2 * HEAD_DIM):
        parser.error(f"--width must be a multiple of {HEAD_DIM} of at least {2 * HEAD_DIM}")
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    start = time.perf_counter()
    res = run(args.quick, args.width, args.device, args.dtype, args.sampling)
    res["seconds"] = time.perf_counter() - start
    print(json.dumps(res, indent=2) if args.json else format_report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
