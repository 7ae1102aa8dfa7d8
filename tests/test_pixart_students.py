"""PixArt-Σ students on the shared machinery: LiT inherits all but self-attention, DyDiT/DyLiT with every
unit on are their teachers exactly, masked (train) and sliced (inference) paths agree on every bucket
with cross-attention heads routed or not, the sliced path executes exactly the realised FLOPs the
accounting reports (counted by torch's FlopCounterMode), and every router gets the seeds and its own
salt."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import models.dynamic as dynamic
from models import family_of
from models.inherit import default_exclude, inherit_weights
from tests.test_pixart_model import BUCKETS, latents, text, tiny

DYNAMIC = ("dydit-pixart-sigma-xl/2", "dylit-pixart-sigma-xl/2")


def route_partially(model, seed: int = 1):
    """Routers whose decisions depend on t and on the token: some heads, groups and tokens switch off."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            for r in block.width_routers():
                r.router.weight.copy_(torch.randn(r.router.weight.shape, generator=g) * 0.5)
                r.router.bias.copy_(torch.randn(r.router.bias.shape, generator=g) * 1.5)
            head = block.token_selection.mlp_head
            head[0].weight.copy_(torch.randn(head[0].weight.shape, generator=g))
            head[2].weight.copy_(torch.randn(head[2].weight.shape, generator=g))
            head[2].bias.fill_(0.5)
    return model


def student(name: str, cross: bool, **kw):
    return route_partially(tiny(name, depth=3, num_heads=4, mlp_groups=4, cross_attn_routing=cross, **kw))


def test_lit_inherits_everything_but_self_attention():
    teacher = tiny("pixart-sigma-xl/2")
    lit = tiny("lit-pixart-sigma-xl/2", seed=9)
    report = inherit_weights(lit, teacher.state_dict(), default_exclude(teacher.config, lit.config))
    assert sorted(report.skipped) == sorted(f"blocks.{i}.attn.{p}.{w}" for i in range(2) for p in ("qkv", "proj")
                                            for w in ("weight", "bias"))
    assert sorted(report.initialised) == sorted(f"blocks.{i}.attn.dwc.{w}" for i in range(2) for w in ("weight", "bias"))
    t_sd, s_sd = teacher.state_dict(), lit.state_dict()
    for key in report.inherited:
        assert torch.equal(s_sd[key], t_sd[key]), key
    assert "y_embedder.y_embedding" in report.inherited  # the null caption travels with the weights
    assert lit.config.self_heads == 2 and lit.blocks[0].cross_attn.num_heads == teacher.config.num_heads


@pytest.mark.parametrize("name,teacher_name", [("dydit-pixart-sigma-xl/2", "pixart-sigma-xl/2"),
                                               ("dylit-pixart-sigma-xl/2", "lit-pixart-sigma-xl/2")])
@pytest.mark.parametrize("cross", [False, True])
def test_every_unit_on_reproduces_the_teacher_exactly(name, teacher_name, cross):
    teacher = tiny(teacher_name, seed=5)
    dyn = tiny(name, seed=6, cross_attn_routing=cross)
    report = inherit_weights(dyn, teacher.state_dict(), default_exclude(teacher.config, dyn.config))
    assert not report.skipped and not report.unused
    assert all("_rate.router" in k or "token_selection" in k for k in report.initialised)
    dyn.reset_routers()
    x, t = latents((8, 12), batch=3)
    t = torch.tensor([5, 400, 999])
    emb, mask = text(batch=3)
    for mode in ("eval", "train"):
        getattr(teacher, mode)(), getattr(dyn, mode)()
        ref = teacher(x, t, emb, mask)
        out, aux = dyn(x, t, emb, mask, return_aux=True)
        assert torch.equal(out, ref), mode
        assert torch.equal(aux["flops_ratio"], torch.ones(3)) and ("cross_masks" in aux) == cross
        assert torch.equal(dyn(x, t, emb, mask, complete=True), ref)


