"""DyFLUX: what each router switches off (checked against weight surgery on the static model and the
block's own residual stream), masked and sliced paths agreeing, every unit on being the teacher,
the width-plan cache at sampling steps, per-sample seeds reaching every router, realised FLOPs."""
from __future__ import annotations

import pytest
import torch

from models.dynamic import Router
from models.flux_flops import block_costs, realised_flops, realised_ratio, static_flops
from models.inherit import inherit_weights
from models import model_config
from tests.flux_helpers import flux_inputs, tiny_flux

GROUPS = 4  # MLP channel groups of the tiny 128-wide MLP


def dyflux(skip: str = "output", name: str = "dyflux-dev", **kw):
    return tiny_flux(name, mlp_groups=GROUPS, single_token_skip=skip, **kw)


def route_partially(model, seed: int = 1, token_bias: float = 0.3):
    """Routers whose decisions depend on (t, g) and on the token: some heads, groups and tokens go off."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.all_blocks():
            for name in ("attn_rate", *block.mlp_routers):
                r = getattr(block, name).router
                r.weight.copy_(torch.randn(r.weight.shape, generator=g) * 3.0)
                r.bias.copy_(torch.randn(r.bias.shape, generator=g))
            sel = block.token_selection
            sel.router.weight.copy_(torch.randn(sel.router.weight.shape, generator=g))
            sel.router.bias.fill_(token_bias)
    return model


def set_routers(model, heads_on: bool = True, groups_on: bool = True, tokens_on: bool = True):
    with torch.no_grad():
        for block in model.all_blocks():
            for name, on in (("attn_rate", heads_on), *((n, groups_on) for n in block.mlp_routers)):
                r = getattr(block, name).router
                r.weight.zero_()
                r.bias.fill_(50.0 if on else -50.0)
            block.token_selection.router.weight.zero_()
            block.token_selection.router.bias.fill_(50.0 if tokens_on else -50.0)
    return model


@pytest.mark.parametrize("name,skip", [("dyflux-dev", "output"), ("dyflux-dev", "mlp"), ("dylit-flux-dev", "output")])
@pytest.mark.parametrize("shared_t", [True, False])
def test_eval_masked_and_sliced_paths_agree(name, skip, shared_t):
    """DyLiT-FLUX: the same routing with linear attention (head slicing through the RoPE numerator and DWC)."""
    m = route_partially(dyflux(skip, name, depth=2)).eval()
    x, t, te, tp = flux_inputs(batch=4, hw=(8, 12))
    g = torch.tensor([3.5, 3.5, 2.0, 5.0])
    if shared_t:
        t, g = torch.full_like(t, 625.0), torch.full_like(g, 3.5)  # a sampling step: one (t, g) per batch
    m.dynamic_exec = "masked"
    out_m, aux_m = m(x, t, te, tp, guidance=g, return_aux=True)
    m.dynamic_exec = "sliced"
    out_s, aux_s = m(x, t, te, tp, guidance=g, return_aux=True)
    ratio = aux_s["flops_ratio"]
    assert (ratio < 0.95).all() and (ratio > 0.1).all(), ratio  # the routers really skip work
    assert aux_s["head_masks"].shape == (4, 4, 2) and aux_s["channel_masks"].shape == (4, 6, GROUPS)
    assert aux_s["token_masks"].shape == (4, 4, 24)
    for k in ("head_masks", "channel_masks", "token_masks", "flops_ratio"):
        assert torch.equal(aux_m[k], aux_s[k]), k
    torch.testing.assert_close(out_s, out_m, rtol=1e-5, atol=1e-5)


def test_every_unit_on_is_the_teacher_exactly():
    teacher = tiny_flux("flux-dev", seed=5)
    student = dyflux()
    report = inherit_weights(student, teacher.state_dict())
    assert not report.skipped and not report.unused
    assert all("_rate." in k or "token_selection" in k for k in report.initialised)
    x, t, te, tp = flux_inputs()
    for mode in ("eval", "train"):
        getattr(teacher, mode)(), getattr(student, mode)()
        ref = teacher(x, t, te, tp)
        assert torch.equal(student(x, t, te, tp, complete=True), ref), mode
    set_routers(student)  # every router on: masked (train) and sliced (eval) paths are the teacher too
    for mode in ("train", "eval"):
        getattr(teacher, mode)(), getattr(student, mode)()
        out, aux = student(x, t, te, tp, return_aux=True)
        assert torch.equal(out, teacher(x, t, te, tp)), mode
        assert torch.equal(aux["flops_ratio"], torch.ones(2))


@pytest.mark.parametrize("mode", ["masked", "sliced"])
def test_a_head_off_is_off_for_both_streams_and_a_group_off_removes_its_channels(mode):
    """Head 1 and MLP group 2 off everywhere equal the static model with head 1's output-projection
    columns and group 2's second-layer columns zeroed — in both streams and in the fused single blocks."""
    student = set_routers(dyflux()).eval()
    with torch.no_grad():
        for block in student.all_blocks():
            block.attn_rate.router.bias.copy_(torch.tensor([-50.0]))  # units 0 (always on) and 1: head 1 off
            for name in block.mlp_routers:
                getattr(block, name).router.bias.copy_(torch.tensor([50.0, -50.0, 50.0]))  # group 2 off
    student.dynamic_exec = mode
    ref = tiny_flux("flux-dev")  # the same random weights as the student's (same seed)
    d, hd, gs = 32, 16, 128 // GROUPS
    with torch.no_grad():
        for block in ref.double_blocks:
            for attn in (block.img_attn, block.txt_attn):
                attn.proj.weight[:, hd:2 * hd] = 0
            for mlp in (block.img_mlp, block.txt_mlp):
                mlp[2].weight[:, 2 * gs:3 * gs] = 0
        for block in ref.single_blocks:
            block.linear2.weight[:, hd:2 * hd] = 0
            block.linear2.weight[:, d + 2 * gs:d + 3 * gs] = 0
    x, t, te, tp = flux_inputs()
    with torch.no_grad():
        torch.testing.assert_close(student(x, t, te, tp), ref.eval()(x, t, te, tp), rtol=1e-5, atol=1e-5)


