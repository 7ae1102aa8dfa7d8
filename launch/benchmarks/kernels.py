"""`python -m launch.benchmark kernels [--json] [--check] [--res 256,512,1024,2048] [--batch B]`.

Forward+backward time and peak memory of each fused kernel against its PyTorch reference, and of
LiT-S linear attention (2 heads × 192, width 384) against DiT-S softmax SDPA (6 × 64), at the
latent token counts of 256²…2048² images (VAE /8, patch 2: N = (res/16)²). On CUDA: bf16,
`triton.testing.do_bench` medians, and every Triton result is checked at the benchmark shape
against an fp32 evaluation of the reference (exit 1 on a mismatch). Without CUDA it still runs,
reference columns only, at tiny sizes: the Triton interpreter checks correctness, not speed.

`--check` runs instead the GPU correctness sweep of launch/benchmarks/kernels_check.py
(every autotuning config, odd shapes, fp32/fp16/bf16).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from models.kernels import dispatch, reference

# batch 8 everywhere (LiT measures at batch 8): at batch 2 and 16k tokens the fused kernel's ~0.5 ms
# of GPU work is hidden behind ~0.9 ms of launch overhead, which `--batch 2` shows
GPU_RES_BATCH = {256: 8, 512: 8, 1024: 8, 2048: 8}
CPU_RES_BATCH = {64: 2, 128: 2}
BARS = {"speedup_vs_reference": 2.0, "speedup_vs_sdpa": 9.0, "peak_memory_vs_reference": 0.6}
WIDTH_XL = 1152  # DiT-XL width, for the adaLN and routing kernels
LINEAR_HEADS = (("linear_attention LiT-S", 2, 192), ("linear_attention LiT-XL", 4, 288))  # (label, heads, head dim)
TOL = {torch.bfloat16: 3e-2, torch.float16: 4e-3, torch.float32: 1e-4}


def tokens(res: int) -> int:
    return (res // 16) ** 2


@dataclass
class Row:
    op: str
    impl: str
    res: int
    tokens: int
    batch: int
    shape: str
    dtype: str
    ms: float | None = None
    peak_mib: float | None = None
    err: float | None = None  # max|x − truth| / max|truth| over output and grads; truth = fp32 reference
    ref_err: float | None = None  # the same for the reference in the benchmark dtype
    note: str = ""


def _leaves(inputs: list) -> list[torch.Tensor]:
    return [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


def fwd_bwd(op: Callable, inputs: list, grad: torch.Tensor) -> Callable[[], None]:
    leaves = _leaves(inputs)

    def run() -> None:
        torch.autograd.grad(op(*inputs), leaves, grad)

    return run


def time_ms(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def peak_mib(fn: Callable[[], None], device: torch.device) -> float | None:
    """Peak memory fn allocates above what is live before it (inputs, upstream gradient)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def scaled_err(op: Callable, inputs: list, grad: torch.Tensor, truth: tuple[torch.Tensor, ...]) -> float:
    out = op(*inputs)
    got = (out, *torch.autograd.grad(out, _leaves(inputs), grad))
    return max(((a.float() - t).abs().max() / t.abs().max().clamp_min(1e-12)).item() for a, t in zip(got, truth))


def fp32_truth(ref: Callable, inputs: list, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    up = [t.detach().float().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) and t.is_floating_point()
          else t for t in inputs]
    out = ref(*up)
    return (out.detach(), *torch.autograd.grad(out, _leaves(up), grad.float()))


