"""Triton kernels vs their PyTorch references, run by Triton's interpreter on the CPU.

TRITON_INTERPRET=1 is set below, at import, before anything here imports Triton: Triton decides
between compiling and interpreting when a kernel is *defined*, i.e. when models.kernels'
kernel modules are first imported, and pytest imports every test module before running any
test. (tests/conftest.py is shared and does not set it; this module does, for itself.)

What is compared: the kernel's output and gradients, and the reference's, both against the
reference evaluated in float64 on the same (rounded) inputs, as max|err| / max|truth|:
  fp32  ≤ 5e-6: fp32's unit roundoff is 6e-8; the sums run over ≤ 300 terms in another order
        (observed ≤ 3.5e-7).
  fp16  ≤ 2e-3: fp16's unit roundoff is 4.9e-4, so rounding the result alone costs up to one
        ulp (≤ 9.8e-4 of max|truth|); gradients also go through the fp16 output saved for the
        backward (delta = rowsum(dO ⊙ out)): a few ulps at most (observed ≤ 6e-4).
bf16 is not tested here: the interpreter computes it wrongly (see shared/deps.md).
Shapes avoid multiples of the blocks: N in 7…70, head dims 64/72/128/192/256/288.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import inspect  # noqa: E402
import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from models.kernels import adaln, dispatch, reference, token_routing, tuning  # noqa: E402
from models.kernels import linear_attention as la  # noqa: E402

TOL = {torch.float32: 5e-6, torch.float16: 2e-3}


def _err(actual: torch.Tensor, truth: torch.Tensor) -> float:
    return ((actual.double() - truth).abs().max() / truth.abs().max().clamp_min(1e-12)).item()


def _compare(op, ref_op, inputs, dtype, grad_seed=0):
    """Kernel vs float64 truth on outputs and on the gradients of every floating input."""
    leaves = [t.detach().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t for t in inputs]
    truth_leaves = [t.detach().double().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor)
                    and t.is_floating_point() else t for t in inputs]
    out = op(*leaves)
    truth = ref_op(*truth_leaves)
    assert out.dtype == ref_op(*leaves).dtype, "the kernel must return the reference's dtype"
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    diff = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    tdiff = [t for t in truth_leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(out, diff, g.to(out.dtype))
    tgrads = torch.autograd.grad(truth, tdiff, g)
    errs = [_err(out, truth)] + [_err(a, b) for a, b in zip(grads, tgrads)]
    for a, t in zip(grads, diff):
        assert a.dtype == t.dtype and a.shape == t.shape
    assert max(errs) <= TOL[dtype], f"scaled errors (out, grads...) {errs} over {TOL[dtype]}"
    return errs


def _qkv(b, h, n, d, dtype, nk=None, e=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    nk, e = nk or n, e or d
    return (torch.randn(b, h, n, d, generator=gen).to(dtype), torch.randn(b, h, nk, d, generator=gen).to(dtype),
            torch.randn(b, h, nk, e, generator=gen).to(dtype))


def test_interpreter_is_active():
    assert tuning.INTERPRET, "models.kernels was imported before TRITON_INTERPRET=1 was set"


# ---- linear attention -------------------------------------------------------------------------

LA_CASES = [  # (B, H, N, d, dtype): registry head dims, 1–4 heads, N off the blocks
    (2, 1, 7, 64, torch.float32),
    (1, 2, 33, 72, torch.float32),
    (1, 2, 70, 192, torch.float32),   # LiT-S/2: 2 heads at width 384
    (1, 4, 19, 288, torch.float32),   # LiT-XL/2: 4 heads at width 1152
    (1, 1, 21, 128, torch.float32),
    (1, 3, 30, 256, torch.float32),   # LiT-B/2 (768/3) and L/2 (1024/4)
    (1, 2, 33, 192, torch.float16),
    (1, 4, 13, 288, torch.float16),
    (2, 1, 40, 72, torch.float16),
]


@pytest.mark.parametrize("b,h,n,d,dtype", LA_CASES)
def test_linear_attention_matches_reference(b, h, n, d, dtype):
    _compare(la.linear_attention, reference.linear_attention, _qkv(b, h, n, d, dtype), dtype)


@pytest.mark.slow
@pytest.mark.parametrize("b,h,n,d,dtype", [
    (1, 3, 45, 256, torch.float16), (1, 4, 37, 256, torch.float16), (2, 4, 70, 288, torch.float16),
    (2, 2, 70, 192, torch.float32), (2, 4, 61, 288, torch.float32),
])
def test_linear_attention_matches_reference_slow(b, h, n, d, dtype):
    _compare(la.linear_attention, reference.linear_attention, _qkv(b, h, n, d, dtype), dtype)


def test_linear_attention_cross_lengths_and_value_dim():
    q, k, v = _qkv(2, 2, 20, 72, torch.float32, nk=33, e=40)
    _compare(lambda q, k, v: la.linear_attention(q, k, v, 1e-3),
             lambda q, k, v: reference.linear_attention(q, k, v, 1e-3), (q, k, v), torch.float32)


def test_linear_attention_split_n_partials(monkeypatch):
    """The GPU splits N over programs when B·H is small; force it (16 rows a split) and compare."""
    monkeypatch.setattr(tuning, "INTERPRET_SPLIT_ROWS", 16)
    _compare(la.linear_attention, reference.linear_attention, _qkv(1, 2, 50, 72, torch.float32), torch.float32)


def test_linear_attention_small_blocks(monkeypatch):
    """16-wide blocks: several head-dim tiles with a remainder, several N blocks inside each loop."""
    for kern in (la._STATE, la._OUT, la._DQ, la._DKDV):
        monkeypatch.setattr(kern, "interpret_meta", {k: 16 for k in kern.interpret_meta})
    _compare(la.linear_attention, reference.linear_attention, _qkv(1, 2, 37, 40, torch.float32), torch.float32)


def test_linear_attention_gpu_autotune_path(monkeypatch):
    """The GPU launch path: every autotuning config (pruned as on the GPU) runs, the kernels are
    re-run per config as the autotuner does, and the chosen one must still give the right answer."""
    def run_once(kernel_call, quantiles=None):
        kernel_call()
        return [1.0, 1.0, 1.0]

    for kern in (la._STATE, la._OUT, la._DQ, la._DKDV):
        monkeypatch.setattr(kern, "tuned", kern.autotuner(do_bench=run_once))
    _compare(la.linear_attention, reference.linear_attention, _qkv(1, 1, 70, 72, torch.float32), torch.float32)
    assert la._OUT.tuned.cache, "the autotuner did not run"


def test_linear_attention_strided_inputs_and_grad():
    """q, k, v as the model slices them out of one qkv projection: (B, N, 3, H, d) permuted."""
    qkv = torch.randn(2, 23, 3, 2, 72)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    _compare(la.linear_attention, reference.linear_attention, (q, k, v), torch.float32)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = la.linear_attention(q, k, v)
    g = torch.randn(2, 23, 2, 72).transpose(1, 2)  # a non-contiguous upstream gradient
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(reference.linear_attention(q, k, v), (q, k, v), g)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_linear_attention_dead_features_and_mixed_dtypes():
    """All-negative queries (den = eps, output 0) stay finite; mixed dtypes return v's dtype."""
    q, k, v = _qkv(1, 2, 17, 64, torch.float32)
    q[:, :, :5] = -q[:, :, :5].abs()
    k[..., :8] = -k[..., :8].abs()  # features no key activates: z = 0 there
    _compare(la.linear_attention, reference.linear_attention, (q, k, v), torch.float32)
    out = la.linear_attention(q, k.half(), v.half())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, reference.linear_attention(q, k.half(), v.half()), rtol=2e-3, atol=2e-3)


