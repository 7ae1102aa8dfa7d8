"""DyDiT / DyLiT dynamic execution: masked (training) and sliced (inference) paths agree, and a
dynamic student with every unit on is exactly its static teacher."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models.dynamic import UnitSelection, gumbel_sigmoid_ste
from models.flops import block_cost, realised_ratio
from models.inherit import inherit_weights
from tests.helpers import randomize_, tiny, tiny_inputs


def _route_partially(model, seed=1):
    """Routers whose decisions depend on t and on the token: some heads/groups/tokens switch off."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            for r in (block.attn_rate.router, block.mlp_rate.router):
                r.weight.copy_(torch.randn(r.weight.shape, generator=g) * 0.5)
                r.bias.copy_(torch.randn(r.bias.shape, generator=g) + 2.0)
            head = block.token_selection.mlp_head
            head[0].weight.copy_(torch.randn(head[0].weight.shape, generator=g))
            head[2].weight.copy_(torch.randn(head[2].weight.shape, generator=g))
            head[2].bias.fill_(1.0)
    return model


def _block_flops(model, x, t, y) -> tuple[dict[str, int], dict]:
    """FLOPs FlopCounterMode counts in each block's attention and MLP modules, and the forward's aux."""
    with FlopCounterMode(display=False) as counter:
        _, aux = model(x, t, y, return_aux=True)
    counts = counter.get_flop_counts()
    names = [f"{type(model).__name__}.blocks.{i}.{part}" for i in range(len(model.blocks)) for part in ("attn", "mlp")]
    return {n: sum(counts.get(n, {}).values()) for n in names}, aux


@pytest.mark.parametrize("name", ["dydit-s/2", "dylit-s/2"])
@pytest.mark.parametrize("shared_t", [True, False])
def test_eval_masked_and_sliced_paths_agree_and_sliced_computes_only_the_active_units(name, shared_t):
    """Same output, and the sliced path's multiply-adds (FlopCounterMode: matmuls and convolutions, so
    LiT's attention counts whole but SDPA on the CPU not at all) are the masked path's scaled per block:
    attention by the heads any sample uses, the MLP by the routed tokens × the groups any sample uses."""
    torch.manual_seed(0)
    m = _route_partially(randomize_(tiny(name, depth=3), seed=3)).eval()
    with torch.no_grad():
        m.blocks[0].attn_rate.router.bias.fill_(-10.0)  # block 0 runs head 0 alone and block 1 channel group 0
        m.blocks[1].mlp_rate.router.bias.fill_(-10.0)  # alone, for every t: heads and groups are sliced too
    x, t, y = tiny_inputs(batch=4)
    if shared_t:
        t = torch.full_like(t, 421.0)  # a sampling step: one t for the whole batch
    m.dynamic_exec = "masked"
    out_masked, aux_m = m(x, t, y, return_aux=True)
    flops_masked, _ = _block_flops(m, x, t, y)
    m.dynamic_exec = "sliced"
    out_sliced, aux_s = m(x, t, y, return_aux=True)
    flops_sliced, _ = _block_flops(m, x, t, y)
    ratio = aux_s["flops_ratio"]
    assert (ratio < 0.95).all() and (ratio > 0.2).all(), ratio  # the routers really skip work
    for k in ("head_masks", "channel_masks", "token_masks"):
        assert torch.equal(aux_m[k], aux_s[k])
    torch.testing.assert_close(out_sliced, out_masked, rtol=1e-5, atol=1e-5)
    heads = aux_s["head_masks"].any(0).double().mean(-1)  # (depth,) heads computed / all
    groups = aux_s["channel_masks"].any(0).double().mean(-1)
    tokens = aux_s["token_masks"].double().mean((0, 2))  # routed tokens / all
    for i in range(len(m.blocks)):
        attn, mlp = f"DiT.blocks.{i}.attn", f"DiT.blocks.{i}.mlp"
        assert flops_masked[attn] > 0 and flops_masked[mlp] > 0
        assert flops_sliced[attn] / flops_masked[attn] == pytest.approx(heads[i].item(), rel=1e-12), attn
        assert flops_sliced[mlp] / flops_masked[mlp] == pytest.approx((tokens[i] * groups[i]).item(), rel=1e-12), mlp
    assert heads[0] < 1 and (tokens < 1).any() and (groups < 1).any()  # each kind of saving was exercised


