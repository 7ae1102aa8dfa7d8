"""The memory planner (`trainer/memory_plan.py`, `launch.info --plan`) against bytes counted on tiny configs.

Activations: the plan traces the model on the meta device (FlashAttention's saves standing in for
SDPA); here the same forward runs for real on the CPU under a TorchDispatchMode that records every
storage an op creates and, at the end of the forward, sums those still alive — what is held for
backward — with and without activation checkpointing (the trainer's composable checkpoint).
Static state: a 2-rank FSDP2 run (`tests/flux_memory_probe.py`) reports its local shard bytes after
one step; the plan's per-rank rows must match them.
"""
from __future__ import annotations

import json
import sys

import pytest
import torch
from torch.distributed._composable import checkpoint
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from launch import info
from models import build_model, model_config
from tests.flux_helpers import TINY
from tests.trainer_utils import REPO, base_env, free_port, write_config
from trainer.memory_plan import GiB, example_inputs, plan_memory, trace_activations

WIDER = {**TINY, "hidden_size": 64, "num_heads": 4, "depth": 2, "depth_single": 2}


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages ops create while active (tensors that existed before are not counted)
    that are still alive when asked — weak references to the storages, not Python tensor objects."""

    def __init__(self, existing) -> None:
        super().__init__()
        self.old = {t.untyped_storage()._cdata for t in existing}
        self.refs: dict[int, tuple[int, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                if s._cdata in self.old:
                    continue
                seen = self.refs.get(s._cdata)
                if seen is None or torch.UntypedStorage._expired(seen[0]):  # a freed address reused
                    self.refs[s._cdata] = (s._weak_ref(), s.nbytes())
        return out

    def alive(self) -> int:
        return sum(n for ref, n in self.refs.values() if not torch.UntypedStorage._expired(ref))


@pytest.mark.parametrize("name,kw", [("flux-dev", {}), ("dyflux-dev", {"mlp_groups": 4}), ("lit-flux-dev", {})])
@pytest.mark.parametrize("ac", ["none", "full"])
def test_traced_activations_match_bytes_held_by_a_real_forward(name, kw, ac):
    cfg = model_config(name, **{**WIDER, **kw})
    with torch.device("meta"):
        profile = trace_activations(build_model(cfg), resolution=(128, 192))  # 8×12 → 96 image tokens
    torch.manual_seed(0)
    model = build_model(cfg).train()
    if ac == "full":
        for block in model.all_blocks():
            checkpoint(block, preserve_rng_state=True)  # as trainer.parallelize applies it
    x, t, cond = example_inputs(model, 2, (128, 192), None, "cpu")
    mode = LiveBytes([*model.parameters(), *model.buffers(), x, t, *cond.values()])
    with mode:
        loss = model(x, t, **cond).float().pow(2).mean()  # the graph (and what it saved) lives while loss does
    measured = mode.alive() / 2
    assert loss.requires_grad
    # CPU kernels vs the meta trace: the CPU depthwise conv keeps a channels-last copy (LiT, ~1 %)
    assert measured == pytest.approx(profile.held(ac), rel=0.02), (measured, profile.held(ac))
    if ac == "full":  # checkpointing keeps each block's new inputs only
        assert profile.held("full") < 0.2 * profile.held("none")


def test_full_width_per_token_figures_are_near_the_spec():
    """T2I.md §2.8 measured 178 KB/token (double) and 155 KB/token (single) saved per bf16 FLUX block
    on CPU SDPA (±20 % on GPU); the trace of one block of each at full width and 1024²."""
    with torch.device("meta"):
        model = build_model("flux-dev", depth=1, depth_single=1).to(torch.bfloat16)
    per_token = trace_activations(model, resolution=1024).per_token()
    assert per_token["DoubleStreamBlock"] == pytest.approx(178e3, rel=0.1)
    assert per_token["SingleStreamBlock"] == pytest.approx(155e3, rel=0.1)


def test_static_plan_matches_fsdp2_shards_on_two_ranks(tmp_path):
    import subprocess

    from models.convert import save_safetensors
    from tests.flux_helpers import tiny_flux

    teacher = tiny_flux("flux-dev")
    tpath = tmp_path / "teacher.safetensors"
    save_safetensors(teacher.state_dict(), teacher.config, tpath)
    args = {**TINY, "mlp_groups": 4}
    cfg = write_config(tmp_path / "probe.yaml", model="dyflux-dev", args=args,
                       student={"model": "dyflux-dev", "args": args, "init": "inherit"},
                       teacher={"path": str(tpath), "shard": True},
                       data={"format": "wds", "path": str(tmp_path), "input": "latent", "cond": "text_emb"},
                       diffusion={"objective": "flow"}, engine={"kind": "fsdp"}, train={"steps": 1, "global_batch": 4})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "tests.flux_memory_probe", str(cfg), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    plan = plan_memory(model_config("dyflux-dev", **args), teacher.config, 2, 80, micro_batch=2, ema=True,
                       compute_dtype=torch.float32, teacher_dtype=torch.float32)  # the CPU runs in fp32
    rows = plan.rows
    expected = {"params": rows["student params (fp32, sharded)"], "grads": rows["student grads (fp32, sharded)"],
                "optimizer": rows["optimizer AdamW m, v (fp32, sharded)"], "ema": rows["EMA (fp32, sharded)"],
                "teacher": rows["teacher (sharded)"]}
    for key, value in expected.items():
        got = max(r[key] for r in ranks)  # FSDP2 pads uneven dim-0 shards: the larger rank
        assert got == pytest.approx(value, rel=0.03), (key, [r[key] for r in ranks], value)


def test_launch_info_plan_table_and_json(capsys):
    tiny = ["hidden_size=64", "num_heads=4", "depth=2", "depth_single=2", "axes_dim=[4,6,6]", "context_in_dim=32",
            "vec_in_dim=24", "text_len=6"]
    argv = ["dyflux-dev", *tiny, "--plan", "--gpus", "4", "--gpu-mem", "0.05", "--resolution", "256", "--reserve", "0"]
    assert info.main([*argv, "--json"]) == 0  # teacher: the student's static softmax configuration
    out = json.loads(capsys.readouterr().out)
    per_sample = sum(out["per_sample_gib"].values())
    total = sum(out["rows_gib"].values()) + out["micro_batch"] * per_sample
    assert out["total_gib"] == pytest.approx(total) and out["fits"] and "teacher (sharded)" in out["rows_gib"]
    assert out["micro_batch"] == out["max_micro_batch"] > 0 and total + per_sample > 0.05  # the largest that fits
    assert set(out["saved_bytes_per_token"]) == {"DoubleStreamBlock", "SingleStreamBlock"}
    assert info.main(argv) == 0
    text = capsys.readouterr().out
    for word in ("student params", "optimizer AdamW", "EMA", "teacher (sharded)", "activations (checkpointed)",
                 "total", "fits", "DoubleStreamBlock"):
        assert word in text
    assert info.main([*argv, "--micro-batch", str(10 * out["micro_batch"])]) == 0
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert info.main([*argv, "--teacher", "none", "--json"]) == 0
    assert not any("teacher" in k for k in json.loads(capsys.readouterr().out)["rows_gib"])
    assert info.main([*argv, "--teacher", "nonsense"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_plan_scales_with_gpus_and_sharding():
    student, teacher = model_config("dyflux-dev", **WIDER), model_config("flux-dev", **WIDER)
    a = plan_memory(student, teacher, 2, 80, micro_batch=1, resolution=128)
    b = plan_memory(student, teacher, 4, 80, micro_batch=1, resolution=128)
    c = plan_memory(student, teacher, 4, 80, micro_batch=1, resolution=128, teacher_shard=False)
    key = "optimizer AdamW m, v (fp32, sharded)"
    assert a.rows[key] == pytest.approx(2 * b.rows[key])
    params = c.notes["teacher_params"]
    buffers = (6 * 32 + 24) * 2  # the null-text buffers, cast with the teacher
    assert c.rows["teacher (replicated)"] == pytest.approx(2 * params + buffers)  # bf16 weights, every rank
    assert b.rows["teacher (sharded)"] < c.rows["teacher (replicated)"] and "FSDP unsharded teacher blocks" not in c.rows
    assert a.per_sample == b.per_sample and a.max_micro_batch > 0 and a.total < 80 * GiB
