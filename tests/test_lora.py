"""LoRA and TD-LoRA in the models (models/lora): the layer against a dense reference, freezing, masked =
sliced with adapters on, what the sliced path pays, merging and export, any family through the protocol."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from models import build_model, load_pretrained
from models.diffusion import build_objective
from models.diffusion.samplers import sample
from models.lora import LoRALinear, LoraSpec, TimestepSource, adapter_state_dict, apply_lora, lora_layers, merge_lora
from models.lora.files import save_adapted
from tests.helpers import randomize_, tiny, tiny_inputs
from tests.test_models_dynamic import _route_partially

ROUTERS = ("attn_rate", "mlp_rate", "token_selection")
# fp32, the same products summed in another order (a rank-R factor pair vs the merged dense weight,
# sliced vs masked rows): a few ulps of outputs of size ~10; a missing or mis-sliced adapter is O(1)
TOL = dict(rtol=1e-5, atol=1e-5)


def _fill_adapters(model, seed=0, std=0.3):
    """Non-zero B and gates (they start at zero), so the adapters change every output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in f".{name}":
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _routers(model):
    return [n for n, _ in model.named_parameters() if any(r in n for r in ROUTERS)]


def _adapted(name, method, seed=3, **kw):
    torch.manual_seed(0)
    m = _route_partially(randomize_(tiny(name, depth=3, **kw), seed=seed))
    apply_lora(m, LoraSpec(method=method, rank=4, alpha=6.0, experts=2), full=_routers(m))
    return _fill_adapters(m)


def test_lora_and_tdlora_layers_match_their_dense_definitions():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    t_emb = torch.randn(3, 4)
    source = TimestepSource()
    source(None, None, t_emb)
    x = torch.randn(3, 7, 6)
    plain = _fill_adapters(LoRALinear.from_linear(base, rank=4, alpha=2.0))
    w = base.weight + 0.5 * plain.lora_B @ plain.lora_A  # (α/R)·B·A
    torch.testing.assert_close(plain(x), F.linear(x, w, base.bias), **TOL)
    torch.testing.assert_close(plain.to_linear()(x), plain(x), **TOL)

    td = _fill_adapters(LoRALinear.from_linear(base, rank=4, alpha=2.0, experts=2, gate_dim=4, source=source))
    gates = 2 * torch.softmax(t_emb @ td.lora_gate.weight.T + td.lora_gate.bias, dim=-1)  # K·softmax
    for i in range(3):  # per sample: Σ_k g_k(t_i) B_k A_k, experts of rank 2
        dw = sum(gates[i, k] * td.lora_B[:, 2 * k:2 * k + 2] @ td.lora_A[2 * k:2 * k + 2] for k in range(2))
        torch.testing.assert_close(td(x)[i], F.linear(x[i], base.weight + 0.5 * dw, base.bias), **TOL)
    # the (B, D) input of an adaLN layer, and tokens gathered from the flattened batch, take their sample's gate
    torch.testing.assert_close(td(x[:, 0]), td(x)[:, 0], **TOL)
    from models.dynamic import rows_from_samples

    rows, samples = x.reshape(-1, 6)[[0, 8, 20]], torch.tensor([0, 1, 2])
    with rows_from_samples(samples):
        got = td(rows)
    torch.testing.assert_close(got, td(x).reshape(-1, 5)[[0, 8, 20]], **TOL)
    with pytest.raises(ValueError, match="depends on the timestep"):
        td.merged_weight()


def test_tdlora_starts_as_the_plain_lora_of_the_same_rank_then_changes_with_t():
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 8)
    source = TimestepSource()
    plain = _fill_adapters(LoRALinear.from_linear(base, rank=4, alpha=4.0))
    td = LoRALinear.from_linear(base, rank=4, alpha=4.0, experts=2, gate_dim=3, source=source)
    td.lora_A.data.copy_(plain.lora_A)
    td.lora_B.data.copy_(plain.lora_B)
    x = torch.randn(2, 5, 8)
    source(None, None, torch.randn(2, 3))
    torch.testing.assert_close(td(x), plain(x), rtol=0, atol=0)  # zero gate: K·softmax(0) = 1 exactly
    with torch.no_grad():
        td.lora_gate.weight.normal_()
    out = td(x)
    assert (out - plain(x)).abs().max() > 1e-2
    assert (out[0] - td(x[1:2].expand(2, -1, -1))[0]).abs().max() > 1e-3  # sample 0 and 1: other t, other ΔW