def _randn(*shape: int, device: torch.device, dtype: torch.dtype, grad: bool = True) -> torch.Tensor:
    return torch.randn(*shape, device=device).to(dtype).requires_grad_(grad)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def cases(
    b: int, n: int, device: torch.device, dtype: torch.dtype, tri, heads=LINEAR_HEADS, width: int = WIDTH_XL
) -> list[tuple]:
    """(op, shape, inputs, {impl: fn}) for one resolution; `tri` is the Triton op modules or None."""
    dev = dict(device=device, dtype=dtype)
    out = []
    for label, h, d in heads:
        impls = {"reference": reference.linear_attention}
        if tri:
            impls["triton"] = tri["linear_attention"].linear_attention
        out.append((label, f"{b}x{h}x{n}x{d}", [_randn(b, h, n, d, **dev) for _ in range(3)], impls))
    out.append(("softmax SDPA DiT-S", f"{b}x6x{n}x64", [_randn(b, 6, n, 64, **dev) for _ in range(3)], {"sdpa": _sdpa}))
    d = width
    x, p = _randn(b, n, d, **dev), [_randn(b, d, **dev) for _ in range(3)]
    for label, ref_fn, name, args in (
        ("modulate_layernorm", reference.modulate_layernorm, "modulate_layernorm", [x, p[0], p[1]]),
        ("gated_residual", reference.gated_residual, "gated_residual", [x, p[2], _randn(b, n, d, **dev)]),
    ):
        impls = {"reference": ref_fn}
        if tri:
            impls["triton"] = getattr(tri["adaln"], name)
        out.append((label, f"{b}x{n}x{d}", args, impls))
    keep = torch.rand(b * n, generator=torch.Generator().manual_seed(0)) < 0.5  # DyDiT-like: half the tokens
    index = keep.nonzero()[:, 0].to(device)
    m = index.numel()
    routed = _randn(m, d, **dev)
    for label, ref_fn, name, args in (
        ("gather_tokens", lambda x: reference.gather_tokens(x, index), "gather_tokens", [x]),
        ("scatter_add_tokens", lambda x, y, g: reference.scatter_add_tokens(x, index, y, g), "scatter_add_tokens",
         [x, routed, p[2]]),
    ):
        impls = {"reference": ref_fn}
        if tri:
            fn = getattr(tri["token_routing"], name)
            impls["triton"] = (lambda f: (lambda *a: f(a[0], index, *a[1:])))(fn)
        out.append((label, f"{b}x{n}x{d} keep {m}", args, impls))
    return out


def measure(res_batch: dict[int, int], device: torch.device, dtype: torch.dtype, tri, **case_args) -> list[Row]:
    rows = []
    for res, b in res_batch.items():
        n = tokens(res)
        for op, shape, inputs, impls in cases(b, n, device, dtype, tri, **case_args):
            ref_fn = impls.get("reference")
            grad = None
            truth = None
            for impl, fn in impls.items():
                row = Row(op, impl, res, n, b, shape, str(dtype).replace("torch.", ""))
                try:
                    if grad is None:
                        grad = torch.randn_like(fn(*inputs).detach())
                    run = fwd_bwd(fn, inputs, grad)
                    run()  # compile / autotune outside the timings
                    row.ms = time_ms(run, device)
                    row.peak_mib = peak_mib(run, device)
                    if impl == "triton":
                        truth = truth or fp32_truth(ref_fn, inputs, grad)
                        row.err = scaled_err(fn, inputs, grad, truth)
                        row.ref_err = scaled_err(ref_fn, inputs, grad, truth)
                except Exception as exc:  # an OOM or a kernel failure must not hide the other rows
                    row.note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
                rows.append(row)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            del inputs, grad, truth
    return rows


def ratios(rows: list[Row]) -> list[dict]:
    """Per (op, resolution): reference/triton time, SDPA/triton time, triton/reference peak memory."""
    by = {(r.op, r.impl, r.res): r for r in rows}
    out = []
    for r in rows:
        if r.impl != "triton" or r.ms is None:
            continue
        ref = by.get((r.op, "reference", r.res))
        item = {"op": r.op, "res": r.res, "tokens": r.tokens, "batch": r.batch}
        if ref and ref.ms:
            item["speedup_vs_reference"] = ref.ms / r.ms
        if ref and ref.peak_mib and r.peak_mib is not None:
            item["peak_memory_vs_reference"] = r.peak_mib / ref.peak_mib
        sdpa = by.get(("softmax SDPA DiT-S", "sdpa", r.res))
        if r.op == "linear_attention LiT-S" and sdpa and sdpa.ms:
            item["speedup_vs_sdpa"] = sdpa.ms / r.ms
        out.append(item)
    return out


def bars(ratio_rows: list[dict]) -> dict:
    at = [r for r in ratio_rows if r["op"] == "linear_attention LiT-S" and r["res"] == 2048]
    if not at:
        return {"measured": False, "why": "needs CUDA with Triton and --res including 2048"}
    got = at[0]
    result = {"measured": True}
    for key, bar in BARS.items():
        value = got.get(key)
        ok = value is not None and (value <= bar if key.startswith("peak") else value >= bar)
        result[key] = {"value": value, "bar": bar, "pass": ok}
    return result


