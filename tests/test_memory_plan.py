"""The memory planner's PEFT side (trainer/memory_plan.py, `launch.info --plan --peft`): trainable
parameters against the closed form, gradient/optimizer/EMA/checkpoint bytes as the engines allocate
them, saved activations of an adapted student traced on the meta device against the same count taken
from a real CPU forward."""
import json

import pytest
import torch

from models import model_config
from models.lora import LoraSpec
from trainer.memory_plan import adapted_student, plan_memory, teacher_of, trace_activations

TINY = dict(depth=2, hidden_size=48, num_heads=6, mlp_groups=6, input_size=8, num_classes=10)
POS_EMBED = 16 * 48 * 2  # the sin-cos position table, a buffer in the bf16 compute dtype, replicated


def tiny_plan(cfg, spec, gpus: int = 1):
    return plan_memory(cfg, None, gpus, 80, micro_batch=2, ac="none", reserve_gib=0, peft=spec)


def test_trainable_parameters_follow_the_closed_form():
    cfg = model_config("dydit-s/2", **TINY)
    d, h, r, k, depth = 48, 4 * 48, 8, 4, 2
    lora = r * ((d + 3 * d) + (d + d) + (d + h) + (h + d) + (d + 6 * d))  # qkv, proj, fc1, fc2, adaLN per block
    routers = sum(p.numel() for n, p in adapted_student(cfg, None).named_parameters()
                  if any(s in n for s in ("attn_rate", "mlp_rate", "token_selection")))
    full, lo, td = (tiny_plan(cfg, s) for s in (None, LoraSpec(method="lora", rank=r),
                                                 LoraSpec(method="tdlora", rank=r, experts=k)))
    trainable = {p.notes["method"]: p.notes["trainable"] for p in (full, lo, td)}
    assert trainable["lora"] == depth * lora + routers
    assert trainable["tdlora"] == trainable["lora"] + depth * 5 * k * (d + 1)  # one K-way gate on the D-wide embedding a layer
    assert trainable["full"] == full.notes["student_params"]
    assert full.notes["student_params"] + trainable["lora"] - routers == lo.notes["student_params"]  # same base, frozen
    for p in (full, lo, td):
        n = p.notes["trainable"]
        assert p.rows["optimizer AdamW m, v (fp32, sharded)"] == 8 * n and p.rows["student grads (fp32, sharded)"] == 4 * n
        assert p.rows["student params (fp32, sharded)"] == 4 * p.notes["student_params"] + POS_EMBED  # + the replicated buffer
        assert p.checkpoint_bytes == 16 * n  # student + EMA + two moments, fp32, trainable only
    sharded = tiny_plan(cfg, LoraSpec(method="lora", rank=r), gpus=4)
    ema = "EMA (fp32, sharded)"
    assert sharded.rows[ema] - POS_EMBED == (lo.rows[ema] - POS_EMBED) / 4  # FSDP2 shards the EMA's own base copy
    assert lo.total < full.total and td.total > lo.total


@pytest.mark.parametrize("name, method", [("dydit-s/2", None), ("dydit-s/2", "tdlora"), ("lit-s/2", "lora")])
def test_traced_activations_of_an_adapted_student_equal_those_of_a_real_forward(name, method):
    """The meta trace (storages autograd keeps, deduplicated, the loss's fp32 cast included) is what a
    real forward of the adapted student keeps."""
    args = {**TINY, "num_heads": 2} if name.startswith("lit") else TINY
    cfg = model_config(name, **args)
    spec = None if method is None else LoraSpec(method=method, rank=4, experts=2)
    meta = trace_activations(adapted_student(cfg, spec).to(device="meta"), batch=3).held("none") * 3
    real_model = adapted_student(cfg, spec).to_empty(device="cpu")
    with torch.no_grad():
        for p in real_model.parameters():
            p.normal_(0, 0.02)
    real_model.pos_embed.zero_()
    seen = {p.untyped_storage().data_ptr() for p in [*real_model.parameters(), *real_model.buffers()]}
    total = [0]

    def pack(t):
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total[0] += t.untyped_storage().nbytes()
        return t

    x, t, y = torch.zeros(3, 4, 8, 8), torch.full((3,), 500.0), torch.zeros(3, dtype=torch.long)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        real_model.train()(x, t, y).float().pow(2).mean()
    assert meta == pytest.approx(total[0], rel=0.02) and total[0] > 0


def test_launch_info_plan_compares_the_peft_methods(capsys):
    from launch.info import main

    argv = ["dydit-s/2", *(f"{k}={v}" for k, v in TINY.items()), "--plan", "--gpus", "1", "--micro-batch", "2",
            "--rank", "4", "--experts", "2", "--reserve", "0"]
    assert main([*argv, "--peft", "all", "--json"]) == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)}
    cfg = model_config("dydit-s/2", **TINY)
    want = plan_memory(cfg, teacher_of(cfg), 1, 80, micro_batch=2, reserve_gib=0,
                       peft=LoraSpec(method="tdlora", rank=4, experts=2))
    assert rows["tdlora"]["total_gib"] == pytest.approx(want.total / 2**30, rel=1e-12)
    assert rows["tdlora"]["trainable"] == want.notes["trainable"] < rows["full"]["trainable"]
    assert main([*argv, "--peft", "tdlora", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == rows["tdlora"]
    assert main([*argv, "--memory", "--json"]) == 0  # the deprecated alias
    assert {r["method"]: r for r in json.loads(capsys.readouterr().out)} == rows
    assert main([*argv, "--peft", "all"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("tdlora"))
    assert f"{want.notes['trainable']:,}" in line and f"{want.total / 2**30:.2f}" in line
