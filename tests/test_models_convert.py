"""load_pretrained on official-style `.pt` files and our safetensors; errors; `launch.convert`."""
import argparse

import pytest
import torch
from safetensors.torch import load_file, save_file

from launch.convert import main as convert_main
from models import build_model, load_pretrained
from models.convert import CONFIG_METADATA_KEY, CheckpointError, load_state_dict_any, read_checkpoint
from tests.helpers import randomize_, tiny, tiny_inputs


def small_teacher(seed: int = 0, **kw):
    """dit-s width (384 → 6 heads, inferable from the registry) at toy depth and resolution."""
    return randomize_(build_model("dit-s/2", depth=1, input_size=8, num_classes=10, **kw), seed=seed).eval()


def tiny_teacher(seed: int = 0, **kw):
    """Width 48 (not a registry width, so loads pass num_heads=6): the cheapest real DiT."""
    return randomize_(tiny("dit-s/2", **kw), seed=seed).eval()


def same_function(a, b, num_classes: int = 10) -> bool:
    x, t, y = tiny_inputs(num_classes=num_classes)
    with torch.no_grad():
        return torch.equal(a(x, t, y), b(x, t, y))


def test_official_state_dict_round_trip_infers_architecture(tmp_path):
    model = small_teacher()
    path = tmp_path / "DiT-S-2-64x64.pt"
    torch.save(model.state_dict(), path)
    loaded = load_pretrained(path)
    assert loaded.config == model.config and not loaded.training
    assert same_function(model, loaded)


def test_training_checkpoint_prefers_ema_and_can_pick_model(tmp_path):
    ema, raw = tiny_teacher(seed=1), tiny_teacher(seed=2)
    path = tmp_path / "0400000.pt"
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict(), "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="DiT-S/2", image_size=64)}, path)  # as DiT's train.py
    assert same_function(load_pretrained(path, num_heads=6), ema)
    assert same_function(load_pretrained(path, prefer="model", num_heads=6), raw)


def test_ddp_prefix_is_stripped(tmp_path):
    model = small_teacher()
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "ddp.pt")
    assert same_function(load_pretrained(tmp_path / "ddp.pt"), model)


def test_heads_of_a_non_registry_width_must_be_given(tmp_path):
    model = tiny_teacher()  # hidden 48: no registry size to take heads from
    torch.save(model.state_dict(), tmp_path / "w48.pt")
    with pytest.raises(CheckpointError, match="num_heads="):
        load_pretrained(tmp_path / "w48.pt")
    assert same_function(load_pretrained(tmp_path / "w48.pt", num_heads=6), model)


def test_no_null_class_row_needs_num_classes(tmp_path):
    model = tiny_teacher(class_dropout_prob=0.0)
    torch.save(model.state_dict(), tmp_path / "nonull.pt")
    loaded = load_pretrained(tmp_path / "nonull.pt", num_classes=10, num_heads=6)
    assert loaded.config.class_dropout_prob == 0.0 and same_function(model, loaded)


@pytest.mark.parametrize("name", ["dit-s/2", "lit-s/2", "dydit-s/2", "dylit-s/2"])
def test_safetensors_round_trip_keeps_config_in_metadata(tmp_path, name):
    model = randomize_(tiny(name)).eval()
    sd, cfg = model.state_dict(), model.config
    from models.convert import save_safetensors

    save_safetensors(sd, cfg, tmp_path / "m.safetensors")
    loaded = load_pretrained(tmp_path / "m.safetensors")
    assert loaded.config == cfg and same_function(model, loaded)


def test_safetensors_without_metadata_is_inferred(tmp_path):
    model = tiny_teacher()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "plain.safetensors"))
    state, cfg = load_state_dict_any(tmp_path / "plain.safetensors", num_heads=6)
    assert cfg == model.config and state.keys() == model.state_dict().keys()


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere/DiT-XL-2-256x256.pt"):
        load_pretrained(tmp_path / "nowhere" / "DiT-XL-2-256x256.pt")


