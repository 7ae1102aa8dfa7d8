"""PEFT through the real trainer (trainer/peft.py): checkpoints of the trainable tensors plus the base's
digest, kill -9 and relaunch bit for bit, 2 FSDP ranks, a changed base refused, export rebuilding the
base (adapters kept, merged, or in diffusers' layout), config errors."""
import math
import signal

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from tests.fault_utils import finish, kill9, last_step, losses_by_step, start, started_at, tail, train_cmd, wait_until
from tests.trainer_utils import TINY_ARGS, assert_ok, base_env, losses, run_train, write_config

MULTI_RANK_RTOL = 1e-5  # as tests/test_trainer_run.py: a sum of two half-batch means vs one mean


def _teacher(path, seed=1):
    from models import build_model
    from models.convert import save_safetensors
    from tests.helpers import randomize_

    torch.manual_seed(0)
    t = randomize_(build_model("dit-s/2", **TINY_ARGS), seed=seed, std=0.05)
    save_safetensors(t.state_dict(), t.config, path)
    return path


def _config(tmp_path, model="dydit-s/2", method="tdlora", **sections):
    teacher = tmp_path / "teacher.safetensors"
    if not teacher.exists():
        _teacher(teacher)
    args = {"mlp_groups": 2} if model.startswith("dy") else {}
    base = dict(student={"init": "inherit"}, teacher={"path": str(teacher)},
                peft={"method": method, "rank": 4, "experts": 2},
                dynamic={"hold_steps": 0, "warmup_steps": 4, "flops_target": 0.6},
                optim={"lr": 3e-3}, train={"steps": 8, "global_batch": 16, "log_every": 1})
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return write_config(tmp_path / f"{model.split('-')[0]}-{method}.yaml", model=model, args=args, **base)


def _stored(ckpt) -> dict[str, list[str]]:
    """Tensor names in a DCP checkpoint, by top-level entry (student, ema, optim)."""
    keys = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    out: dict[str, list[str]] = {}
    for k in keys:
        _, part, rest = k.split(".", 2)
        out.setdefault(part, []).append(rest)
    return out


def _trainable(cfg_path, run_dir) -> set[str]:
    from trainer.build import build_student, open_teacher
    from trainer.config import load_config

    cfg = load_config(cfg_path, [f"run_dir={run_dir}"], world_size=1)
    student, _ = build_student(cfg, open_teacher(cfg).checkpoint)
    return {n for n, p in student.named_parameters() if p.requires_grad}


def test_checkpoint_holds_only_trainable_tensors_and_kill9_resumes_bit_for_bit(tmp_path):
    """The frozen base has no gradient, no optimizer state and no place on disk; the manifest names it.
    Killed with SIGKILL mid-run and relaunched with the same command, every step's loss is the
    uninterrupted run's, exactly (adapters, TD-LoRA gates, routers, optimizer and EMA restored)."""
    cfg = _config(tmp_path, checkpoint={"every": 2, "async_save": True, "keep_last": 0})
    ref = tmp_path / "ref"
    assert_ok(run_train(cfg, [f"run_dir={ref}"]))
    run = tmp_path / "run"
    proc = start(train_cmd(cfg, [f"run_dir={run}"]), tmp_path / "log1", base_env(DITILL_DEBUG_FAULTS="slow_step=0.3"))
    started_at(tmp_path / "log1", [proc])
    wait_until(lambda: last_step(run) >= 5, [proc], what="step 5")
    kill9([proc])
    assert proc.returncode == -signal.SIGKILL
    again = start(train_cmd(cfg, [f"run_dir={run}"]), tmp_path / "log2", base_env())
    assert finish([again]) == [0], tail(tmp_path / "log2")
    assert 2 <= started_at(tmp_path / "log2", [again]) < 8  # resumed (step 4's async save may have been in flight)
    assert losses_by_step(run) == losses_by_step(ref)

    trainable = _trainable(cfg, ref)
    stored = _stored(ref / "checkpoints" / "step_00000008")
    assert set(stored["student"]) == set(stored["ema"]) == trainable
    assert any(".lora_gate." in k for k in trainable) and any("attn_rate" in k for k in trainable)
    optim = {k.split(".", 1)[1].rsplit(".", 1)[0] for k in stored["optim"] if k.startswith("state.")}
    assert optim == trainable  # AdamW moments for the trainable tensors only
    from trainer.manifest import read_manifest

    manifest = read_manifest(ref / "checkpoints" / "step_00000008")
    p = manifest["peft"]
    assert p["method"] == "tdlora" and len(p["base_digest"]) == 64
    assert p["trainable_params"] < 0.15 * (p["trainable_params"] + p["frozen_params"])
    # what trainer/memory_plan.py's checkpoint_bytes counts: student, EMA and two moments of the trainable tensors
    md = FileSystemReader(str(ref / "checkpoints" / "step_00000008")).read_metadata().state_dict_metadata
    numel = sum(math.prod(v.size) for k, v in md.items()
                if k.startswith(("engine.student.", "engine.ema.")) or k.endswith((".exp_avg", ".exp_avg_sq")))
    assert numel == 4 * p["trainable_params"]


