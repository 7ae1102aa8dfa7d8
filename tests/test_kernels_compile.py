"""torch.compile (inductor, CPU) compiles LiT and DyLiT blocks around the fused kernels.

The Triton kernels (interpreted here: TRITON_INTERPRET=1 from conftest) and the CPU depth-wise
conv are torch.library custom ops with fake implementations and registered autograd, so Dynamo
traces through them as opaque calls: the training paths compile as one graph (`fullgraph=True`),
and the generated code calls our ops (it would not if they fell back to a graph break).

The sliced inference path decides on data (which heads, groups and tokens run: `nonzero`, and
`if mask.all()` branches) and keeps weight caches keyed on tensor versions; Dynamo breaks the graph
at each of those decisions by design (capture_dynamic_output_shape_ops / capture_scalar_outputs
remove none of them: the branches are Python `if`s on data). The test pins that every break is one
of those decisions, none in attention or the kernels, and that the compiled pieces match eager.

Tolerances: everything is fp32; inductor fuses elementwise work and reorders a few reductions,
so outputs and gradients differ from eager by float32 rounding, measured ≤ 2.5e-7 of each tensor's
largest magnitude on these shapes (fp32 unit roundoff 6e-8); 2e-6 of it is asserted.
"""
import re

import pytest

import torch
import torch._dynamo
import torch._inductor.config as inductor_config
from torch._inductor.utils import run_and_get_code

from tests.helpers import randomize_, tiny
from tests.test_models_dynamic import _route_partially

pytest.importorskip("triton")
REL = 2e-6
GRID = (4, 4)


@pytest.fixture(autouse=True)
def _inductor(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # compile afresh
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):  # the routers' Gumbel noise as in eager
        yield
    torch._dynamo.reset()


def _block(name: str, train: bool) -> torch.nn.Module:
    model = randomize_(tiny(name, depth=1, kernels="triton"), seed=1)
    if model.config.dynamic:
        _route_partially(model)  # heads, groups and tokens really switch off
    return model.blocks[0].train(train)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, n, d = 2, GRID[0] * GRID[1], 48
    return torch.randn(b, n, d, generator=g), torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)


def _forward_backward(fn, block, mode):
    """Output and gradients (input, every parameter) of `sum(out · w)` with a fixed router noise."""
    x, c, t_emb = _inputs()
    x.requires_grad_()
    torch.manual_seed(0)
    out, _ = fn(x, c, t_emb, GRID, mode)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    params = [p for p in block.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * weight).sum(), [x, *params], allow_unused=True)
    return [out, *grads]


def _assert_close(got, want, what):
    for i, (a, b) in enumerate(zip(got, want)):
        if b is None:
            assert a is None, f"{what}[{i}]"
            continue
        err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)
        assert err <= REL, f"{what}[{i}]: scaled error {err:.2e}"


@pytest.mark.parametrize("name,mode,ops", [
    ("lit-s/2", "static", ("linear_attention_fwd", "linear_attention_bwd", "modulate_layernorm_fwd",
                           "modulate_layernorm_bwd", "gated_residual_fwd", "gated_residual_bwd", "depthwise_conv2d_cpu")),
    ("dylit-s/2", "masked", ("linear_attention_fwd", "linear_attention_bwd", "modulate_layernorm_fwd",
                             "modulate_layernorm_bwd", "gated_residual_fwd", "gated_residual_bwd", "depthwise_conv2d_cpu")),
])
def test_training_block_compiles_as_one_graph_and_matches_eager(name, mode, ops):
    block = _block(name, train=True)
    want = _forward_backward(block, block, mode)
    compiled = torch.compile(block, backend="inductor", fullgraph=True)
    got, code = run_and_get_code(_forward_backward, compiled, block, mode)
    code = "\n".join(code)
    for op in ops:
        assert f"torch.ops.ditill.{op}.default" in code, f"{op} is not called by the compiled code"
    _assert_close(got, want, name)


def test_sliced_inference_breaks_only_at_routing_decisions_and_matches_eager():
    block = _block("dylit-s/2", train=False)
    x, c, t_emb = _inputs()
    with torch.no_grad():
        want, masks = block(x, c, t_emb, GRID, "sliced")
        assert 0 < masks["token"].mean() < 1 and masks["channel"].mean() < 1, "the routers must skip work"
        explained = torch._dynamo.explain(block)(x, c, t_emb, GRID, "sliced")
        # A break inside dynamo's resume function of an allowed place is still that place.
        places = {(b.user_stack[-1].filename.rsplit("/", 1)[-1],
                   re.sub(r"^torch_dynamo_resume_in_(\w+)_at_\d+$", r"\1", b.user_stack[-1].name))
                  for b in explained.break_reasons}
        assert places <= {("dynamic.py", "from_mask"), ("dynamic.py", "weights_version"), ("dynamic.py", "token_routed_residual")}, places
        torch._dynamo.reset()
        got, code = run_and_get_code(torch.compile(block, backend="inductor"), x, c, t_emb, GRID, "sliced")
    code = "\n".join(code)
    for op in ("linear_attention_fwd", "modulate_layernorm_fwd", "gated_residual_fwd", "scatter_add_tokens",
               "depthwise_conv2d_cpu"):
        assert f"torch.ops.ditill.{op}.default" in code, f"{op} is not called by the compiled code"
    _assert_close([got[0]], [want], "sliced")
