"""FLUX's conditioning: what a batch must hold, the null text and guidance dropout, guidance values
(default, schnell's refusal), classifier-free guidance batching, and the bf16 time rounding of BFL and
diffusers (T2I trap 7) checked against diffusers' own timestep projection input."""
from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel

from models.diffusion import build_objective
from models.diffusion.samplers import sample
from models.flux import bfl_embedding_input
from tests.flux_helpers import DIFFUSERS_TINY, flux_inputs, tiny_flux


def test_condition_reads_t5_and_clip_pooled_and_names_what_is_missing():
    m = tiny_flux()
    emb, pooled = torch.randn(2, 6, 32), torch.randn(2, 24)
    cond = m.condition({"text_emb": emb, "text_mask": torch.ones(2, 6, dtype=torch.bool), "text_pooled": pooled})
    assert set(cond) == {"text_emb", "text_pooled"} and cond["text_emb"] is emb  # no mask: FLUX attends to all
    with pytest.raises(KeyError, match="text_pooled.*CLIP"):
        m.condition({"text_emb": emb, "text_mask": torch.ones(2, 6)})


def test_null_text_of_the_data_and_guidance_dropout():
    m = tiny_flux()
    null = {"text_emb": torch.randn(9, 32), "text_mask": torch.ones(9), "text_pooled": torch.randn(24)}
    m.set_null_condition(null)  # the data's T5 length (9) wins over config.text_len (6)
    assert m.null_text_emb.shape == (9, 32) and "null_text_emb" in m.state_dict()
    cond = {"text_emb": torch.randn(3, 9, 32), "text_pooled": torch.randn(3, 24), "guidance": torch.tensor([1.0, 2.0, 3.0])}
    out = m.drop_condition(cond, torch.tensor([True, False, True]))
    for i, dropped in enumerate((True, False, True)):
        assert torch.equal(out["text_emb"][i], null["text_emb"] if dropped else cond["text_emb"][i])
        assert torch.equal(out["text_pooled"][i], null["text_pooled"] if dropped else cond["text_pooled"][i])
    assert torch.equal(out["guidance"], cond["guidance"])  # dropout never touches the guidance value
    with pytest.raises(ValueError, match="null condition has 9"):
        m.drop_condition({"text_emb": torch.randn(1, 6, 32), "text_pooled": torch.randn(1, 24)}, torch.tensor([True]))
    with pytest.raises(ValueError, match=r"\(L, 32\)"):
        m.set_null_condition({"text_emb": torch.randn(9, 31), "text_pooled": torch.randn(24)})


def test_classifier_free_guidance_batches_the_null_text_with_the_guidance():
    m = tiny_flux().eval()
    m.set_null_condition({"text_emb": torch.randn(6, 32), "text_pooled": torch.randn(24)})
    x, _, te, tp = flux_inputs()
    cond = {"text_emb": te, "text_pooled": tp, "guidance": torch.tensor([2.0, 4.0])}
    flow = build_objective("flow")
    guided = sample(m, flow, x, cond, null_cond=m.null_condition(cond), cfg_scale=3.0, steps=2, method="euler")

    def by_hand(xx, tt):  # uncond + s·(cond − uncond), each half with its own guidance value
        c = m(xx, tt, **cond)
        u = m(xx, tt, **m.null_condition(cond))
        return u + 3.0 * (c - u)

    ref = sample(by_hand, flow, x, {}, steps=2, method="euler")
    torch.testing.assert_close(guided, ref, rtol=1e-5, atol=1e-5)


def test_guidance_default_and_per_sample_values():
    m = tiny_flux().eval()
    x, t, te, tp = flux_inputs()
    assert torch.equal(m(x, t, te, tp), m(x, t, te, tp, guidance=torch.full((2,), 3.5)))
    assert not torch.equal(m(x, t, te, tp), m(x, t, te, tp, guidance=torch.tensor([3.5, 1.0])))


def test_bf16_time_and_guidance_rounding_is_diffusers_and_bfls():
    """diffusers (like BFL) rounds σ to bf16 and multiplies by 1000 in bf16 before the sinusoid; we get
    t·1000 from the objective and must hand the sinusoid the same numbers."""
    ref = FluxTransformer2DModel(**DIFFUSERS_TINY, guidance_embeds=True).to(torch.bfloat16).eval()
    seen = []
    ref.time_text_embed.time_proj.register_forward_hook(lambda mod, args, out: seen.append(args[0].float()))
    sigma = torch.tensor([0.123456, 0.987654, 0.5003, 0.000731])
    g = torch.tensor([3.5, 1.3, 7.77, 2.2])
    with torch.no_grad():
        ref(hidden_states=torch.zeros(4, 4, 16, dtype=torch.bfloat16), encoder_hidden_states=torch.zeros(4, 3, 32, dtype=torch.bfloat16),
            pooled_projections=torch.zeros(4, 24, dtype=torch.bfloat16), timestep=sigma, img_ids=torch.zeros(4, 3),
            txt_ids=torch.zeros(3, 3), guidance=g)
    t_seen, g_seen = seen
    assert torch.equal(bfl_embedding_input(sigma * 1000, torch.bfloat16, scaled=True), t_seen)
    assert torch.equal(bfl_embedding_input(g, torch.bfloat16), g_seen)
    assert not torch.equal(t_seen, sigma * 1000)  # the rounding is real
    assert torch.equal(bfl_embedding_input(sigma * 1000, torch.float32, scaled=True), sigma * 1000)