@pytest.mark.parametrize("name", DYNAMIC)
@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("shared_t", [True, False])
def test_masked_and_sliced_paths_agree_on_every_bucket(name, cross, shared_t):
    model = student(name, cross).eval()
    emb, mask = text(batch=4)
    for hw in BUCKETS:
        x, _ = latents(hw, batch=4)
        t = torch.full((4,), 421) if shared_t else torch.tensor([30, 421, 700, 950])
        model.dynamic_exec = "masked"
        out_m, aux_m = model(x, t, emb, mask, return_aux=True)
        model.dynamic_exec = "sliced"
        out_s, aux_s = model(x, t, emb, mask, return_aux=True)
        ratio = aux_s["flops_ratio"]
        assert (ratio < 0.95).all() and (ratio > 0.2).all(), ratio  # the routers really skip work
        if cross:
            assert 0 < aux_s["cross_masks"].mean() < 1
        for k in aux_m:
            assert torch.equal(aux_m[k], aux_s[k]), k
        torch.testing.assert_close(out_s, out_m, rtol=1e-5, atol=1e-5, msg=f"{hw}")


def counted(model, *args) -> float:
    """Multiply-adds torch actually executes (CPU SDPA and linear attention's normaliser are counted:
    models/attention.py registers the formula, the normaliser is a matmul)."""
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(*args)
    return fc.get_total_flops() / 2


@pytest.mark.parametrize("name,cross", [("pixart-sigma-xl/2", False), ("lit-pixart-sigma-xl/2", False),
                                        *[(n, c) for n in DYNAMIC for c in (False, True)]])
def test_realised_flops_are_what_the_sliced_path_executes(name, cross):
    model = student(name, cross) if name.startswith("dy") else tiny(name, depth=3, num_heads=4)
    model.eval()
    family, cfg = family_of(model), model.config
    emb, mask = text(batch=1)
    for hw in ((8, 12), (12, 8)):
        x, t = latents(hw, batch=1)
        static = family.flops(cfg, hw)["total"]
        if not cfg.dynamic:
            assert counted(model, x, t, emb, mask) == static
            continue
        with torch.no_grad():
            _, aux = model(x, t, emb, mask, return_aux=True)
        realised = float(family.realised_flops(cfg, aux, hw))
        model.train(), model.eval()  # drop the width plans cached at this t: the count includes the routers
        assert counted(model, x, t, emb, mask) == pytest.approx(realised, rel=1e-6)
        model.dynamic_exec = "masked"
        masked = counted(model, x, t, emb, mask)
        model.dynamic_exec = "auto"
        assert realised < 0.95 * masked  # the sliced path computes less than the training path
        assert masked == pytest.approx(static, rel=1e-6)  # masked computes all


def test_flops_count_cross_attention_and_the_caption_projection():
    model = student("dydit-pixart-sigma-xl/2", cross=True)
    family, cfg = family_of(model), model.config
    hw, length = (8, 12), cfg.model_max_length
    n, d = 24, cfg.hidden_size
    parts = family.flops(cfg, hw)
    cross = 2 * n * d * d + 2 * length * d * d + 2 * n * length * d
    assert parts["embeddings"] == 96 * 4 * d + 256 * d + d * d + length * (cfg.caption_channels * d + d * d)
    assert parts["attention"] == cfg.depth * (4 * n * d * d + 2 * n * n * d + cross)
    # the routed fraction of cross-attention heads enters both the whole-model count and the loss ratio
    ones = {k: torch.ones(1, cfg.depth, u) for k, u in (("head", 4), ("channel", 4), ("token", n), ("cross", 4))}
    aux = {f"{k}_masks": v for k, v in ones.items()}
    assert float(family.realised_flops(cfg, aux, hw)) == parts["total"]
    aux["cross_masks"] = torch.tensor([[1.0, 1, 0, 0]]).repeat(cfg.depth, 1)[None]
    assert float(family.realised_flops(cfg, aux, hw)) == pytest.approx(parts["total"] - cfg.depth * cross / 2)


@pytest.mark.parametrize("cross", [False, True])
def test_every_router_gets_the_seeds_and_its_own_salt(monkeypatch, cross):
    calls = []
    real = dynamic.gumbel_sigmoid_ste

    def spy(logits, tau, training, threshold=0.5, *, seeds=None, salt=0):
        calls.append((seeds, salt))
        return real(logits, tau, training, threshold, seeds=seeds, salt=salt)

    monkeypatch.setattr(dynamic, "gumbel_sigmoid_ste", spy)
    model = student("dylit-pixart-sigma-xl/2", cross).train()
    x, t = latents((8, 12), batch=2)
    emb, mask = text()
    seeds = torch.tensor([11, 2**40 + 3])
    model(x, t, emb, mask, seeds=seeds)
    per_block = 4 if cross else 3
    assert len(calls) == model.config.depth * per_block
    assert all(s is seeds for s, _ in calls)
    assert len({salt for _, salt in calls}) == len(calls)  # distinct per router and block