def test_mismatched_keys_name_the_path_and_the_keys(tmp_path):
    sd = tiny_teacher().state_dict()
    del sd["blocks.0.mlp.fc2.bias"]
    sd["blocks.0.attn.proj.weight"] = torch.zeros(48, 100)
    for i in range(7):
        sd[f"blocks.0.extra{i}.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(path, num_heads=6)
    msg = str(err.value)
    assert str(path) in msg
    assert "missing (1): blocks.0.mlp.fc2.bias" in msg
    assert "unexpected (7): blocks.0.extra0.weight" in msg and "(+2 more)" in msg
    assert "blocks.0.attn.proj.weight: file (48, 100) vs model (48, 48)" in msg


def test_student_keys_without_metadata_get_a_hint(tmp_path):
    model = randomize_(build_model("lit-s/2", depth=1, input_size=8, num_classes=10))
    torch.save(model.state_dict(), tmp_path / "lit.pt")
    with pytest.raises(CheckpointError, match="attention='linear'"):
        load_pretrained(tmp_path / "lit.pt", num_heads=2)


def _side_effect(path):  # would run on unpickling if weights_only were off
    open(path, "w").close()
    return {}


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return _side_effect, (self.path,)


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match=r"refused to unpickle.*_side_effect"):
        load_pretrained(path)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_corrupt_file_is_a_clear_error(tmp_path, suffix):
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(b"\x80\x02not a checkpoint at all" * 3)
    with pytest.raises(CheckpointError, match=f"corrupt{suffix}.*unreadable"):
        load_pretrained(path)


def test_state_dict_of_no_family_is_named(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="other.pt: cannot tell which model family.*no family recognises it.*encoder.weight"):
        load_pretrained(tmp_path / "other.pt")


def test_launch_convert_writes_our_layout(tmp_path, capsys):
    model = small_teacher(seed=4)
    src, out = tmp_path / "ckpt.pt", tmp_path / "out" / "teacher.safetensors"
    torch.save({"model": {k: v + 1 for k, v in model.state_dict().items()}, "ema": model.state_dict()}, src)
    assert convert_main([str(src), str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert "hidden=384" in line and "heads=6" in line and "params" in line and "\n" not in line
    assert set(load_file(str(out))) == set(model.state_dict())
    assert read_checkpoint(out).format == "safetensors"
    assert same_function(load_pretrained(out), model)
    assert convert_main([str(src), str(tmp_path / "m.safetensors"), "--prefer", "model"]) == 0


def test_launch_convert_heads_option_and_errors(tmp_path, capsys):
    model = tiny_teacher()
    torch.save(model.state_dict(), tmp_path / "w48.pt")
    assert convert_main([str(tmp_path / "w48.pt"), str(tmp_path / "a.safetensors")]) == 1
    assert "--num-heads" in capsys.readouterr().err
    assert convert_main([str(tmp_path / "w48.pt"), str(tmp_path / "a.safetensors"), "--num-heads", "6"]) == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert '"num_heads": 6' in f.metadata()[CONFIG_METADATA_KEY]
    assert convert_main([str(tmp_path / "missing.pt"), str(tmp_path / "b.safetensors")]) == 1
    assert "missing.pt" in capsys.readouterr().err
    assert convert_main([str(tmp_path / "w48.pt"), str(tmp_path / "b.pt")]) == 2


def test_loaded_model_is_fp32_trainable_and_materialised(tmp_path):
    model = tiny_teacher()
    torch.save({k: v.half() for k, v in model.state_dict().items()}, tmp_path / "half.pt")
    loaded = load_pretrained(tmp_path / "half.pt", num_heads=6)
    tensors = [*loaded.parameters(), *loaded.buffers()]
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
    assert all(p.requires_grad for p in loaded.parameters())
    model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    assert same_function(loaded, model)


def test_weights_digest_and_teacher_identity_ignore_safetensors_metadata_order(tmp_path):
    """safetensors writes its metadata map in random order, so one model saved twice can differ in its
    bytes; the digest (and so the teacher identity checked on resume) must not, and must see any
    change to a tensor."""
    from models.convert import save_safetensors, weights_digest
    from trainer.build import teacher_identity

    model = tiny_teacher()
    paths, identities = [], set()
    for i in range(16):
        paths.append(tmp_path / f"t{i}.safetensors")
        save_safetensors(model.state_dict(), model.config, paths[-1])
        save_safetensors(model.state_dict(), model.config, tmp_path / "teacher.safetensors")  # re-exported in place
        identities.add(teacher_identity(str(tmp_path / "teacher.safetensors"), model.config)["sha256"])
    assert len({weights_digest(p) for p in paths}) == 1
    assert len(identities) == 1
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[0, 0] += 1e-3
    save_safetensors(model.state_dict(), model.config, tmp_path / "changed.safetensors")
    assert weights_digest(tmp_path / "changed.safetensors") != weights_digest(paths[0])
