"""`python -m launch.benchmark flux [--json] [--quick] [--width W] [--repeats R]`: FLUX blocks, teacher vs students.

One double-stream block followed by one single-stream block (the two kinds FLUX stacks 19 + 38 of)
at the token counts of a 1024² image (4096 image + 512 text tokens) and a 2048² one (16384 + 512),
batch 1, side by side in one process with the candidates interleaved (models benchmark's timing):

- teacher: FLUX's blocks (softmax joint attention with RoPE);
- DyFLUX sliced: the same weights with routers driven to about half the blocks' attention + MLP
  FLOPs (half the heads, 3 of 4 MLP channel groups, 3/4 of the image tokens routed; the realised
  ratio is printed) — the inference path, also timed with autograd through the sliced weights;
- DyFLUX masked: the training path at the same routing (every unit computed, masks multiplied);
- LiT-FLUX: joint ReLU linear attention with RoPE in the numerator and the 5×5 DWC on image tokens.

Forward only (inference mode) and forward + backward (gradients w.r.t. the block inputs and weights).
On a CPU the blocks run at reduced width (default 256 = 4 heads of 64, MLP 1024, RoPE axes 8/28/28),
so attention weighs more against the projections than at FLUX's 3072. On a GPU:
`--device cuda --dtype bf16 --width 3072 --peak-tflops 989` adds each candidate's peak memory (one
separate call) and MFU (analytic multiply-adds ×2, ×3 with backward, over time and the peak).
Times are medians; speed-ups are per-repeat paired ratios against the teacher. The numbers are for
the machine they ran on only.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch

from launch.benchmarks.models import paired_ratio, time_interleaved
from models import model_config
from models.flux_blocks import DoubleStreamBlock, SingleStreamBlock
from models.flux_flops import block_costs
from models.inherit import default_exclude, inherit_weights

TEXT_TOKENS = 512
RESOLUTIONS = {"1024²": (64, 64), "2048²": (128, 128)}  # image-token grids (8× VAE, 2×2 patches)
QUICK_RESOLUTIONS = {"64²": (4, 4), "128²": (8, 8)}
HEAD_FRACTION, GROUPS_ON, TOKEN_KEEP = 0.5, 3, 0.75  # of the heads, of 4 channel groups, of the image tokens


@dataclass(frozen=True)
class Setup:
    width: int
    text: int
    repeats: int
    resolutions: dict[str, tuple[int, int]]
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    peak_tflops: float | None = None  # the device's dense peak in the dtype, for MFU


def configs(width: int, text: int):
    """Teacher, DyFLUX and LiT-FLUX configs of one double + one single block at `width` (heads of 64)."""
    base = dict(hidden_size=width, num_heads=width // 64, depth=1, depth_single=1, axes_dim=[8, 28, 28], text_len=text)
    return (model_config("flux-dev", **base), model_config("dyflux-dev", mlp_groups=4, **base),
            model_config("lit-flux-dev", **base))


class Pair(torch.nn.Module):
    """A double block then a single block on [text; image], as FLUX chains them."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.double_block, self.single_block = DoubleStreamBlock(cfg, 0), SingleStreamBlock(cfg, 1)

    def forward(self, img, txt, vec, grid, mode):
        img, txt, e1 = self.double_block(img, txt, vec, vec, grid, mode)
        x, e2 = self.single_block(torch.cat([txt, img], dim=1), vec, vec, txt.shape[1], grid, mode)
        return x, (e1, e2)


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "_rate." not in name and "token_selection" not in name:
                p.add_(torch.randn(p.shape, generator=g) * std)


def drive_routers_(pair: Pair, img, txt, vec, grid) -> None:
    """The first half of the heads and GROUPS_ON groups on for every t; each token router's bias at the quantile
    of its own logits that keeps TOKEN_KEEP of the image tokens it sees (one calibration pass)."""

    def calibrate(module, args) -> None:
        module.router.bias.zero_()
        logits = module.logits(*args[:3]).flatten()
        module.router.bias.fill_(-float(torch.quantile(logits, 1.0 - TOKEN_KEEP)) + 1e-4)

    with torch.no_grad():
        handles = []
        for block in (pair.double_block, pair.single_block):
            heads_on = max(1, round(HEAD_FRACTION * block.attn_rate.num_units))
            for name, on in (("attn_rate", heads_on), *((n, GROUPS_ON) for n in block.mlp_routers)):
                r = getattr(block, name).router
                r.weight.zero_()
                r.bias.copy_(torch.where(torch.arange(r.bias.numel()) < on - 1, 10.0, -10.0))
            handles.append(block.token_selection.register_forward_pre_hook(calibrate))
        pair.eval()
        pair(img, txt, vec, grid, "masked")
    for h in handles:
        h.remove()


