"""The fast paths compute the same function as the plain formulation they replace (their speed
is measured by `launch.benchmark models`): LiT's DWC and its CPU backward, and the inference caches
of the dynamic models (width plans per timestep, sliced weights per unit pattern)."""
import pytest
import torch
import torch.nn.functional as F

from models.attention import LinearAttention, depthwise_conv2d
from models.dynamic import UnitSelection
from models.mlp import Mlp
from tests.helpers import randomize_, tiny, tiny_inputs
from tests.test_models_dynamic import _route_partially


@pytest.mark.parametrize("shape", [(3, 5, 6, 7), (1, 4, 8, 8)])
def test_depthwise_conv_matches_conv2d_autograd(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(shape[1], 1, 5, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    g = torch.randn(*shape, dtype=torch.float64)
    fast = torch.autograd.grad(depthwise_conv2d(x, w, b), (x, w, b), g)
    ref_out = F.conv2d(x, w, b, padding=2, groups=shape[1])
    ref = torch.autograd.grad(ref_out, (x, w, b), g)
    torch.testing.assert_close(depthwise_conv2d(x, w, b), ref_out)
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r)


def test_depthwise_conv_custom_op_registration_and_autocast():
    """opcheck: the fake output (channels-last, the compute dtype) matches the real one, autograd is
    registered. Under bf16 autocast it computes what F.conv2d would (bf16), gradients in the inputs' dtypes;
    FlopCounterMode counts it as F.conv2d."""
    x = torch.randn(2, 6, 5, 7, requires_grad=True)
    w = torch.randn(6, 1, 5, 5, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    for dtype in (torch.float32, torch.bfloat16):
        for bias in (b, None):
            torch.library.opcheck(torch.ops.ditill.depthwise_conv2d_cpu.default, (x, w, bias, dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = depthwise_conv2d(x, w, b)
        want = F.conv2d(x.contiguous(memory_format=torch.channels_last), w, b, padding=2, groups=6)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    grads = torch.autograd.grad(got.float().sum(), (x, w, b))
    assert [g.dtype for g in grads] == [torch.float32] * 3
    from torch.utils.flop_counter import FlopCounterMode

    flops = []
    for conv in (depthwise_conv2d, lambda x, w, b: F.conv2d(x, w, b, padding=2, groups=6)):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            conv(x, w, b)
        flops.append(counter.get_total_flops())
    assert flops[0] == flops[1] == 2 * 2 * 6 * 5 * 7 * 25  # the op's registered formula: F.conv2d's count


def _naive_lit(attn: LinearAttention, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """LiT with per-head DWC through nn.Conv2d autograd (the formulation the fast path replaces)."""
    b, n, dim = x.shape
    h, d = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    qf, kf = F.relu(q), F.relu(k)
    num = qf @ (kf.transpose(-1, -2) @ v / n)
    den = (qf * kf.mean(dim=-2, keepdim=True)).sum(-1, keepdim=True) + attn.eps
    v_img = v.reshape(b * h, n, d).transpose(1, 2).reshape(b * h, d, *grid)
    conv = attn.dwc(v_img).reshape(b, h, d, n).transpose(2, 3)
    return attn.proj((num / den + conv).transpose(1, 2).reshape(b, n, dim))


def test_linear_attention_gradients_match_naive():
    torch.manual_seed(0)
    attn = LinearAttention(24, 2, dwc_kernel=5)
    x = torch.randn(2, 12, 24, requires_grad=True)
    g = torch.randn(2, 12, 24)
    grads = []
    for fn in (lambda: attn(x, (3, 4)), lambda: _naive_lit(attn, x, (3, 4))):
        attn.zero_grad()
        x.grad = None
        fn().backward(g)
        grads.append([x.grad.clone()] + [p.grad.clone() for p in attn.parameters()])
    for fast, ref in zip(*grads):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_linear_attention_backward_under_bf16_autocast():
    torch.manual_seed(0)
    attn = LinearAttention(32, 2)
    x = torch.randn(2, 16, 32, requires_grad=True)
    attn(x, (4, 4)).sum().backward()
    ref = [p.grad.clone() for p in attn.parameters()]
    attn.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x, (4, 4))
    out.float().sum().backward()
    for p, r in zip(attn.parameters(), ref):
        assert p.grad.dtype == torch.float32
        assert (p.grad - r).norm() <= 3e-2 * r.norm() + 1e-6


def _dynamic(name="dydit-s/2"):
    torch.manual_seed(0)
    return _route_partially(randomize_(tiny(name, depth=3), seed=3)).eval()


@pytest.mark.parametrize("name", ["dydit-s/2", "dylit-s/2"])
def test_inference_caches_give_the_uncached_and_masked_outputs(name):
    m = _dynamic(name)
    x, t, y = tiny_inputs(batch=4)
    t = torch.full_like(t, 421.0)
    ref, aux_ref = m(x, t, y, return_aux=True)  # autograd on: no cache
    with torch.no_grad():
        miss, aux = m(x, t, y, return_aux=True)
        hit = m(x, t, y)
        m.dynamic_exec = "masked"
        masked = m(x, t, y)
    assert all(len(block.plans) == 1 for block in m.blocks)
    assert torch.equal(miss, ref) and torch.equal(hit, ref)
    assert torch.equal(aux["head_masks"], aux_ref["head_masks"].detach())
    torch.testing.assert_close(hit, masked, rtol=1e-5, atol=1e-5)
    assert (aux["flops_ratio"] < 0.95).all()  # the routers really skip work


def test_plan_cache_skips_the_routers_and_follows_router_updates():
    m = _dynamic()
    x, t, y = tiny_inputs(batch=2)
    t = torch.full_like(t, 100.0)
    calls = []
    for block in m.blocks:
        block.attn_rate.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        m(x, t, y)
        assert len(calls) == 3
        m(x, t, y)
        m(x[:1], t[:1], y[:1])  # same t, another batch size: same plan
        assert len(calls) == 3
        for block in m.blocks:  # an in-place update (optimiser, EMA) invalidates the plans
            block.attn_rate.router.bias.fill_(-50.0)
        _, aux = m(x, t, y, return_aux=True)
    assert len(calls) == 6
    assert aux["head_masks"][..., 1:].max() == 0 and aux["head_masks"][..., 0].min() == 1


def test_per_sample_timesteps_are_not_cached():
    m = _dynamic()
    x, t, y = tiny_inputs(batch=4)
    with torch.no_grad():
        out = m(x, t, y)
        m.dynamic_exec = "masked"
        masked = m(x, t, y)
    assert not any(len(block.plans) for block in m.blocks)
    torch.testing.assert_close(out, masked, rtol=1e-5, atol=1e-5)


def test_sliced_weights_are_reused_only_without_grad_and_while_unchanged():
    torch.manual_seed(0)
    mlp = Mlp(8, 32, groups=4)
    sel = UnitSelection.from_mask(torch.tensor([[1.0, 0.0, 1.0, 0.0]]))
    x = torch.randn(3, 8)
    with torch.no_grad():
        first = mlp._slices.get(sel, (mlp.fc1.weight,), lambda: mlp._sliced_weights(sel))
        again = mlp._slices.get(sel, (mlp.fc1.weight,), lambda: mlp._sliced_weights(sel))
        assert first is again
        mlp.fc1.weight.mul_(2.0)
        fresh = mlp._slices.get(sel, (mlp.fc1.weight,), lambda: mlp._sliced_weights(sel))
        assert fresh is not first and torch.equal(fresh[0], first[0] * 2)
        out = mlp(x, groups=sel)
    masked = mlp(x, unit_mask=torch.tensor([1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(out, masked)
    grad_out = mlp(x, groups=sel)  # with autograd: fresh, differentiable slices
    grad_out.sum().backward()
    assert mlp.fc1.weight.grad[8:16].abs().sum() == 0 and mlp.fc1.weight.grad[:8].abs().sum() > 0


def test_cached_inference_follows_in_place_weight_updates_and_train_drops_the_caches():
    """Every weight a sliced copy is made from is part of its cache key: after an in-place update (an
    EMA step, load_state_dict) the cached sliced forward still equals the masked one."""
    m = _dynamic()
    x, t, y = tiny_inputs(batch=2)
    t = torch.full_like(t, 300.0)
    with torch.no_grad():
        m(x, t, y)
        for block in m.blocks:
            for w in (block.mlp.fc1.bias, block.mlp.fc2.weight, block.attn.qkv.weight, block.attn.proj.weight,
                      block.attn_rate.router.weight, block.mlp_rate.router.bias):
                w.mul_(1.5)
        m.t_embedder.mlp[0].weight.mul_(1.5)
        sliced = m(x, t, y)
        m.dynamic_exec = "masked"
        masked = m(x, t, y)
        m.dynamic_exec = "sliced"
    torch.testing.assert_close(sliced, masked, rtol=1e-5, atol=1e-5)
    assert any(block.mlp._slices._value for block in m.blocks)
    m.train()
    assert not any(len(block.plans) or block.mlp._slices._value or block.attn._qkv_slices._value for block in m.blocks)


def test_cached_inference_runs_under_fsdp2():
    """The plan cache is built inside each block's forward, where FSDP2 has gathered the router
    weights (built at the root they are still sharded DTensors: a crash at every sampling step)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from trainer.distributed import destroy_distributed, init_distributed

    env = init_distributed(60)
    try:
        m = _dynamic()
        x, t, y = tiny_inputs(batch=2)
        t = torch.full_like(t, 400.0)
        with torch.no_grad():
            ref = m(x, t, y)
        mesh = init_device_mesh("cpu", (env.world_size,))
        for block in m.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(m, mesh=mesh)
        with torch.no_grad():
            first, again = m(x, t, y), m(x, t, y)
        torch.testing.assert_close(first, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(again, ref, rtol=1e-6, atol=1e-6)
    finally:
        destroy_distributed()
