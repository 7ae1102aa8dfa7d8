"""LoRA and TD-LoRA on the PixArt-Σ and FLUX students (issue 16 items 3, 5): masked = sliced with adapters
on, the sliced path pays the adapters exactly for the active heads, groups and tokens (counted per call
against a closed form from the forward's masks), FLUX's gates read the (t, g) embedding, and plain LoRA
exported in diffusers' layout loads into diffusers' FLUX (its own loader) and PixArt (the loader mixin
added: diffusers 0.39's PixArt class has none) and gives our output."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models import family_of, load_pretrained
from models.lora import LoRALinear, LoraSpec, apply_lora, lora_layers
from tests.flux_helpers import flux_inputs, tiny_flux
from tests.test_flux_dynamic import dyflux, route_partially
from tests.test_lora import TOL, _adapter_cost, _fill_adapters
from tests.test_pixart_model import latents, text
from tests.test_pixart_students import student as pixart_student

RANK = 4
CASES = [("dydit-pixart-sigma-xl/2", {"cross": False}), ("dydit-pixart-sigma-xl/2", {"cross": True}),
         ("dylit-pixart-sigma-xl/2", {"cross": False}), ("dyflux-dev", {"skip": "output"}),
         ("dyflux-dev", {"skip": "mlp"}), ("dylit-flux-dev", {"skip": "output"})]


def routers(model) -> list[str]:
    family = family_of(model)
    return [n for n, _ in model.named_parameters() if family.param_group(n) == "routers"]


def adapted(name: str, method: str, cross: bool = False, skip: str = "output"):
    """A routed tiny student (some heads, groups and tokens off) with non-zero adapters; routers train fully."""
    if "pixart" in name:
        m = pixart_student(name, cross)
    else:
        m = route_partially(dyflux(skip, name, depth=2))
    apply_lora(m, LoraSpec(method=method, rank=RANK, alpha=6.0, experts=2), full=routers(m))
    return _fill_adapters(m, std=0.2).eval()


def call(model, batch: int = 4, shared_t: bool = True):
    """(forward(**kw) → (out, aux), image tokens, text tokens) on one batch of the model's family."""
    if "pixart" in type(model).__name__.lower():
        x, _ = latents((8, 12), batch=batch)
        emb, mask = text(batch=batch)
        t = torch.full((batch,), 421) if shared_t else torch.tensor([30, 421, 700, 950])[:batch]
        return (lambda **kw: model(x, t, emb, mask, return_aux=True, **kw)), 24, emb.shape[1]
    x, t, te, tp = flux_inputs(batch=batch, hw=(8, 12))
    g = torch.tensor([3.5, 3.5, 2.0, 5.0])[:batch]
    if shared_t:
        t, g = torch.full_like(t, 625.0), torch.full_like(g, 3.5)
    return (lambda **kw: model(x, t, te, tp, guidance=g, return_aux=True, **kw)), 24, te.shape[1]


@pytest.mark.parametrize("method", ["lora", "tdlora"])
@pytest.mark.parametrize("name,kw", CASES)
def test_masked_and_sliced_paths_agree_with_adapters_on(name, kw, method):
    m = adapted(name, method, **kw)
    for shared_t in (True, False):
        forward, _, _ = call(m, shared_t=shared_t)
        with torch.no_grad():
            m.dynamic_exec = "masked"
            out_m, aux_m = forward()
            m.dynamic_exec = "sliced"
            out_s, aux_s = forward()
        assert (aux_s["flops_ratio"] < 0.95).all(), aux_s["flops_ratio"]  # units and tokens really skipped
        assert not aux_s["token_masks"].all() and not aux_s["channel_masks"].all()
        for k in aux_m:
            assert torch.equal(aux_m[k], aux_s[k]), k
        torch.testing.assert_close(out_s, out_m, **TOL)
    with torch.no_grad():  # the adapters matter: without them (B = 0) the output moves far outside the tolerance
        for layer in lora_layers(m).values():
            layer.lora_B.zero_()
        assert (forward()[0] - out_s).abs().max() > 1e-2