def realised_ratio(cfg, extras, n_img: int, n_txt: int) -> float:
    """The pair's realised / static attention + MLP multiply-adds (DyDiT's convention) from its masks."""
    c = block_costs(cfg, n_img, n_txt)
    e1, e2 = extras
    h1, h2 = float(e1["head"].mean()), float(e2["head"].mean())
    k1, k2 = float(e1["token"].mean()), float(e2["token"].mean())
    run = (n_txt + k2 * n_img) / (n_txt + n_img)
    real = (h1 * c.double_attn + float(e1["img_channel"].mean()) * k1 * c.double_img_mlp
            + float(e1["txt_channel"].mean()) * c.double_txt_mlp
            + h2 * c.single_attn_in + h2 * run * c.single_attn_out + float(e2["channel"].mean()) * run * c.single_mlp)
    static = c.double_attn + c.double_img_mlp + c.double_txt_mlp + c.single_attn_in + c.single_attn_out + c.single_mlp
    return real / static


def pair_macs(cfg, n_img: int, n_txt: int, ratio: float = 1.0) -> float:
    """Forward multiply-adds of the pair: attention + MLP (times a realised `ratio`), modulation, routers."""
    c = block_costs(cfg, n_img, n_txt)
    units = c.double_attn + c.double_img_mlp + c.double_txt_mlp + c.single_attn_in + c.single_attn_out + c.single_mlp
    return ratio * units + c.double_adaln + c.single_adaln + c.double_routers + c.single_routers


def attention_flops_ratio(teacher_cfg, lit_cfg, n_img: int, n_txt: int) -> float:
    return pair_macs(teacher_cfg, n_img, n_txt) / pair_macs(lit_cfg, n_img, n_txt)


def synced(fn: Callable[[], Any], device: str) -> Callable[[], Any]:
    if not device.startswith("cuda"):
        return fn

    def run() -> Any:
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