def _single_block_io(model, x, t, te, tp, index: int = 0):
    """Input, output, gate and attention output (merged heads) of single block `index`."""
    block, seen = model.single_blocks[index], {}
    hooks = [block.register_forward_hook(lambda mod, args, out: seen.update(x_in=args[0], x_out=out[0])),
             block.modulation.register_forward_hook(lambda mod, args, out: seen.update(gate=out[2]))]
    _, aux = model(x, t, te, tp, return_aux=True, features=[f"single_blocks.{index}"])
    for h in hooks:
        h.remove()
    return seen, aux["features"][f"single_blocks.{index}"], aux


@pytest.mark.parametrize("skip", ["output", "mlp"])
@pytest.mark.parametrize("mode", ["masked", "sliced"])
def test_unrouted_image_tokens_in_single_blocks_skip_what_the_variant_says(skip, mode):
    """Every image token unrouted: "output" (released DyFLUX) leaves the image part of the residual
    stream untouched (attention output discarded); "mlp" still adds gate·(W2_attn·o + b). Text is computed."""
    m = set_routers(dyflux(skip), tokens_on=False).eval()
    m.dynamic_exec = mode
    x, t, te, tp = flux_inputs()
    n_txt = te.shape[1]
    with torch.no_grad():
        io, o, aux = _single_block_io(m, x, t, te, tp)
    assert aux["token_masks"].max() == 0
    img_in, img_out = io["x_in"][:, n_txt:], io["x_out"][:, n_txt:]
    if skip == "output":
        assert torch.equal(img_out, img_in)
    else:
        w2 = m.single_blocks[0].linear2
        expected = img_in + io["gate"][:, None] * (o[:, n_txt:] @ w2.weight[:, :32].T + w2.bias)
        torch.testing.assert_close(img_out, expected, rtol=1e-5, atol=1e-6)
    assert (io["x_out"][:, :n_txt] - io["x_in"][:, :n_txt]).abs().max() > 1e-3  # text tokens are updated


