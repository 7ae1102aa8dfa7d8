"""`read_checkpoint(lazy=True)`: every format a teacher comes in gives the same names, config and
values as the whole read, with no tensor data read up front; the DiT diffusers converter's fused
`qkv` stays a concatenation of the file's q, k and v rows, so a rank reads only its rows."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from models import build_model
from models.convert import read_checkpoint, read_config, save_safetensors
from models.lazy import Concat, HeldTensor, SafetensorsTensor, materialise, read_rows
from tests.helpers import randomize_

diffusers = pytest.importorskip("diffusers")

TINY_DIFFUSERS = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                      sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6)


def _diffusers_dit(seed: int = 0):
    torch.manual_seed(seed)
    m = diffusers.DiTTransformer2DModel(**TINY_DIFFUSERS)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    shared = m.transformer_blocks[0].norm1.emb.state_dict()
    for block in m.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(shared)
    return m


def _ours(dtype=torch.float32):
    torch.manual_seed(0)
    m = randomize_(build_model("dit-s/2", depth=2, input_size=8, num_classes=10), seed=2)
    return {k: v.to(dtype) for k, v in m.state_dict().items()}, m.config


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    sd, cfg = _ours()
    save_safetensors(sd, cfg, root / "ours.safetensors")
    bf16, _ = _ours(torch.bfloat16)
    save_safetensors(bf16, cfg, root / "ours-bf16.safetensors")
    torch.save({"ema": sd, "model": {k: v + 1 for k, v in sd.items()}}, root / "official.pt")
    _diffusers_dit(1).save_pretrained(root / "diffusers")
    _diffusers_dit(2).save_pretrained(root / "sharded", max_shard_size="20KB")
    _diffusers_dit(3).save_pretrained(root / "bin", safe_serialization=False)
    assert (root / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    return root


@pytest.mark.parametrize("name", ["ours.safetensors", "ours-bf16.safetensors", "official.pt", "diffusers", "sharded", "bin"])
def test_lazy_read_equals_the_whole_read(files, name):
    whole = read_checkpoint(files / name)
    lazy = read_checkpoint(files / name, lazy=True)
    assert lazy.config == whole.config and lazy.format == whole.format
    assert lazy.state_dict.keys() == whole.state_dict.keys()
    for key, ref in whole.state_dict.items():
        t = lazy.state_dict[key]
        assert tuple(t.shape) == tuple(ref.shape) and t.dtype == ref.dtype, key
        assert torch.equal(materialise(t), ref), key
        if t.ndim and t.shape[0] > 2:
            assert torch.equal(read_rows(t, 1, 3), ref[1:3]), key
    if name.startswith("ours"):
        assert all(isinstance(t, SafetensorsTensor) for t in lazy.state_dict.values())
    if name == "official.pt":  # the EMA weights, memory-mapped
        assert all(isinstance(t, HeldTensor) for t in lazy.state_dict.values())


@pytest.mark.parametrize("name", ["diffusers", "sharded"])
def test_diffusers_qkv_is_a_lazy_concatenation_of_the_files_rows(files, name):
    lazy = read_checkpoint(files / name, lazy=True).state_dict
    qkv = lazy["blocks.1.attn.qkv.weight"]
    assert isinstance(qkv, Concat) and [type(p) for p in qkv.parts] == [SafetensorsTensor] * 3
    assert [p.key for p in qkv.parts] == [f"transformer_blocks.1.attn1.to_{c}.weight" for c in "qkv"]
    assert lazy["blocks.1.attn.proj.weight"].key == "transformer_blocks.1.attn1.to_out.0.weight"
    files_read = {p.file.path for p in qkv.parts}
    assert all(f.endswith(".safetensors") for f in files_read)


def test_read_config_of_a_pickle_reads_no_weights(files, monkeypatch):
    """`read_config` (validation, before any process group) of a non-safetensors file infers the config
    from the shapes of a memory-mapped load: no tensor is materialised."""
    monkeypatch.setattr(HeldTensor, "rows", lambda *a: pytest.fail("rows read"))
    monkeypatch.setattr(HeldTensor, "read", lambda *a: pytest.fail("tensor read"))
    cfg = read_config(files / "official.pt")
    assert (cfg.hidden_size, cfg.depth, cfg.num_classes) == (384, 2, 10)


def test_a_legacy_torch_file_is_read_whole_with_a_warning(tmp_path, caplog):
    sd, cfg = _ours()
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lazy = read_checkpoint(tmp_path / "legacy.pt", lazy=True)
    assert "cannot be memory-mapped" in caplog.text
    assert all(torch.equal(materialise(lazy.state_dict[k]), v) for k, v in sd.items())


def test_sharded_index_lists_each_tensor_in_its_own_shard(files):
    index = json.loads((files / "sharded" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    lazy = read_checkpoint(files / "sharded", lazy=True).state_dict
    fc1 = lazy["blocks.0.mlp.fc1.weight"]
    assert fc1.file.path.endswith(index["weight_map"]["transformer_blocks.0.ff.net.0.proj.weight"])