# ---- adaLN ------------------------------------------------------------------------------------

def _adaln_inputs(b, n, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(b, n, d, generator=gen) + 1).to(dtype)
    params = torch.randn(b, 6 * d, generator=gen).to(dtype)  # the adaLN projection, chunked as DiT does
    return x, params.chunk(6, dim=1)


@pytest.mark.parametrize("b,n,d,dtype", [(3, 37, 72, torch.float32), (2, 19, 384, torch.float32),
                                         (2, 45, 384, torch.float16), (1, 9, 1152, torch.float32)])
def test_modulate_layernorm_matches_reference(b, n, d, dtype):
    x, (shift, scale, *_) = _adaln_inputs(b, n, d, dtype)
    assert b == 1 or not shift.is_contiguous()
    _compare(adaln.modulate_layernorm, reference.modulate_layernorm, (x, shift, scale), dtype)


@pytest.mark.parametrize("b,n,d,dtype", [(3, 37, 72, torch.float32), (2, 45, 384, torch.float16)])
def test_gated_residual_matches_reference(b, n, d, dtype):
    x, (_, _, gate, *_) = _adaln_inputs(b, n, d, dtype)
    y = torch.randn(b, n, d).to(dtype)
    _compare(adaln.gated_residual, reference.gated_residual, (x, gate, y), dtype)