@pytest.mark.parametrize("name", ["dydit-s/2"])
def test_dynamic_student_with_every_unit_on_is_the_teacher(name):
    teacher = randomize_(tiny("dit-s/2"), seed=5)
    student = tiny(name)
    report = inherit_weights(student, teacher.state_dict())
    assert not report.skipped and not report.unused
    assert all("rate.router" in k or "token_selection" in k for k in report.initialised)
    x, t, y = tiny_inputs(batch=4)
    for mode in ("eval", "train"):
        getattr(teacher, mode)(), getattr(student, mode)()
        ref = teacher(x, t, y)
        out, aux = student(x, t, y, return_aux=True)
        assert torch.equal(out, ref), mode
        assert torch.equal(aux["flops_ratio"], torch.ones(4))


def test_dylit_with_every_unit_on_is_its_lit():
    lit = randomize_(tiny("lit-s/2", mlp_groups=6), seed=2).eval()
    dylit = tiny("dylit-s/2")
    inherit_weights(dylit, lit.state_dict())
    x, t, y = tiny_inputs()
    assert torch.equal(dylit.eval()(x, t, y), lit(x, t, y))


def test_complete_mode_runs_every_unit():
    m = _route_partially(randomize_(tiny("dydit-s/2"), seed=4)).eval()
    ref = tiny("dit-s/2")
    ref.load_state_dict(m.state_dict(), strict=False)
    x, t, y = tiny_inputs()
    assert torch.equal(m(x, t, y, complete=True), ref.eval()(x, t, y))


def test_gumbel_sigmoid_eval_is_the_deterministic_threshold_with_sigmoid_gradient():
    logits = torch.tensor([-3.0, 0.2, 4.0], requires_grad=True)
    out = gumbel_sigmoid_ste(logits, tau=5.0, training=False)
    assert out.tolist() == [0.0, 1.0, 1.0]
    out.sum().backward()
    s = torch.sigmoid(logits.detach())
    torch.testing.assert_close(logits.grad, s * (1 - s))


def test_gumbel_sigmoid_in_training_is_the_noisy_hard_decision_with_the_tempered_gradient():
    """At the routers' temperature τ = 5 with logistic noise g = g1 − g2 (two Gumbel draws): the forward
    value is exactly 1[σ((l+g)/τ) > 0.5] and the gradient is σ'((l+g)/τ)/τ, for the same noise."""
    tau = 5.0
    logits = torch.linspace(-4.0, 4.0, 4001, dtype=torch.float64).requires_grad_()
    torch.manual_seed(7)
    out = gumbel_sigmoid_ste(logits, tau=tau, training=True)
    torch.manual_seed(7)  # the same two draws, in the same order
    g1 = -torch.empty_like(logits).exponential_().log()
    g2 = -torch.empty_like(logits).exponential_().log()
    soft = torch.sigmoid((logits.detach() + g1 - g2) / tau)
    assert torch.equal(out.detach(), (soft > 0.5).double())
    assert not torch.equal(out.detach(), (logits.detach() > 0).double())  # the noise flips decisions
    (grad,) = torch.autograd.grad(out.sum(), logits)
    torch.testing.assert_close(grad, soft * (1 - soft) / tau, rtol=1e-12, atol=0)
    # the decision's marginal is σ(l), whatever τ (P(l + g > 0) for logistic g): 20k draws at l = 1
    torch.manual_seed(0)
    on = gumbel_sigmoid_ste(torch.ones(20000, dtype=torch.float64), tau=tau, training=True).mean().item()
    assert abs(on - torch.sigmoid(torch.tensor(1.0)).item()) < 0.015  # 4.8 standard deviations


def test_routers_start_all_on_and_unit_zero_is_always_on():
    m = tiny("dydit-s/2").eval()
    x, t, y = tiny_inputs()
    _, aux = m(x, t, y, return_aux=True)
    assert aux["head_masks"].min() == 1 and aux["channel_masks"].min() == 1 and aux["token_masks"].min() == 1
    with torch.no_grad():
        for b in m.blocks:
            b.attn_rate.router.bias.fill_(-50.0)
            b.mlp_rate.router.bias.fill_(-50.0)
    _, aux = m(x, t, y, return_aux=True)
    assert aux["head_masks"][..., 0].min() == 1 and aux["head_masks"][..., 1:].max() == 0
    assert aux["channel_masks"][..., 0].min() == 1 and aux["channel_masks"][..., 1:].max() == 0


def test_realised_ratio_follows_dydit_convention():
    m = tiny("dydit-s/2")
    cfg = m.config
    cost = block_cost(cfg)
    heads = torch.tensor([[[1, 1, 0, 0, 0, 0], [1] * 6]], dtype=torch.float)  # layer 0: 2/6 heads
    channels = torch.tensor([[[1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]]], dtype=torch.float)
    tokens = torch.ones(1, 2, 16)
    tokens[0, 1, :4] = 0  # layer 1: 12/16 tokens
    expected = (2 / 6 * cost.attn + 1 / 6 * cost.mlp + cost.attn + 3 / 6 * 12 / 16 * cost.mlp) / (2 * (cost.attn + cost.mlp))
    torch.testing.assert_close(realised_ratio(cfg, heads, channels, tokens), torch.tensor([expected]))