def peak_memory(fn: Callable[[], Any], device: str) -> float | None:
    """Bytes one call allocates above what was allocated before it (CUDA); None elsewhere."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - base)


def bench_resolution(setup: Setup, label: str, grid: tuple[int, int]) -> dict[str, Any]:
    teacher_cfg, dy_cfg, lit_cfg = configs(setup.width, setup.text)
    torch.manual_seed(0)
    teacher = Pair(teacher_cfg)
    randomize_(teacher)
    dy, lit = Pair(dy_cfg), Pair(lit_cfg)
    inherit_weights(dy, teacher.state_dict())
    inherit_weights(lit, teacher.state_dict(), default_exclude(teacher_cfg, lit_cfg))
    for m in (teacher, dy, lit):
        m.eval().to(setup.device, setup.dtype)
    n_img = grid[0] * grid[1]
    g = torch.Generator().manual_seed(1)
    img, txt, vec = (torch.randn(*shape, generator=g).to(setup.device, setup.dtype)
                     for shape in ((1, n_img, setup.width), (1, setup.text, setup.width), (1, setup.width)))
    drive_routers_(dy, img, txt, vec, grid)
    with torch.no_grad():
        _, extras = dy(img, txt, vec, grid, "sliced")
    ratio = realised_ratio(dy_cfg, extras, n_img, setup.text)

    def fwd(model: Pair, mode: str) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode():
                return model(img, txt, vec, grid, mode)
        return run

    def fwd_bwd(model: Pair, mode: str) -> Callable[[], Any]:
        a, b = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)

        def run() -> None:
            model.zero_grad(set_to_none=True)
            a.grad = b.grad = None
            out, _ = model(a, b, vec, grid, mode)
            out.float().pow(2).mean().backward()
        return run

    rows: dict[str, Any] = {"resolution": label, "image_tokens": n_img, "text_tokens": setup.text,
                            "dyflux_flops_ratio": ratio,
                            "lit_flops_speedup": attention_flops_ratio(teacher_cfg, lit_cfg, n_img, setup.text)}
    macs = {"teacher": pair_macs(teacher_cfg, n_img, setup.text), "dyflux_sliced": pair_macs(dy_cfg, n_img, setup.text, ratio),
            "dyflux_masked": pair_macs(dy_cfg, n_img, setup.text), "lit": pair_macs(lit_cfg, n_img, setup.text)}
    for kind, make, passes in (("forward", fwd, 1), ("forward_backward", fwd_bwd, 3)):
        fns = {name: synced(f, setup.device) for name, f in (
            ("teacher", make(teacher, "static")), ("dyflux_sliced", make(dy, "sliced")),
            ("dyflux_masked", make(dy, "masked")), ("lit", make(lit, "static")))}
        times = time_interleaved(fns, setup.repeats, warmup=1)
        rows[kind] = {}
        for name, t in times.items():
            ms = 1e3 * statistics.median(t)
            flops = 2 * passes * macs[name]
            rows[kind][name] = {"ms": ms, "all_ms": [1e3 * v for v in t], "speedup": paired_ratio(times["teacher"], t),
                                "tflops": flops / (ms / 1e3) / 1e12, "peak_bytes": peak_memory(fns[name], setup.device),
                                "mfu": flops / (ms / 1e3) / (setup.peak_tflops * 1e12) if setup.peak_tflops else None}
    return rows


def run(setup: Setup) -> dict[str, Any]:
    load = os.getloadavg()
    results = [bench_resolution(setup, label, grid) for label, grid in setup.resolutions.items()]
    return {"suite": "flux", "width": setup.width, "heads": configs(setup.width, setup.text)[0].num_heads,
            "device": setup.device, "dtype": str(setup.dtype).replace("torch.", ""),
            "repeats": setup.repeats, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "load_before": list(load), "load_after": list(os.getloadavg()), "results": results}


def format_report(res: dict[str, Any]) -> str:
    lines = [f"FLUX blocks benchmark (one double + one single block, batch 1): width {res['width']} "
             f"({res['heads']} heads of {res['width'] // res['heads']}), {res['device']} {res['dtype']}, torch {res['torch']}, "
             f"{res['threads']} threads on "
             f"{res['cpus']} CPUs, median of {res['repeats']}, load average {res['load_before'][0]:.2f}/{res['load_after'][0]:.2f}",
             "speed-up = paired per-repeat ratio teacher / candidate", ""]
    for r in res["results"]:
        lines.append(f"{r['resolution']}: {r['image_tokens']} image + {r['text_tokens']} text tokens; DyFLUX realised "
                     f"attn+MLP FLOPs ratio {r['dyflux_flops_ratio']:.3f}; LiT analytic FLOPs speed-up "
                     f"{r['lit_flops_speedup']:.2f}x")
        lines.append(f"  {'':<16}{'forward ms':>12}{'speed-up':>10}{'fwd+bwd ms':>14}{'speed-up':>10}{'TFLOP/s fwd/bwd':>18}"
                     + (f"{'MFU':>12}{'peak GiB':>16}" if res["device"].startswith("cuda") else ""))
        for name in ("teacher", "dyflux_sliced", "dyflux_masked", "lit"):
            f, b = r["forward"][name], r["forward_backward"][name]
            line = (f"  {name:<16}{f['ms']:>12.1f}{f['speedup']:>9.2f}x{b['ms']:>14.1f}{b['speedup']:>9.2f}x"
                    f"{f['tflops']:>10.3f}/{b['tflops']:<7.3f}")
            if res["device"].startswith("cuda"):
                mfu = "/".join("-" if x["mfu"] is None else f"{x['mfu']:.2f}" for x in (f, b))
                line += f"{mfu:>12}{f['peak_bytes'] / 2**30:>8.2f}/{b['peak_bytes'] / 2**30:<7.2f}"
            lines.append(line)
        lines.append("")
    lines.append("DyFLUX masked is the training path (every unit computed); sliced is inference (and sliced weights with autograd).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.benchmark flux", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print every number as one JSON object")
    parser.add_argument("--quick", action="store_true", help="tiny token counts (seconds): checks the suite runs")
    parser.add_argument("--width", type=int, default=256, help="hidden width (multiple of 64; FLUX: 3072)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per candidate (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (full width there: --width 3072 --dtype bf16)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="parameter and activation dtype")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak, for MFU (H100 bf16: 989)")
    args = parser.parse_args(argv)
    if args.width % 64 or args.width < 64:
        parser.error("--width must be a positive multiple of 64")
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available here")
    setup = Setup(width=args.width, text=16 if args.quick else TEXT_TOKENS, repeats=1 if args.quick else args.repeats,
                  resolutions=QUICK_RESOLUTIONS if args.quick else RESOLUTIONS, device=args.device,
                  dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32, peak_tflops=args.peak_tflops)
    res = run(setup)
    print(json.dumps(res, indent=2) if args.json else format_report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