def test_adaln_row_partials_and_promotion(monkeypatch):
    """Several programs per sample (8-row chunks) for dshift/dscale/dgate; fp32 x with fp16 params."""
    monkeypatch.setattr(tuning, "INTERPRET_SPLIT_ROWS", 8)
    x, (shift, scale, gate, *_) = _adaln_inputs(2, 29, 72, torch.float32)
    _compare(adaln.modulate_layernorm, reference.modulate_layernorm, (x, shift, scale), torch.float32)
    _compare(adaln.gated_residual, reference.gated_residual, (x, gate, torch.randn(2, 29, 72)), torch.float32)
    out = adaln.gated_residual(x, gate.half(), torch.randn(2, 29, 72).half())
    assert out.dtype == torch.float32


# ---- token routing ----------------------------------------------------------------------------

def _routing_inputs(b, n, d, dtype, index):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(b, n, d, generator=gen).to(dtype)
    y = torch.randn(index.numel(), d, generator=gen).to(dtype)
    gate = torch.randn(b, d, generator=gen).to(dtype)
    return x, y, gate


ROUTES = {
    # sorted, unique (what a routing mask's nonzero() gives); row blocks of 32 both inside one
    # sample and straddling two, which take different dgate paths in the backward kernel
    "mask": lambda b, n: (torch.rand(b * n, generator=torch.Generator().manual_seed(2)) < 0.6).nonzero()[:, 0],
    "all": lambda b, n: torch.arange(b * n),
    "repeats": lambda b, n: torch.randint(0, b * n, (b * n // 2,), generator=torch.Generator().manual_seed(3)),
}


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scatter_add_tokens_matches_reference(route, dtype):
    index = ROUTES[route](2, 40)
    x, y, gate = _routing_inputs(2, 40, 72, dtype, index)
    _compare(lambda x, y, g: token_routing.scatter_add_tokens(x, index, y, g),
             lambda x, y, g: reference.scatter_add_tokens(x, index, y, g), (x, y, gate), dtype)
    _compare(lambda x, y: token_routing.scatter_add_tokens(x, index, y),
             lambda x, y: reference.scatter_add_tokens(x, index, y), (x, y), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gather_tokens_matches_reference(dtype):
    index = ROUTES["repeats"](3, 30)
    x = torch.randn(3, 30, 300).to(dtype)
    _compare(lambda x: token_routing.gather_tokens(x, index), lambda x: reference.gather_tokens(x, index), (x,), dtype)


# ---- benchmark --------------------------------------------------------------------------------

def test_benchmark_cpu_run_prints_reference_table(monkeypatch, capsys):
    """Without CUDA: reference and SDPA rows only, each timing its own impl (operator-count clock, see below)."""
    from launch.benchmarks import kernels as bench
    from tests.bench_clocks import OpCountMode, install, op_count

    clock = OpCountMode()
    install(monkeypatch, bench, clock)
    with clock:
        assert bench.main(["--json", "--res", "64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {r["impl"] for r in report["rows"]} == {"reference", "sdpa"} and report["bars"]["measured"] is False
    work = {}
    for op, _, inputs, impls in bench.cases(bench.CPU_RES_BATCH[64], bench.tokens(64), torch.device("cpu"), torch.float32, None):
        for impl, fn in impls.items():
            work[op, impl] = op_count(bench.fwd_bwd(fn, inputs, torch.randn_like(fn(*inputs).detach())))
    assert {(r["op"], r["impl"]): r["ms"] for r in report["rows"]} == {k: 1e3 * v for k, v in work.items()}


def test_benchmark_triton_rows_ratios_and_bars(monkeypatch, capsys):
    """The GPU-only code paths, run on the interpreter at toy sizes: Triton rows with their error
    checks, the ratios, and the bars (on made-up 2048² rows).

    `time_ms` runs as it is, on an operator-count clock (tests/bench_clocks.py: `perf_counter` reads
    how many operators reached the dispatcher, a fused custom op counting once): each row's median
    must be 1000 × the operators of one forward+backward of that very impl, counted here on the
    same cases built afresh, so a row that timed another impl, or a ratio of the wrong rows, shows."""
    from launch.benchmarks import kernels as bench
    from tests.bench_clocks import OpCountMode, install, op_count

    tri = {"linear_attention": la, "adaln": adaln, "token_routing": token_routing}
    heads = (("linear_attention LiT-S", 2, 24),)
    clock = OpCountMode()
    install(monkeypatch, bench, clock)
    with clock:
        rows = bench.measure({64: 1}, torch.device("cpu"), torch.float32, tri, heads=heads, width=40)
    assert not [r.note for r in rows if r.note], "a case failed"
    assert not bench.mismatches(rows, torch.float32)
    tri_rows = [r for r in rows if r.impl == "triton"]
    assert len(tri_rows) == 5 and all(r.err is not None and r.err < 1e-5 for r in tri_rows)
    work = {}
    for op, _, inputs, impls in bench.cases(1, bench.tokens(64), torch.device("cpu"), torch.float32, tri, heads=heads, width=40):
        for impl, fn in impls.items():
            grad = torch.randn_like(fn(*inputs).detach())
            work[op, impl] = op_count(bench.fwd_bwd(fn, inputs, grad))
    assert {(r.op, r.impl): r.ms for r in rows} == {k: 1e3 * v for k, v in work.items()}
    ratio_rows = bench.ratios(rows)
    assert {q["op"] for q in ratio_rows} == {r.op for r in tri_rows}
    for q in ratio_rows:
        assert q["speedup_vs_reference"] == work[q["op"], "reference"] / work[q["op"], "triton"], q
    la_ratio = next(q for q in ratio_rows if q["op"] == "linear_attention LiT-S")
    assert la_ratio["speedup_vs_reference"] > 1  # one fused op each way against the reference's many
    assert la_ratio["speedup_vs_sdpa"] == work["softmax SDPA DiT-S", "sdpa"] / work["linear_attention LiT-S", "triton"]

    def row(op, impl, ms, mib):
        return bench.Row(op, impl, 2048, 16384, 2, "", "bfloat16", ms=ms, peak_mib=mib)

    made_up = [row("linear_attention LiT-S", "reference", 3.0, 1000.0), row("linear_attention LiT-S", "triton", 1.0, 500.0),
               row("softmax SDPA DiT-S", "sdpa", 8.0, 100.0)]
    bar = bench.bars(bench.ratios(made_up))
    assert bar["speedup_vs_reference"]["pass"] and bar["peak_memory_vs_reference"]["pass"]
    assert not bar["speedup_vs_sdpa"]["pass"] and bar["speedup_vs_sdpa"]["value"] == 8.0
    bench.print_report({"device": "toy"}, rows + made_up, ratio_rows + bench.ratios(made_up), bar, ["a note"])
    printed = capsys.readouterr().out
    assert "speedup_vs_sdpa 8.00 (≥9.0: FAIL)" in printed and "speedup_vs_reference 3.00 (≥2.0: PASS)" in printed


def test_gpu_check_sweep_runs_interpreted(monkeypatch, capsys):
    """`--check`'s code on toy shapes (interpreted, fp32/fp16): every config alone, then autotuned."""
    from launch.benchmarks import kernels_check as check

    monkeypatch.setattr(check, "DTYPES", (torch.float32, torch.float16))
    monkeypatch.setattr(check, "SWEEP_SHAPES", [(1, 1, 20, 40)])
    monkeypatch.setattr(check, "LA_SHAPES", [(1, 2, 9, 24)])
    monkeypatch.setattr(check, "CROSS_SHAPES", ((7, 24), (11, 24), (11, 40)))
    monkeypatch.setattr(check, "ROW_SHAPES", [(2, 9, 40)])
    failures = check.check_linear_attention(torch.device("cpu")) + check.check_adaln_and_routing(torch.device("cpu"))
    printed = capsys.readouterr().out
    assert failures == 0, printed
    assert printed.count("config ") == 2 * max(len(k.configs) for k in (la._STATE, la._OUT, la._DQ, la._DKDV))
    assert la._OUT.tuned is None, "the sweep must restore the interpreter launch path"


# ---- dispatcher -------------------------------------------------------------------------------

def test_dispatch_triton_mode_returns_triton_ops_with_reference_signatures():
    ops = dispatch.get_ops("triton", "cpu")
    assert ops.name == "triton" and ops is dispatch.get_ops("auto", "cuda")
    assert dispatch.get_ops("auto", "cpu") is dispatch.REFERENCE_OPS
    for field in ("linear_attention", "modulate_layernorm", "gated_residual", "gather_tokens", "scatter_add_tokens"):
        ours, ref = inspect.signature(getattr(ops, field)), inspect.signature(getattr(reference, field))
        assert list(ours.parameters) == list(ref.parameters), field
        assert [p.default for p in ours.parameters.values()] == [p.default for p in ref.parameters.values()], field


def test_ops_trace_into_one_graph_under_torch_compile():
    """torch.compile around the Triton ops (trainer.compile with kernels: triton): no graph break."""
    ops = dispatch.get_ops("triton", "cpu")
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 9, 16, torch.float32))
    x, (shift, scale, *_) = _adaln_inputs(2, 5, 16, torch.float32)

    def f(q, k, v, x, shift, scale):
        return ops.linear_attention(q, k, v).square().sum() + ops.modulate_layernorm(x, shift, scale).square().sum()

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, x, shift, scale)
    want = f(q, k, v, x, shift, scale)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (q, k)), torch.autograd.grad(want, (q, k))):
        torch.testing.assert_close(a, b)