def test_two_fsdp_ranks_match_one_process_and_a_changed_base_is_refused(tmp_path):
    """FSDP2 shards the frozen base as frozen parameters (and the EMA, which shares it before sharding);
    2 ranks with activation checkpointing follow the single process. Resuming against another teacher file is refused even with
    teacher.allow_changed: the adapters are deltas on the old base."""
    cfg = _config(tmp_path, method="tdlora", train={"steps": 4}, checkpoint={"every": 2})
    assert_ok(run_train(cfg, [f"run_dir={tmp_path / 'one'}"]))
    # with activation checkpointing: the recomputed blocks' TD-LoRA gates read the same timesteps
    assert_ok(run_train(cfg, [f"run_dir={tmp_path / 'two'}", "engine.kind=fsdp", "engine.activation_checkpointing=full"],
                        nproc=2))
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=MULTI_RANK_RTOL)

    other = _teacher(tmp_path / "other.safetensors", seed=2)
    proc = run_train(cfg, [f"run_dir={tmp_path / 'one'}", "train.steps=6", f"teacher.path={other}",
                           "teacher.allow_changed=true"])
    assert proc.returncode != 0
    assert "the frozen base changed" in proc.stderr and "deltas on that exact base" in proc.stderr
    proc = run_train(cfg, [f"run_dir={tmp_path / 'one'}", "train.steps=6", "peft.method=none"])
    assert proc.returncode != 0 and "written with peft" in proc.stderr