def test_unrouted_image_tokens_in_double_blocks_skip_only_the_image_mlp():
    student = set_routers(dyflux(), tokens_on=False).eval()
    ref = tiny_flux("flux-dev")
    with torch.no_grad():
        for block in ref.double_blocks:  # no image MLP at all = every image token unrouted
            block.img_mlp[2].weight.zero_()
            block.img_mlp[2].bias.zero_()
    student.single_blocks = torch.nn.ModuleList()  # compare the double stack alone
    ref.single_blocks = torch.nn.ModuleList()
    student.config.depth_single = ref.config.depth_single = 0
    x, t, te, tp = flux_inputs()
    with torch.no_grad():
        torch.testing.assert_close(student(x, t, te, tp), ref.eval()(x, t, te, tp), rtol=1e-5, atol=1e-6)


def test_width_plans_are_cached_per_sampling_step_and_match_uncached():
    m = route_partially(dyflux()).eval()
    x, t, te, tp = flux_inputs(batch=3)
    t = torch.full((3,), 625.0)
    with torch.no_grad():
        first = m(x, t, te, tp, guidance=torch.full((3,), 3.5))
        assert all(len(c) == 1 for b in m.all_blocks() for c in b.plans.values())
        again = m(x, t, te, tp, guidance=torch.full((3,), 3.5))
        assert torch.equal(first, again)
        m(x, t, te, tp, guidance=torch.full((3,), 2.0))  # a new (t, g): a new plan
        assert all(len(c) == 2 for b in m.all_blocks() for c in b.plans.values())
        m(x, t, te, tp, guidance=torch.tensor([2.0, 3.5, 3.5]))  # per-sample g: the routers run, no new plan
        assert all(len(c) == 2 for b in m.all_blocks() for c in b.plans.values())
    with torch.enable_grad():
        uncached = m(x, t, te, tp, guidance=torch.full((3,), 3.5))
    torch.testing.assert_close(uncached, first, rtol=0, atol=0)
    m.train()
    assert all(len(c) == 0 for b in m.all_blocks() for c in b.plans.values())


def test_width_routers_read_time_and_guidance_not_the_text():
    """The head / channel masks are a function of (t, g): other prompts, same masks."""
    m = route_partially(dyflux()).eval()
    m.dynamic_exec = "masked"
    x, t, te, tp = flux_inputs()
    t = torch.full((2,), 500.0)
    _, a = m(x, t, te, tp, return_aux=True)
    _, b = m(x, t, torch.randn_like(te), torch.randn_like(tp), return_aux=True)
    assert torch.equal(a["head_masks"], b["head_masks"]) and torch.equal(a["channel_masks"], b["channel_masks"])
    _, c = m(x, t, te, tp, guidance=torch.full((2,), 1.0), return_aux=True)
    assert not torch.equal(a["channel_masks"], c["channel_masks"]) or not torch.equal(a["head_masks"], c["head_masks"])


def test_every_router_receives_the_seeds_and_its_own_salt(monkeypatch):
    import models.flux_layers as layers

    calls = []

    def fake_gumbel(logits, tau, training, threshold=0.5, seeds=None, salt=0):
        calls.append(("token", salt, seeds))
        return (logits > 0).float()

    def fake_router(self, t_emb, seeds=None, salt=0):
        calls.append(("width", salt, seeds))
        return torch.ones(t_emb.shape[0], self.num_units)

    monkeypatch.setattr(layers, "gumbel_sigmoid_ste", fake_gumbel)
    monkeypatch.setattr(Router, "forward", fake_router)
    m = dyflux(depth=2).train()
    seeds = torch.tensor([11, 12])
    x, t, te, tp = flux_inputs()
    m(x, t, te, tp, seeds=seeds)
    # 2 double blocks × (head, image MLP, text MLP, token) + 2 single blocks × (head, MLP, token)
    assert len(calls) == 2 * 4 + 2 * 3
    assert all(s is seeds for _, _, s in calls)
    salts = [salt for _, salt, _ in calls]
    assert len(set(salts)) == len(salts), salts


