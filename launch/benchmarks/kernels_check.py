"""GPU correctness sweep of the Triton kernels: `python -m launch.benchmark kernels --check`.

pytest checks the kernels under Triton's interpreter, which neither compiles them nor runs their
GPU autotuning configs. This runs them compiled, on CUDA: linear attention once per autotuning
config (each config alone, so every one is compiled and checked) on odd shapes, then through the
normal autotuned path on the registry head dims, and the adaLN and routing kernels; all in
fp32/fp16/bf16 against the reference evaluated in float64. Returns the number of failures.
"""
from __future__ import annotations

import time

import torch

from models.kernels import reference

TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SWEEP_SHAPES = [(2, 2, 1000, 192), (1, 4, 257, 288)]  # every config, every dtype
LA_SHAPES = [(1, 1, 7, 64), (3, 1, 130, 72), (1, 2, 77, 128), (2, 2, 4099, 192), (2, 3, 33, 256), (1, 4, 500, 288)]
CROSS_SHAPES = ((300, 72), (1000, 72), (1000, 40))  # (rows, dim) of q, k, v: Nq ≠ Nk and E ≠ D
ROW_SHAPES = [(3, 1000, 1152), (2, 77, 384), (1, 5, 72)]  # (B, N, D) for adaLN and routing


def _errors(op, ref, inputs: list, seed: int = 0) -> tuple[float, float]:
    """(kernel, reference-in-the-same-dtype) max|err|/max|truth| over output and grads vs float64."""
    def grads(fn, xs):
        leaves = [x for x in xs if isinstance(x, torch.Tensor) and x.requires_grad]
        out = fn(*xs)
        g = torch.randn(out.shape, device=out.device, generator=torch.Generator(out.device).manual_seed(seed))
        return (out, *torch.autograd.grad(out, leaves, g.to(out.dtype)))

    truth = grads(ref, [x.detach().double().requires_grad_(x.requires_grad) if x.is_floating_point() else x
                        for x in inputs])

    def err(got):
        return max(((a.double() - t).abs().max() / t.abs().max().clamp_min(1e-12)).item() for a, t in zip(got, truth))

    return err(grads(op, inputs)), err(grads(ref, inputs))


def _report(name: str, dtype: torch.dtype, errs: tuple[float, float]) -> int:
    kernel, ref = errs
    ok = kernel <= max(TOL[dtype], 2 * ref)
    print(f"{'ok  ' if ok else 'FAIL'} {name:52} {str(dtype)[6:]:8} err {kernel:.2e} (reference {ref:.2e})", flush=True)
    return 0 if ok else 1


def _qkv(b, h, n, d, dtype, device):
    return [torch.randn(b, h, n, d, device=device).to(dtype).requires_grad_() for _ in range(3)]


def check_linear_attention(device: torch.device) -> int:
    from models.kernels import linear_attention as la

    kernels = (la._STATE, la._OUT, la._DQ, la._DKDV)
    tuned = [k.tuned for k in kernels]
    failures = 0
    try:
        for i in range(max(len(k.configs) for k in kernels)):
            for k in kernels:  # config i of each kernel alone (no benchmarking, no pruning)
                k.tuned = k.autotuner(configs=[k.configs[i % len(k.configs)]])
            for shape in SWEEP_SHAPES:
                for dtype in DTYPES:
                    errs = _errors(la.linear_attention, reference.linear_attention, _qkv(*shape, dtype, device))
                    failures += _report(f"linear_attention {shape} config {i}", dtype, errs)
    finally:
        for k, t in zip(kernels, tuned):
            k.tuned = t
    for shape in LA_SHAPES:
        for dtype in DTYPES:
            errs = _errors(la.linear_attention, reference.linear_attention, _qkv(*shape, dtype, device))
            failures += _report(f"linear_attention {shape} autotuned", dtype, errs)
    q, k, v = (torch.randn(2, 2, n, d, device=device).requires_grad_() for n, d in CROSS_SHAPES)
    failures += _report("linear_attention Nq≠Nk, E≠D", torch.float32,
                        _errors(la.linear_attention, reference.linear_attention, [q, k, v]))
    return failures


def check_adaln_and_routing(device: torch.device) -> int:
    from models.kernels import adaln, token_routing

    failures = 0
    for b, n, d in ROW_SHAPES:
        for dtype in DTYPES:
            x = (3 * torch.randn(b, n, d, device=device) + 1).to(dtype).requires_grad_()
            params = torch.randn(b, 6 * d, device=device).to(dtype).requires_grad_()
            shift, scale, gate = params.chunk(6, dim=1)[:3]
            y = torch.randn(b, n, d, device=device).to(dtype).requires_grad_()
            failures += _report(f"modulate_layernorm {(b, n, d)}", dtype,
                                _errors(adaln.modulate_layernorm, reference.modulate_layernorm, [x, shift, scale]))
            failures += _report(f"gated_residual {(b, n, d)}", dtype,
                                _errors(adaln.gated_residual, reference.gated_residual, [x, gate, y]))
            routes = {
                "mask": (torch.rand(b * n, device=device) < 0.5).nonzero()[:, 0],
                "repeats": torch.randint(0, b * n, (b * n // 2 + 1,), device=device),
            }
            for route, index in routes.items():
                r = torch.randn(index.numel(), d, device=device).to(dtype).requires_grad_()
                failures += _report(
                    f"scatter_add_tokens {(b, n, d)} {route}", dtype,
                    _errors(lambda x, r, g: token_routing.scatter_add_tokens(x, index, r, g),
                            lambda x, r, g: reference.scatter_add_tokens(x, index, r, g), [x, r, gate]))
                failures += _report(
                    f"gather_tokens {(b, n, d)} {route}", dtype,
                    _errors(lambda x: token_routing.gather_tokens(x, index),
                            lambda x: reference.gather_tokens(x, index), [x]))
    return failures


def main(device: torch.device) -> int:
    if device.type != "cuda":
        print("--check needs CUDA; on the CPU the kernels are checked by pytest tests/test_kernels_triton.py "
              "(TRITON_INTERPRET=1)")
        return 0
    t0 = time.time()
    failures = check_linear_attention(device) + check_adaln_and_routing(device)
    print(f"{failures} failure(s) in {time.time() - t0:.0f} s")
    return 1 if failures else 0