def test_export_rebuilds_the_base_keeps_merges_or_writes_diffusers_lora(tmp_path):
    """`launch.export` of a PEFT run: the adapted EMA (adapters kept) and `--merge-lora` (plain weights,
    no adapter left) compute the same function; `--diffusers-lora` holds our update in diffusers' names
    (B·A of to_q, to_k, to_v stacked = our fused qkv's update)."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from models import load_pretrained
    from models.lora import lora_layers
    from tests.helpers import tiny_inputs
    from tests.trainer_utils import REPO

    cfg = _config(tmp_path, model="dit-s/2", method="lora", train={"steps": 3}, checkpoint={"every": 3},
                  peft={"targets": ["attention", "mlp", "adaLN", "final_layer"]})
    run = tmp_path / "r"
    assert_ok(run_train(cfg, [f"run_dir={run}"]))

    def export(*flags):
        return subprocess.run([sys.executable, "-m", "launch.export", str(run), "--out", str(tmp_path / "x"), *flags],
                              cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=300)

    assert_ok(export())
    kept = load_pretrained(tmp_path / "x" / "ema.safetensors")
    assert lora_layers(kept)
    assert_ok(export("--merge-lora", "--diffusers-lora"))
    merged = load_pretrained(tmp_path / "x" / "ema.safetensors")
    assert not lora_layers(merged)
    x, t, y = tiny_inputs(channels=1)
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, y), kept(x, t, y), rtol=1e-5, atol=1e-5)
    sd = load_file(tmp_path / "x" / "ema_lora" / "pytorch_lora_weights.safetensors")
    blk = "transformer.transformer_blocks.1.attn1"
    delta = torch.cat([sd[f"{blk}.to_{c}.lora_B.weight"] @ sd[f"{blk}.to_{c}.lora_A.weight"] for c in "qkv"])
    layer = lora_layers(kept)["blocks.1.attn.qkv"]
    torch.testing.assert_close(delta, layer.scaling * layer.lora_B @ layer.lora_A, rtol=1e-6, atol=1e-7)
    assert delta.abs().max() > 0  # trained: B left zero
    torch.testing.assert_close(merged.blocks[1].attn.qkv.weight, kept.blocks[1].attn.qkv.weight + delta,
                               rtol=1e-6, atol=1e-6)

    (tmp_path / "teacher.safetensors").rename(tmp_path / "moved.safetensors")
    proc = export()
    assert proc.returncode == 1 and "the base is not in the checkpoint" in proc.stderr


@pytest.mark.parametrize("overrides, message", [
    (["student.init=random"], "adapts inherited weights"),
    (["peft.method=tdlora", "peft.rank=6", "peft.experts=4"], "peft.experts"),
    (["peft.targets=[routers]"], "routers are newly initialised"),
    (["peft.train=[nothing.*]"], "peft.train"),
    (["peft.modules=[nothing.*]"], "selects no linear layer"),
    (["engine.kind=deepspeed", "engine.deepspeed_config=configs/deepspeed/zero2.json"], "not supported with engine.kind=deepspeed"),
])
def test_bad_peft_settings_are_clear_errors_before_training(tmp_path, overrides, message):
    """Found by `load_config` (what launch.train runs first: exit 2), adapters checked on meta models."""
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(_config(tmp_path), [f"run_dir={tmp_path / 'r'}", *overrides], world_size=1)


def test_ema_copy_shares_the_frozen_base():
    from models.lora import LoraSpec, apply_lora
    from tests.helpers import tiny
    from trainer.engines.base import TorchEngine

    m = tiny("dydit-s/2")
    apply_lora(m, LoraSpec(rank=4))
    ema = TorchEngine.make_ema_copy(None, m)
    pairs = list(zip(m.parameters(), ema.parameters()))
    assert all((s is e) == (not s.requires_grad) for s, e in pairs)  # frozen shared, trainable copied


def test_a_family_outside_models_distils_with_tdlora_under_fsdp(tmp_path):
    """The toy family (tests/toy_family.py: two stacks, flow, its own timestep module) through the same
    trainer: LiT-toy's new attention trains fully, its MLPs get TD-LoRA gated on `time`; 2 FSDP ranks,
    a checkpoint of the trainable tensors, export that loads back with its adapters."""
    from models import build_model, load_pretrained
    from models.convert import save_safetensors
    from models.lora import lora_layers
    from tests.test_family_protocol import LIT_TOY, TOY, toy_config
    from trainer.export import export_run

    torch.manual_seed(0)
    teacher = build_model(TOY)
    save_safetensors(teacher.state_dict(), teacher.config, tmp_path / "toy.safetensors")
    cfg = toy_config(tmp_path, "student", model=LIT_TOY, student={"init": "inherit"},
                     teacher={"path": str(tmp_path / "toy.safetensors")}, sample={"every": 0},
                     train={"steps": 3}, peft={"method": "tdlora", "rank": 4, "experts": 2})
    assert_ok(run_train(cfg, [f"run_dir={tmp_path / 'r'}", "engine.kind=fsdp"], nproc=2))
    trainable = _trainable(cfg, tmp_path / "r")
    assert any(".attn.qkv.weight" in k for k in trainable) and any(".mlp.fc1.lora_gate." in k for k in trainable)
    assert not any(".attn.qkv.lora_" in k for k in trainable)
    assert set(_stored(tmp_path / "r" / "checkpoints" / "step_00000003")["student"]) == trainable
    model = load_pretrained(export_run(tmp_path / "r", tmp_path / "x")["ema"])
    assert sorted(lora_layers(model)) == sorted(k.rsplit(".lora_", 1)[0] for k in trainable if ".lora_A" in k)
    out = model(torch.randn(2, 1, 8, 8), torch.tensor([100.0, 700.0]), torch.tensor([1, 2]))
    assert torch.isfinite(out).all()