def test_router_noise_follows_each_samples_seed():
    """Training masks are a function of each sample's seed: samples 2 and 3 draw the same decisions in a
    batch of 4 and in a batch of their own (world-size independence; models/rng.py)."""
    from models import rng

    m = route_partially(dyflux(depth=2)).train()
    x, t, te, tp = flux_inputs(batch=4)
    seeds = rng.sample_seeds(0, 0, torch.arange(4), rng.ROUTERS)
    _, whole = m(x, t, te, tp, seeds=seeds, return_aux=True)
    _, part = m(x[2:], t[2:], te[2:], tp[2:], seeds=seeds[2:], return_aux=True)
    for k in ("head_masks", "channel_masks", "token_masks"):
        assert torch.equal(whole[k][2:], part[k]), k
    _, other = m(x, t, te, tp, seeds=seeds + 1, return_aux=True)
    assert not torch.equal(whole["token_masks"], other["token_masks"])  # the seed is what decides


def test_flops_gradient_reaches_every_router():
    m = dyflux().train()
    with torch.no_grad():
        for block in m.all_blocks():  # near the decision boundary, so the STE gradient is not vanishing
            for name in ("attn_rate", *block.mlp_routers):
                getattr(block, name).router.bias.fill_(0.5)
            block.token_selection.router.bias.fill_(0.5)
    _, aux = m(*flux_inputs(), return_aux=True)
    aux["flops_ratio"].mean().backward()
    for block in m.all_blocks():
        for p in (block.attn_rate.router.bias, *(getattr(block, n).router.bias for n in block.mlp_routers),
                  block.token_selection.router.bias):
            assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("skip", ["output", "mlp"])
def test_realised_flops_per_block_type(skip):
    """The ratio and whole-model count from masks, against the block costs by hand."""
    cfg = model_config("dyflux-dev", hidden_size=32, num_heads=2, depth=1, depth_single=1, axes_dim=[4, 6, 6],
                       mlp_groups=GROUPS, single_token_skip=skip, context_in_dim=32, vec_in_dim=24, text_len=6)
    n_img, n_txt = 16, 6
    c = block_costs(cfg, n_img, n_txt)
    head = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])  # double: 1/2 heads; single: all
    channel = torch.tensor([[[1.0, 1, 0, 0], [1.0, 0, 0, 0], [1.0, 1, 1, 0]]])  # img 2/4, txt 1/4, single 3/4
    token = torch.ones(1, 2, n_img)
    token[0, 0, :4] = 0  # double: 12/16 image tokens
    token[0, 1, :8] = 0  # single: 8/16
    run = (n_txt + 8) / (n_txt + n_img)
    double = 0.5 * c.double_attn + 0.5 * 0.75 * c.double_img_mlp + 0.25 * c.double_txt_mlp
    single = c.single_attn_in + (run if skip == "output" else 1.0) * c.single_attn_out + 0.75 * run * c.single_mlp
    static = c.double_attn + c.double_img_mlp + c.double_txt_mlp + c.single_attn_in + c.single_attn_out + c.single_mlp
    torch.testing.assert_close(realised_ratio(cfg, head, channel, token, n_txt), torch.tensor([(double + single) / static]))
    aux = {"head_masks": head, "channel_masks": channel, "token_masks": token}
    fixed = static_flops(cfg, (8, 8), n_txt)
    fixed = fixed["total"] - fixed["attention"] - fixed["mlp"]
    torch.testing.assert_close(realised_flops(cfg, aux, n_txt), torch.tensor([double + single + fixed], dtype=torch.float32))
    on = {"head_masks": torch.ones_like(head), "channel_masks": torch.ones_like(channel), "token_masks": torch.ones_like(token)}
    assert float(realised_flops(cfg, on, n_txt)) == pytest.approx(static_flops(cfg, (8, 8), n_txt)["total"], rel=1e-6)


def test_static_flops_match_the_dyditpp_report():
    """DyDiT++ reports FLUX-lite at 30.0 TFLOPs for a 1024² image (4096 image + 512 text tokens)."""
    lite = static_flops(model_config("flux-lite"))
    assert lite["total"] / 1e12 == pytest.approx(30.0, rel=0.005)
    parts = sum(v for k, v in lite.items() if k != "total")
    assert parts == pytest.approx(lite["total"])
