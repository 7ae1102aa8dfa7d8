"""diffusers `DiTTransformer2DModel` as the oracle for `load_pretrained` of a diffusers directory.

A tiny random-weight diffusers DiT is saved with `save_pretrained`. Two of its differences from
the official DiT are removed before comparing, because our model computes the official function:
its per-block embedder copies are made identical and `time_proj.downscale_freq_shift` is set to 0
(diffusers divides the frequencies by half−1); `norm_eps=1e-6` matches the official pre-MLP LN.
"""
import json
import shutil

import pytest
import torch

from models import load_pretrained
from models.convert import CheckpointError, read_checkpoint
from models.convert_diffusers import EmbedderMismatchError

diffusers = pytest.importorskip("diffusers")

TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
            sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6)
# fp32, same operations up to summation order (fused qkv vs three linears): measured max |Δ| = 0.0
# on CPU, so 1e-5 leaves room for other BLAS/SDPA back ends while the tests below show that a real
# difference (frequency shift, a mis-mapped key) is orders of magnitude larger.
TOL = dict(rtol=1e-5, atol=1e-5)


def _set_freq_shift(model, shift: float) -> None:
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = shift


def tiny_diffusers(seed: int = 0, **kw):
    torch.manual_seed(seed)
    m = diffusers.DiTTransformer2DModel(**{**TINY, **kw})
    with torch.no_grad():  # adaLN and output layers start at zero: make every weight matter
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    shared = m.transformer_blocks[0].norm1.emb.state_dict()
    for block in m.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(shared)
    _set_freq_shift(m, 0)
    return m.eval()


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0.0, 17.0, 500.5, 999.0])
    y = torch.tensor([0, 3, 9, 10])  # 10 = the guidance null class
    return x, t, y


@torch.no_grad()
def test_diffusers_directory_matches_diffusers_oracle(tmp_path):
    ref_model = tiny_diffusers()
    ref_model.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    cfg = ours.config
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.input_size) == (32, 2, 2, 2, 8)
    assert (cfg.num_classes, cfg.class_dropout_prob, cfg.learn_sigma) == (10, 0.1, True)
    x, t, y = inputs()
    ref = ref_model(x, timestep=t, class_labels=y).sample
    out = ours(x, t, y)
    assert out.shape == ref.shape == (4, 8, 8, 8)
    torch.testing.assert_close(out, ref, **TOL)
    # Sensitivity: diffusers' default frequency shift is a different function, far outside TOL.
    _set_freq_shift(ref_model, 1)
    assert (ref_model(x, timestep=t, class_labels=y).sample - out).abs().max() > 1e-2


@torch.no_grad()
def test_diffusers_bin_weights_and_pipeline_directory(tmp_path):
    ref_model = tiny_diffusers(seed=3)
    pipe = tmp_path / "pipe"
    ref_model.save_pretrained(pipe / "transformer", safe_serialization=False)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    assert (pipe / "transformer" / "diffusion_pytorch_model.bin").is_file()
    ckpt = read_checkpoint(pipe)
    assert ckpt.format == "diffusers"
    x, t, y = inputs()
    torch.testing.assert_close(load_pretrained(pipe)(x, t, y), ref_model(x, timestep=t, class_labels=y).sample, **TOL)


def test_per_block_embedder_mismatch_is_detected(tmp_path):
    m = tiny_diffusers()
    with torch.no_grad():
        m.transformer_blocks[1].norm1.emb.timestep_embedder.linear_2.bias.add_(1e-3)
    m.save_pretrained(tmp_path)
    with pytest.raises(EmbedderMismatchError, match=r"block 1: norm1\.emb\.timestep_embedder\.linear_2\.bias"):
        load_pretrained(tmp_path)


def test_unsupported_diffusers_config_is_refused(tmp_path):
    tiny_diffusers().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "activation_fn": "gelu"}))
    with pytest.raises(ValueError, match="activation_fn='gelu'"):
        load_pretrained(tmp_path)


def test_directory_without_weights_names_what_it_found(tmp_path):
    tiny_diffusers().save_pretrained(tmp_path)
    shutil.move(tmp_path / "diffusion_pytorch_model.safetensors", tmp_path / "weights.safetensors")
    with pytest.raises(CheckpointError, match=r"not a diffusers model directory.*weights\.safetensors"):
        load_pretrained(tmp_path)


def test_diffusers_safetensors_file_beside_its_config(tmp_path):
    """The weights file itself (not the directory) also loads, using the config.json beside it."""
    ref_model = tiny_diffusers(seed=5)
    ref_model.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path / "diffusion_pytorch_model.safetensors")
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, y), ref_model(x, timestep=t, class_labels=y).sample, **TOL)


@torch.no_grad()
def test_sharded_diffusers_weights_and_launch_convert(tmp_path, capsys):
    from launch.convert import main as convert_main

    ref_model = tiny_diffusers(seed=7)
    ref_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    out = tmp_path / "teacher.safetensors"
    assert convert_main([str(tmp_path / "sharded"), str(out)]) == 0
    assert capsys.readouterr().out.startswith("diffusers ")
    x, t, y = inputs()
    torch.testing.assert_close(load_pretrained(out)(x, t, y), ref_model(x, timestep=t, class_labels=y).sample, **TOL)