def _op_cases():
    """Every custom op with inputs as the model passes them (strided params, a gate, repeated rows)."""
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 11, 24, torch.float32, nk=13, e=16))
    x, (shift, scale, gate, *_) = _adaln_inputs(2, 11, 24, torch.float32)
    x.requires_grad_()
    y = torch.randn(2, 11, 24, requires_grad=True)
    index = torch.tensor([0, 3, 4, 4, 12, 21])
    rows = torch.randn(6, 24, requires_grad=True)
    la_out = torch.ops.ditill.linear_attention_fwd(q, k, v, 1e-6)
    ln_out = torch.ops.ditill.modulate_layernorm_fwd(x, shift, scale, 1e-6, torch.float32)
    dout = torch.randn(2, 11, 24)
    return [
        ("linear_attention_fwd", (q, k, v, 1e-6)),
        ("linear_attention_bwd", (*(t.detach() for t in (q, k, v, *la_out)), torch.randn(1, 2, 11, 16))),
        ("modulate_layernorm_fwd", (x, shift.requires_grad_(), scale.requires_grad_(), 1e-6, torch.float32)),
        ("modulate_layernorm_bwd", (x.detach(), scale.detach(), dout, *(t.detach() for t in ln_out[1:]))),
        ("gated_residual_fwd", (x, gate.requires_grad_(), y, torch.float32)),
        ("gated_residual_bwd", (dout, gate.detach(), y.detach())),
        ("gather_tokens", (x, index)),
        ("gather_tokens_bwd", (rows.detach(), index, 2, 11)),
        ("scatter_add_tokens", (x, index, rows, gate)),
        ("scatter_add_tokens", (x, index, rows, None)),
        ("scatter_add_tokens_bwd", (dout, index, rows.detach(), gate.detach())),
    ]