def test_unit_selection_union_and_per_sample_mask():
    sel = UnitSelection.from_mask(torch.tensor([[1.0, 0, 1, 0], [1.0, 1, 1, 0]]))
    assert sel.index.tolist() == [0, 1, 2] and sel.mask.tolist() == [[1, 0, 1], [1, 1, 1]] and not sel.full
    same = UnitSelection.from_mask(torch.tensor([[1.0, 0, 1], [1.0, 0, 1]]))
    assert same.mask is None and same.index.tolist() == [0, 2]


@pytest.mark.parametrize("target,direction", [(0.2, "fall"), (1.0, "rise")])
def test_flops_loss_gradient_pushes_every_router_toward_the_target(target, direction):
    """Above the target the FLOPs loss's gradient makes every router logit fall (a descent step lowers
    each bias), below it rise: every head, channel-group and token router's bias gradient has the sign
    of (realised ratio − target), through the straight-through estimator in training mode."""
    from models.losses import FlopsLoss

    m = tiny("dylit-s/2").train()
    with torch.no_grad():
        for b in m.blocks:  # near the decision boundary, so both decisions occur under the noise
            b.attn_rate.router.bias.fill_(0.5)
            b.mlp_rate.router.bias.fill_(0.5)
            b.token_selection.mlp_head[2].bias.fill_(0.5)
    x, t, y = tiny_inputs()
    torch.manual_seed(0)
    _, aux = m(x, t, y, return_aux=True)
    loss = FlopsLoss(target, warmup_steps=0, hold_steps=0)(aux["flops_ratio"], step=0)
    ratio = loss["flops_ratio"].item()
    assert (ratio > target) if direction == "fall" else (ratio < target), ratio
    loss["flops"].backward()
    sign = 1.0 if direction == "fall" else -1.0
    for i, b in enumerate(m.blocks):
        for p in (b.attn_rate.router.bias, b.mlp_rate.router.bias, b.token_selection.mlp_head[2].bias):
            assert (sign * p.grad > 0).all(), (i, p.grad)


@pytest.mark.parametrize("name,switches", [("dylit-s/2", {}), ("dydit-pixart-sigma-xl/2", {"cross_attn_routing": True}),
                                           ("dyflux-lite", {})])
def test_every_router_of_a_training_student_uses_the_estimator_at_the_configured_temperature(monkeypatch, name, switches):
    """Every width and token router of a training forward (with per-sample seeds, as the trainer runs it)
    makes the hard decision 1[l + g > 0] and back-propagates σ'((l+g)/τ)/τ at the config's `router_tau`
    (3, not the default 5: catches a router that drops or hard-codes its temperature), where g is the
    counter noise of its (seed, salt)."""
    import models.dynamic as dynamic
    import models.flux_layers as flux_layers
    from models.rng import counter_logistic
    from tests.test_flops_measured import inputs, tiny_model

    tau, real, calls = 3.0, dynamic.gumbel_sigmoid_ste, []

    def check(logits, tau_arg, training, threshold=0.5, *, seeds=None, salt=0):
        out = real(logits, tau_arg, training, threshold, seeds=seeds, salt=salt)
        noise = counter_logistic(seeds, salt, logits[0].numel()).view_as(logits)
        soft = torch.sigmoid((logits.detach() + noise) / tau)
        (grad,) = torch.autograd.grad(out.sum(), logits, retain_graph=True)
        calls.append((torch.equal(out.detach(), (soft > 0.5).float()),
                      torch.allclose(grad, soft * (1 - soft) / tau, rtol=1e-5, atol=0)))
        return out

    monkeypatch.setattr(dynamic, "gumbel_sigmoid_ste", check)
    monkeypatch.setattr(flux_layers, "gumbel_sigmoid_ste", check)
    model = tiny_model(name, router_tau=tau, **switches).train()
    x, t, cond, _ = inputs(model, batch=2)
    model(x, t, **cond, seeds=torch.tensor([11, 2**40 + 3]))
    routers = [m for m in model.modules() if hasattr(m, "tau") and hasattr(m, "threshold")]
    assert len(calls) == len(routers) > 0, (len(calls), len(routers))  # each router once
    assert all(decision for decision, _ in calls), "a router's hard decision is not 1[l + g > 0]"
    assert all(gradient for _, gradient in calls), "a router's gradient is not the one at the configured temperature"