@pytest.mark.parametrize("name", ["dydit-s/2", "lit-s/2"])
def test_only_adapters_and_newly_initialised_parts_get_gradients(name):
    from models.inherit import default_exclude, inherit_weights

    torch.manual_seed(0)
    teacher = randomize_(tiny("dit-s/2"))
    student = tiny(name)
    report = inherit_weights(student, teacher.state_dict(), default_exclude(teacher.config, student.config))
    full = sorted(set(report.initialised + report.skipped) & dict(student.named_parameters()).keys())
    lr = apply_lora(student, LoraSpec(method="tdlora", rank=4, experts=2), full=full)
    assert full and all(k in lr.trainable for k in full)
    if "lit" in name:  # the new attention trains fully and gets no adapter; its DWC too
        assert any(".attn.qkv.weight" in k for k in full) and any(".dwc." in k for k in full)
        assert not any(".attn." in n for n in lr.adapted)
    else:  # the routers train fully and are never adapted
        assert set(full) == set(_routers(student))
        assert any(".attn.qkv" in n for n in lr.adapted) and not any("rate" in n or "token_sel" in n for n in lr.adapted)
    x, t, y = tiny_inputs()
    _fill_adapters(student, std=0.05)
    out, aux = student.train()(x, t, y, return_aux=True)
    (out.square().mean() + (aux["flops_ratio"].mean() if aux else 0)).backward()
    for n, p in student.named_parameters():
        if n in lr.frozen:
            assert not p.requires_grad and p.grad is None, n
    got = {n for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    adapters = {n for n in lr.trainable if ".lora_" in n}
    assert adapters and adapters <= got  # every adapter tensor (A, B, gates) learns
    assert len(got & set(full)) > len(full) // 2
    from torch.optim import AdamW

    opt = AdamW([p for p in student.parameters() if p.requires_grad])
    opt.step()
    assert {id(p) for p in opt.state} == {id(p) for p in student.parameters() if p.requires_grad}  # no state for the base
    # a deep copy (the EMA makes one) has its own timestep source, fed by its own embedder
    twin = copy.deepcopy(student).eval()
    source = next(m for m in student.modules() if isinstance(m, LoRALinear)).source
    twin_source = next(m for m in twin.modules() if isinstance(m, LoRALinear)).source
    assert twin_source is not source
    before = source.value
    with torch.no_grad():
        torch.testing.assert_close(twin(x, t, y), student.eval()(x, t, y))
        twin(x, t.flip(0), y)
    assert source.value is not before  # the student's own forward fed it; the twin's fed the twin's source
    torch.testing.assert_close(twin_source.value.flip(0), source.value)


@pytest.mark.parametrize("method", ["lora", "tdlora"])
@pytest.mark.parametrize("name", ["dydit-s/2", "dylit-s/2"])
@pytest.mark.parametrize("shared_t", [True, False])
def test_masked_and_sliced_paths_agree_with_adapters_on(name, method, shared_t):
    m = _adapted(name, method).eval()
    x, t, y = tiny_inputs(batch=4)
    if shared_t:
        t = torch.full_like(t, 421.0)
    with torch.no_grad():
        m.dynamic_exec = "masked"
        out_masked, aux_m = m(x, t, y, return_aux=True)
        m.dynamic_exec = "sliced"
        out_sliced, aux_s = m(x, t, y, return_aux=True)
    assert (aux_s["flops_ratio"] < 0.95).all()  # units and tokens really skipped
    assert not aux_s["token_masks"].all() and not aux_s["channel_masks"].all()
    for k in ("head_masks", "channel_masks", "token_masks"):
        assert torch.equal(aux_m[k], aux_s[k])
    torch.testing.assert_close(out_sliced, out_masked, **TOL)
    # the adapters matter: without them (B = 0) the output moves far outside the tolerance
    with torch.no_grad():
        for layer in lora_layers(m).values():
            layer.lora_B.zero_()
        assert (m(x, t, y) - out_sliced).abs().max() > 1e-2


def _adapter_cost(model, run):
    """Multiply-adds of the adapters' two GEMMs (per call: rows·(in_used·R + R·out_used)), recorded from
    the shapes each `lora_delta` call actually receives."""
    calls = []
    original = LoRALinear.lora_delta

    def recording(self, x, rows=None, cols=None):
        in_used = x.shape[-1]
        out_used = self.out_features if rows is None else rows.numel()
        calls.append(x.numel() // in_used * (in_used + out_used) * self.rank)
        return original(self, x, rows=rows, cols=cols)

    LoRALinear.lora_delta = recording
    try:
        with torch.no_grad():
            aux = run()
    finally:
        LoRALinear.lora_delta = original
    return sum(calls), aux


@pytest.mark.parametrize("method", ["lora", "tdlora"])
def test_sliced_adapters_pay_only_for_active_units_and_routed_tokens(method):
    """The exact adapter cost of a sliced forward from its masks (union of heads and groups over the
    batch, routed tokens only); the masked path pays for every unit and token; the whole sliced forward
    counts fewer FLOPs."""
    m = _adapted("dydit-s/2", method).eval()
    cfg = m.config
    x, t, y = tiny_inputs(batch=4)
    b, n, d, r = 4, cfg.num_tokens, cfg.hidden_size, 4
    hd, gs = cfg.head_dim, cfg.mlp_hidden // cfg.groups

    def forward(mode):
        m.dynamic_exec = mode
        return lambda: m(x, t, y, return_aux=True)[1]

    sliced, aux = _adapter_cost(m, forward("sliced"))
    masked, _ = _adapter_cost(m, forward("masked"))
    expected = 0
    for i in range(cfg.depth):
        heads = int(aux["head_masks"][:, i].any(0).sum()) * hd
        groups = int(aux["channel_masks"][:, i].any(0).sum()) * gs
        routed = int(aux["token_masks"][:, i].sum())
        expected += b * n * ((d + 3 * heads) + (heads + d)) * r  # qkv: rows of the active heads; proj: their columns
        expected += routed * ((d + groups) + (groups + d)) * r  # fc1 rows / fc2 columns, routed tokens only
        expected += b * (d + 6 * d) * r  # adaLN on the (B, D) condition
    full = cfg.depth * (b * n * (4 * d + 2 * d + 2 * (d + cfg.mlp_hidden)) + b * 7 * d) * r
    assert sliced == expected
    assert masked == full and sliced < 0.8 * masked
    with FlopCounterMode(display=False) as fc_s:
        forward("sliced")()
    with FlopCounterMode(display=False) as fc_m:
        forward("masked")()
    assert fc_s.get_total_flops() < 0.8 * fc_m.get_total_flops()


def test_merge_folds_plain_lora_and_keeps_tdlora_as_a_runtime_module(tmp_path):
    for method in ("lora", "tdlora"):
        m = _adapted("dydit-s/2", method).eval()
        x, t, y = tiny_inputs(batch=4)
        with torch.no_grad():
            ref = m(x, t, y)
            merged = merge_lora(m)
        assert bool(merged) == (method == "lora")
        assert bool(lora_layers(m)) == (method == "tdlora")
        if method == "lora":
            assert not any(".lora_" in k for k in m.state_dict())  # the teacher's names only: a plain file
            assert set(m.state_dict()) == set(tiny("dydit-s/2", depth=3).state_dict())
        with torch.no_grad():
            torch.testing.assert_close(m(x, t, y), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "tdlora"])
def test_exported_adapted_model_loads_back_and_samples_the_same(tmp_path, method):
    """An adapted model written with its adapters (TD-LoRA kept at runtime, plain LoRA also merged)
    loads through load_pretrained and gives the same forward and the same short sampling loop."""
    m = _adapted("dydit-s/2", method).eval()
    bare = copy.deepcopy(m)
    for layer in lora_layers(bare).values():
        layer.lora_B.data.zero_()
    save_adapted(m, tmp_path / "a.safetensors")
    back = load_pretrained(tmp_path / "a.safetensors")
    assert set(adapter_state_dict(back)) == set(adapter_state_dict(m))
    x, t, y = tiny_inputs(batch=4)
    obj = build_objective("gaussian", num_timesteps=1000)
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def loop(model):
        return sample(model, obj, noise, {"y": y}, steps=5, method="ddim")

    with torch.no_grad():
        ref, ref_samples = m(x, t, y), loop(m)
        torch.testing.assert_close(back(x, t, y), ref, rtol=0, atol=0)
        if method == "lora":
            merge_lora(m)
            save_adapted(m, tmp_path / "merged.safetensors")
            back = load_pretrained(tmp_path / "merged.safetensors")
            assert not lora_layers(back)
            torch.testing.assert_close(back(x, t, y), ref, rtol=1e-5, atol=1e-4)
        # 5 DDIM steps through the sliced path of a randomised model (outputs of size ~10): the merged
        # weights' rounding (~1e-7 relative) grows to at most 3.8e-4 here; a lost adapter moves samples by O(1)
        torch.testing.assert_close(loop(back), ref_samples, rtol=1e-3, atol=1e-3)
        assert (ref_samples - loop(bare)).abs().max() > 0.1


def test_toy_family_gets_adapters_through_the_protocol():
    """A family defined outside models/ (two stacks, its own timestep module `time`) adapts, trains and merges."""
    from models.registry import model_config

    for name in ("tests.toy_family:toy-s", "tests.toy_family:lit-toy-s"):
        torch.manual_seed(0)
        m = build_model(model_config(name))
        report = apply_lora(m, LoraSpec(method="tdlora", rank=4, experts=2, targets=("attention", "mlp")))
        assert any(n.startswith("decoder.") for n in report.adapted) and any(n.startswith("encoder.") for n in report.adapted)
        _fill_adapters(m, std=0.05)
        x, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
        out = m(x, torch.tensor([10.0, 900.0]), y)
        out.square().mean().backward()
        assert all(p.grad is None for n, p in m.named_parameters() if n in report.frozen)
        assert all(m.get_submodule(n).lora_gate.weight.grad.abs().sum() > 0 for n in report.adapted)


def test_bad_specs_are_clear_errors():
    m = tiny("dydit-s/2")
    with pytest.raises(ValueError, match="peft.experts"):
        LoraSpec(method="tdlora", rank=6, experts=4).validate()
    with pytest.raises(ValueError, match="routers are newly initialised"):
        LoraSpec(targets=("routers",)).validate()
    with pytest.raises(ValueError, match="selects no linear layer"):
        apply_lora(m, LoraSpec(modules=("nothing.*",)))
    apply_lora(m, LoraSpec())
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(m, LoraSpec())


def test_diffusers_loads_our_lora_into_its_dit_and_matches_our_output(tmp_path):
    """Our plain LoRA in diffusers' layout (fused qkv split into to_q/to_k/to_v, `transformer.` prefix),
    loaded by diffusers' own `load_lora_adapter` (what `load_lora_weights` calls per component) with peft.
    diffusers 0.39's DiT classes have no LoRA loader mixin, so the test adds `PeftAdapterMixin`, as
    diffusers does for every class that supports LoRA; FLUX's `FluxTransformer2DModel` has it built in."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from diffusers.loaders.peft import PeftAdapterMixin

    from models.lora.diffusers_format import save_diffusers_lora
    from tests.test_models_convert_diffusers import _set_freq_shift, inputs, tiny_diffusers

    assert not hasattr(diffusers.DiTTransformer2DModel, "load_lora_adapter")  # the fact the docstring states
    ref = tiny_diffusers()
    ref.save_pretrained(tmp_path / "dit")
    ours = load_pretrained(tmp_path / "dit")
    apply_lora(ours, LoraSpec(rank=4, alpha=8.0, targets=("attention", "mlp", "adaLN", "final_layer", "embeddings")))
    _fill_adapters(ours, std=0.2)
    path = save_diffusers_lora(ours, tmp_path / "lora")

    class DiTWithLoRA(PeftAdapterMixin, diffusers.DiTTransformer2DModel):
        pass

    theirs = DiTWithLoRA.from_pretrained(tmp_path / "dit")
    _set_freq_shift(theirs, 0)
    theirs.load_lora_adapter(str(path.parent), prefix="transformer", weight_name=path.name)
    x, t, y = inputs()
    with torch.no_grad():
        got = theirs.eval()(x, timestep=t, class_labels=y).sample
        want = ours(x, t, y)
        base = ref(x, timestep=t, class_labels=y).sample
    # fp32, same products in another order (three adapters on q, k, v vs one on the fused qkv)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (base - want).abs().max() > 1e-1  # the adapters changed the output: the load did something


def test_diffusers_export_refuses_what_diffusers_cannot_express():
    from models.lora.diffusers_format import diffusers_lora_state_dict

    m = tiny("dit-s/2")
    apply_lora(m, LoraSpec(method="tdlora", rank=4, experts=2))
    with pytest.raises(ValueError, match="TD-LoRA"):
        diffusers_lora_state_dict(m)
    lit = tiny("lit-s/2")
    apply_lora(lit, LoraSpec(targets=("mlp",)))
    with pytest.raises(ValueError, match="linear attention"):
        diffusers_lora_state_dict(lit)
    plain = tiny("dit-s/2")
    apply_lora(plain, LoraSpec(rank=4))
    sd, rank = diffusers_lora_state_dict(plain)
    assert rank == 4 and "transformer.transformer_blocks.0.attn1.to_k.lora_B.weight" in sd