def mismatches(rows: list[Row], dtype: torch.dtype) -> list[Row]:
    return [r for r in rows if r.err is not None and r.err > max(TOL[dtype], 2 * (r.ref_err or 0.0))]


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_report(header: dict, rows: list[Row], ratio_rows: list[dict], bar: dict, notes: list[str]) -> None:
    print("kernels benchmark: " + ", ".join(f"{k}={v}" for k, v in header.items()))
    print(f"{'op':26} {'impl':9} {'res':>5} {'N':>6} {'B':>2} {'ms':>9} {'peak MiB':>9} {'err':>8} {'ref err':>8}  note")
    for r in rows:
        print(f"{r.op:26} {r.impl:9} {r.res:>5} {r.tokens:>6} {r.batch:>2} {_fmt(r.ms, '9.3f')} "
              f"{_fmt(r.peak_mib, '9.1f')} {_fmt(r.err, '8.1e')} {_fmt(r.ref_err, '8.1e')}  {r.note}")
    if ratio_rows:
        print(f"\n{'ratios (triton)':26} {'res':>5} {'× faster than ref':>18} {'× faster than SDPA':>19} {'peak/ref':>9}")
        for q in ratio_rows:
            print(f"{q['op']:26} {q['res']:>5} {_fmt(q.get('speedup_vs_reference'), '18.2f')} "
                  f"{_fmt(q.get('speedup_vs_sdpa'), '19.2f')} {_fmt(q.get('peak_memory_vs_reference'), '9.2f')}")
    print("\nbars at 2048² (LiT-S linear attention): " + (
        ", ".join(f"{k} {v['value']:.2f} ({'≤' if k.startswith('peak') else '≥'}{v['bar']}: "
                  f"{'PASS' if v['pass'] else 'FAIL'})" if v["value"] is not None else f"{k} not measured"
                  for k, v in bar.items() if k != "measured") if bar["measured"] else f"not measured ({bar['why']})"))
    for note in notes:
        print("note: " + note)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.benchmark kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--check", action="store_true", help="GPU correctness sweep instead of timings")
    parser.add_argument("--res", default=None, help="comma-separated image sizes (default 256,512,1024,2048 on GPU)")
    parser.add_argument("--batch", type=int, default=None, help="one batch size for every resolution")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.check:
        from launch.benchmarks import kernels_check

        return kernels_check.main(device)
    use_triton = device.type == "cuda" and dispatch.triton_available()
    res_batch = dict(GPU_RES_BATCH if device.type == "cuda" else CPU_RES_BATCH)
    if args.res:
        res_batch = {int(r): res_batch.get(int(r), 1) for r in args.res.split(",")}
    if args.batch:
        res_batch = {r: args.batch for r in res_batch}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tri = None
    notes = []
    if use_triton:
        from models.kernels import adaln, linear_attention, token_routing

        tri = {"linear_attention": linear_attention, "adaln": adaln, "token_routing": token_routing}
    else:
        notes.append("no CUDA (or no Triton): reference columns only. The Triton kernels run on the CPU only "
                     "under TRITON_INTERPRET=1 (~250× slower than torch), which checks correctness, not speed: "
                     "pytest tests/test_kernels_triton.py")
    header = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": str(dtype).replace("torch.", ""), "batch_by_res": res_batch,
              "torch": torch.__version__, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny CPU sizes: more threads only add synchronisation (and noise)
    try:
        rows = measure(res_batch, device, dtype, tri)
    finally:
        torch.set_num_threads(threads)
    ratio_rows = ratios(rows)
    bar = bars(ratio_rows)
    gather = [q for q in ratio_rows if q["op"] == "gather_tokens" and "speedup_vs_reference" in q]
    if gather:
        notes.append("gather_tokens: TRITON_OPS uses the reference (index_select); the Triton gather measured "
                     + ", ".join(f"{q['speedup_vs_reference']:.2f}× at {q['res']}²" for q in gather)
                     + " (switch in models/kernels/triton_ops.py only if clearly > 1)")
    bad = mismatches(rows, dtype)
    if bad:
        notes.append("MISMATCH: " + ", ".join(f"{r.op} at {r.res}² err {r.err:.1e}" for r in bad))
    if args.json:
        json.dump({"header": header, "rows": [asdict(r) for r in rows], "ratios": ratio_rows, "bars": bar,
                   "notes": notes}, sys.stdout, indent=1, default=str)
        print()
    else:
        print_report(header, rows, ratio_rows, bar, notes)
    return 1 if bad else 0