def test_custom_ops_fake_and_autograd_registrations_agree_with_the_kernels():
    """torch.library.opcheck: the fake implementation gives the real outputs' shapes, dtypes and strides,
    autograd is registered (the backward ops are first order: called without grad), and each op traces
    through AOT autograd with dynamic shapes."""
    for name, args in _op_cases():
        torch.library.opcheck(getattr(torch.ops.ditill, name).default, args)


def test_flop_counter_counts_the_linear_attention_ops_as_the_reference_matmuls():
    """FlopCounterMode cannot see into a custom op: the registered formulas give what it counts for the
    reference (its matmuls), forward and backward, so FLOPs measured with kernels: triton stay right."""
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v = (t.requires_grad_() for t in _qkv(2, 2, 9, 16, torch.float32, nk=11, e=8))
    counts = []
    for op in (la.linear_attention, reference.linear_attention):
        with FlopCounterMode(display=False) as counter:
            with torch.no_grad():
                op(q, k, v)
            forward = counter.get_total_flops()
            op(q, k, v).sum().backward()
        counts.append((forward, counter.get_total_flops() - forward))
    assert counts[0] == counts[1] and counts[1][0] == 2 * 2 * 2 * 16 * (8 * (9 + 11) + 9)  # + the normaliser φ(q)·z


def test_dispatched_ops_agree():
    """One call of every op through both op sets, as a model would make them."""
    tri, ref = dispatch.get_ops("triton", "cpu"), dispatch.REFERENCE_OPS
    q, k, v = _qkv(1, 2, 11, 64, torch.float32)
    x, (shift, scale, gate, *_) = _adaln_inputs(2, 11, 64, torch.float32)
    index = torch.tensor([0, 3, 4, 12, 21])
    y = torch.randn(5, 64)
    for name, args in [("linear_attention", (q, k, v)), ("modulate_layernorm", (x, shift, scale)),
                       ("gated_residual", (x, gate, x)), ("gather_tokens", (x, index)),
                       ("scatter_add_tokens", (x, index, y, gate))]:
        torch.testing.assert_close(getattr(tri, name)(*args), getattr(ref, name)(*args), rtol=1e-5, atol=1e-5)