def expected_adapter_cost(model, aux, b: int, n_img: int, n_txt: int, r: int) -> int:
    """The multiply-adds the adapters' two GEMMs should cost on the sliced path: each adapted layer pays
    rows·(inputs + outputs)·R for the rows (tokens) it computes and only the active heads' and groups'
    rows/columns (the union over the batch, as the sliced weights), routed tokens only where the base skips."""
    cfg, d = model.config, model.config.hidden_size
    heads = aux["head_masks"].any(0).sum(-1)  # (blocks,) active heads
    groups = aux["channel_masks"].any(0).sum(-1)  # (MLPs,) active groups
    kept = aux["token_masks"].sum((0, 2))  # (blocks,) routed image tokens over the batch
    every = aux["token_masks"].all(2).all(0)  # (blocks,) no image token skipped anywhere in the batch
    gs = cfg.mlp_hidden // cfg.groups
    cost = 0
    if "pixart" in type(model).__name__.lower():
        n = n_img
        cost += b * (d + 6 * d)  # t_block (adaLN-single) on the (B, D) embedding
        for i in range(cfg.depth):
            h, g = int(heads[i]) * cfg.head_dim, int(groups[i]) * gs
            c = int(aux["cross_masks"][:, i].any(0).sum()) * (d // cfg.num_heads) if "cross_masks" in aux else d
            cost += b * n * ((d + 3 * h) + (h + d))  # qkv rows / proj columns of the active heads
            cost += b * n * ((d + c) + (c + d)) + b * n_txt * (d + 2 * c)  # cross q, proj; k, v on the caption
            cost += int(kept[i]) * ((d + g) + (g + d))  # fc1 rows / fc2 columns, routed tokens only
        return cost * r
    hd, dm = cfg.head_dim, None
    for i in range(cfg.depth):  # double blocks: both streams' modulation, projections and MLPs
        h, gi, gt = int(heads[i]) * hd, int(groups[2 * i]) * gs, int(groups[2 * i + 1]) * gs
        cost += 2 * b * (d + 6 * d)
        cost += b * (n_img + n_txt) * ((d + 3 * h) + (h + d))
        cost += int(kept[i]) * 2 * (d + gi) + b * n_txt * 2 * (d + gt)
    for j in range(cfg.depth_single):
        i = cfg.depth + j
        h, m = int(heads[i]) * hd, int(groups[2 * cfg.depth + j]) * gs
        n = n_img + n_txt
        cost += b * (d + 3 * d)  # modulation
        if bool(every[i]):  # one fused GEMM each
            cost += b * n * ((d + 3 * h + m) + (h + m + d))
            continue
        k = b * n_txt + int(kept[i])  # the MLP share runs on the text and the routed image tokens
        cost += b * n * (d + 3 * h) + k * (d + m)  # linear1: q, k, v rows for all; MLP rows for the kept
        if cfg.single_token_skip == "output":
            cost += k * (h + m + d)  # linear2, the whole of it for the kept tokens only
        else:
            cost += b * n * (h + d) + k * (m + d)  # attention columns for all, MLP columns for the kept
    del dm
    return cost * r


@pytest.mark.parametrize("method", ["lora", "tdlora"])
@pytest.mark.parametrize("name,kw", [CASES[0], CASES[1], CASES[3], CASES[4]])
def test_sliced_adapters_pay_only_for_active_units_and_routed_tokens(name, kw, method):
    m = adapted(name, method, **kw)
    forward, n_img, n_txt = call(m, shared_t=False)

    def run(mode):
        m.dynamic_exec = mode
        return lambda: forward()[1]

    sliced, aux = _adapter_cost(m, run("sliced"))
    masked, _ = _adapter_cost(m, run("masked"))
    assert sliced == expected_adapter_cost(m, aux, 4, n_img, n_txt, RANK)
    assert sliced < 0.8 * masked
    counts = []
    for mode in ("sliced", "masked"):
        with FlopCounterMode(display=False) as fc:
            run(mode)()
        counts.append(fc.get_total_flops())
    assert counts[0] < 0.8 * counts[1]  # the whole sliced forward computes less


def test_flux_tdlora_gates_read_the_timestep_and_guidance_embedding():
    """The gate input is time_in(t) + guidance_in(g), as the width routers read; the (t, g) embedding runs
    before every other layer, so adapted embeddings are gated on this forward's t; schnell has no g."""
    for name in ("dyflux-dev", "flux-schnell"):
        m = tiny_flux(name, mlp_groups=4) if name.startswith("dy") else tiny_flux(name)
        report = apply_lora(m, LoraSpec(method="tdlora", rank=RANK, experts=2,
                                        targets=("attention", "mlp", "adaLN", "embeddings")), full=routers(m))
        assert "img_in" in report.adapted and "vector_in.in_layer" in report.adapted
        assert not any(n.startswith(("time_in", "guidance_in")) for n in report.adapted)  # never gated on itself
        assert any(n.endswith("linear1") for n in report.adapted)  # a fused attention + MLP layer is adapted
        _fill_adapters(m, std=0.2)
        seen = {}
        for mod in ("time_in", "guidance_in"):
            if getattr(m, mod) is not None:
                getattr(m, mod).register_forward_hook(lambda _m, _a, out, mod=mod: seen.__setitem__(mod, out))
        x, t, te, tp = flux_inputs(batch=2)
        kw = {"guidance": torch.tensor([2.0, 5.0])} if m.config.guidance_embed else {}
        with torch.no_grad():
            out = m.eval()(x, t, te, tp, **kw)
        source = next(iter(lora_layers(m).values())).source
        torch.testing.assert_close(source.value, sum(seen.values()), rtol=0, atol=0)
        if m.config.guidance_embed:  # the same t, another g: other gates, another output
            with torch.no_grad():
                other = m(x, t, te, tp, guidance=torch.tensor([5.0, 2.0]))
            assert (other - out).abs().max() > 1e-3 and not torch.equal(source.value, sum(seen.values()) * 0)


def test_diffusers_loads_our_flux_lora_with_its_own_loader_and_matches_our_output(tmp_path):
    """Plain LoRA on every layer kind (fused qkv and single-block linear1 split into to_q/to_k/to_v/proj_mlp,
    the final adaLN's swapped halves), written in diffusers' layout, loaded by `FluxTransformer2DModel.
    load_lora_adapter` (what the pipeline's `load_lora_weights` calls for its transformer)."""
    pytest.importorskip("peft")
    from models.lora.diffusers_format import save_diffusers_lora
    from tests.flux_helpers import diffusers_forward
    from tests.test_flux_convert import _diffusers_from_ours

    ours = tiny_flux("flux-dev", std=0.1).eval()
    theirs = _diffusers_from_ours(ours)
    x, t, te, tp = flux_inputs(batch=2, hw=(8, 12))
    g = torch.tensor([2.0, 4.5])
    with torch.no_grad():
        base = ours(x, t, te, tp, guidance=g)
    apply_lora(ours, LoraSpec(rank=RANK, alpha=8.0, targets=("attention", "mlp", "adaLN", "final_layer", "embeddings")))
    assert {"single_blocks.0.linear1", "final_layer.adaLN_modulation.1", "double_blocks.0.txt_attn.qkv"} <= set(lora_layers(ours))
    _fill_adapters(ours, std=0.1)
    path = save_diffusers_lora(ours, tmp_path / "lora")
    theirs.load_lora_adapter(str(path.parent), prefix="transformer", weight_name=path.name)
    with torch.no_grad():
        want = ours(x, t, te, tp, guidance=g)
        got = diffusers_forward(theirs, x, t, te, tp, guidance=g)
    # fp32, the same products in another order (separate vs fused projections and adapters)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (want - base).abs().max() > 0.1  # the adapters changed the output: the load did something


def test_diffusers_loads_our_pixart_lora_through_the_peft_mixin_and_matches_our_output(tmp_path):
    """diffusers 0.39's `PixArtTransformer2DModel` has no LoRA loader (`load_lora_adapter`): the test adds
    `PeftAdapterMixin`, as diffusers does for every class it supports LoRA on (the DiT test does the same)."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from diffusers.loaders.peft import PeftAdapterMixin

    from models.lora.diffusers_format import save_diffusers_lora
    from tests.test_pixart_convert import L, TINY, inputs, reference

    assert not hasattr(diffusers.PixArtTransformer2DModel, "load_lora_adapter")  # the fact the docstring states
    torch.manual_seed(0)
    diffusers.PixArtTransformer2DModel(**TINY).save_pretrained(tmp_path / "pixart")
    ours = load_pretrained(tmp_path / "pixart", model_max_length=L)
    apply_lora(ours, LoraSpec(rank=RANK, alpha=8.0, targets=("attention", "mlp", "adaLN", "final_layer", "embeddings")))
    assert {"blocks.0.cross_attn.kv_linear", "t_block.1", "y_embedder.y_proj.fc1"} <= set(lora_layers(ours))
    _fill_adapters(ours, std=0.2)
    path = save_diffusers_lora(ours, tmp_path / "lora")

    class PixArtWithLoRA(PeftAdapterMixin, diffusers.PixArtTransformer2DModel):
        pass

    theirs = PixArtWithLoRA.from_pretrained(tmp_path / "pixart").eval()
    base_x = inputs((8, 12))
    base = reference(theirs, *base_x)
    theirs.load_lora_adapter(str(path.parent), prefix="transformer", weight_name=path.name)
    with torch.no_grad():
        want = ours(*base_x)
    torch.testing.assert_close(reference(theirs, *base_x), want, rtol=2e-5, atol=2e-5)
    assert (want - base).abs().max() > 1e-1


def test_lora_layers_are_sliced_like_their_base_in_flux_attention():
    """A sliced FLUX attention projection with an adapter is the full adapted layer's output restricted to
    the active heads' rows (qkv) or columns (proj): the adapter is sliced with the weight."""
    from models.dynamic import UnitSelection
    from models.flux_layers import SelfAttention

    torch.manual_seed(0)
    attn = SelfAttention(32, 4, True)
    for name in ("qkv", "proj"):
        setattr(attn, name, _fill_adapters(LoRALinear.from_linear(getattr(attn, name), rank=RANK, alpha=4.0)))
    heads = UnitSelection(index=torch.tensor([0, 2]), mask=None, total=4)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        q, k, v = attn.project(x, heads)
        fq, fk, fv = attn.project(x, None)
        torch.testing.assert_close(v, fv[:, [0, 2]], **TOL)
        o = torch.randn(2, 5, 2, 8)
        full_o = torch.zeros(2, 5, 4, 8)
        full_o[:, :, [0, 2]] = o
        torch.testing.assert_close(attn.output(o, heads), attn.output(full_o, None), **TOL)
