"""The PixArt-Σ recipes in configs/pixart/ pass the trainer's whole validation (family checks included)
with stand-ins for the teacher and the shards, and say what LiT's and DyDiT's papers prescribe."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from models import model_config
from models.convert import save_safetensors
from trainer.config import ConfigError, load_config

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "pixart"


def stand_in_teacher(path: Path, input_size: int) -> Path:
    """A PixArt-Σ-XL/2 teacher as the validation sees it: our safetensors header (config metadata), which
    is all `trainer.validate` reads; no 0.6 B weights are written."""
    save_safetensors({"stand_in": torch.zeros(1)}, model_config("pixart-sigma-xl/2", input_size=input_size), path)
    return path


def load(name: str, tmp_path: Path, **teacher_kw):
    raw = yaml.safe_load((RECIPES / name).read_text())
    input_size = teacher_kw.get("input_size", raw["student"]["args"]["input_size"])
    teacher = stand_in_teacher(tmp_path / "teacher.safetensors", input_size)
    (tmp_path / "shards").mkdir(exist_ok=True)
    return load_config(RECIPES / name, [f"teacher.path={teacher}", f"data.path={tmp_path / 'shards'}"], world_size=8)


def test_every_recipe_is_here():
    assert sorted(p.name for p in RECIPES.glob("*.yaml")) == [
        "dydit-pixart-sigma-1024-l0.6.yaml", "dylit-pixart-sigma-1024.yaml", "lit-pixart-sigma-1024.yaml",
        "lit-pixart-sigma-512.yaml"]


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_recipe_validates_with_a_teacher_and_shards(name, tmp_path):
    cfg = load(name, tmp_path)
    student = model_config(cfg.student.model, **cfg.student.args)
    resolution = 512 if "512" in name else 1024
    assert student.input_size * 8 == resolution and student.pe_scale == resolution / 512
    assert cfg.data.image_size == resolution and cfg.data.buckets and cfg.data.cond == "text_emb" and cfg.data.input == "latent"
    assert cfg.teacher.shard and cfg.student.init == "inherit"
    assert cfg.engine.kind == "fsdp" and cfg.engine.activation_checkpointing == "full" and cfg.ema.decay == 0.9999
    assert (cfg.distill.lambda_noise, cfg.distill.lambda_var, cfg.optim.lr, cfg.train.steps) == (1.0, 0.05, 2e-5, 45400)
    assert cfg.diffusion.objective == "gaussian" and cfg.diffusion.cfg_dropout == 0.1
    if "lit" in name:
        assert student.attention == "linear" and student.self_heads == 2 and student.dwc_kernel == 5
        assert student.num_heads == 16  # cross-attention keeps the teacher's heads (inherited)
    if name.startswith("dy"):
        assert student.dynamic and cfg.dynamic.flops_target == 0.6 and cfg.dynamic.complete_model_loss


def test_a_teacher_at_another_resolution_is_refused(tmp_path):
    # the 512 recipe pointed at the 1024-px checkpoint: positions would not match
    with pytest.raises(ConfigError, match="input_size"):
        load("lit-pixart-sigma-512.yaml", tmp_path, input_size=128)
