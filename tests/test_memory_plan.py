"""The PEFT memory planner (trainer/memory.py) and `launch.info --memory`: parameter counts against the
closed form, optimizer/EMA bytes as the engines allocate them, saved activations on the meta device
against the same count taken from a real CPU forward."""
import json

import pytest
import torch

from models import model_config
from models.lora import LoraSpec
from trainer.memory import adapted_student, plan, saved_activation_bytes

TINY = dict(depth=2, hidden_size=48, num_heads=6, mlp_groups=6, input_size=8, num_classes=10)


def test_trainable_parameters_follow_the_closed_form():
    cfg = model_config("dydit-s/2", **TINY)
    d, h, r, k, depth = 48, 4 * 48, 8, 4, 2
    lora = r * ((d + 3 * d) + (d + d) + (d + h) + (h + d) + (d + 6 * d))  # qkv, proj, fc1, fc2, adaLN per block
    routers = sum(p.numel() for n, p in adapted_student(cfg, None).named_parameters()
                  if any(s in n for s in ("attn_rate", "mlp_rate", "token_selection")))
    full = plan(cfg, None, batch=2, engine="single")
    lo = plan(cfg, LoraSpec(method="lora", rank=r), batch=2, engine="single")
    td = plan(cfg, LoraSpec(method="tdlora", rank=r, experts=k), batch=2, engine="single")
    assert lo.trainable == depth * lora + routers
    assert td.trainable == lo.trainable + depth * 5 * k * (d + 1)  # one K-way gate on the D-wide embedding a layer
    assert full.trainable + lo.trainable - routers == lo.trainable + lo.frozen  # same base, frozen
    for p in (full, lo, td):
        assert p.optimizer_bytes == 8 * p.trainable and p.grad_bytes == 4 * p.trainable
        assert p.ema_bytes == 4 * p.trainable  # one device: the EMA shares the frozen base
        assert p.checkpoint_bytes == 16 * p.trainable  # student + EMA + two moments, fp32, trainable only
    sharded = plan(cfg, LoraSpec(method="lora", rank=r), batch=2, engine="fsdp", world=4)
    assert sharded.ema_bytes == 4 * (lo.trainable + lo.frozen) // 4  # FSDP2 shards the EMA's own base copy
    assert sharded.weights_bytes == lo.weights_bytes // 4


@pytest.mark.parametrize("name, method", [("dydit-s/2", None), ("dydit-s/2", "tdlora"), ("lit-s/2", "lora")])
def test_saved_activations_on_meta_equal_those_of_a_real_forward(name, method):
    """The meta forward's count (storages autograd keeps, deduplicated) is what a real forward keeps."""
    args = {**TINY, "num_heads": 2} if name.startswith("lit") else TINY
    cfg = model_config(name, **args)
    spec = None if method is None else LoraSpec(method=method, rank=4, experts=2)
    meta = saved_activation_bytes(adapted_student(cfg, spec), 3, torch.float32)
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

    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([5.0, 500.0, 900.0]), torch.tensor([1, 2, 3])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        real_model.train()(x, t, y, return_aux=True)
    assert meta == total[0] > 0
    # activations are affine in the batch (LiT keeps its per-head tiled DWC kernel, a batch-independent copy)
    six, nine = (saved_activation_bytes(adapted_student(cfg, spec), b, torch.float32) for b in (6, 9))
    assert nine - six == six - meta > 0.9 * meta
    ac = saved_activation_bytes(adapted_student(cfg, spec), 3, torch.float32, checkpointing="full")
    assert ac < meta


def test_launch_info_memory_prints_the_plans(capsys):
    from launch.info import main

    assert main(["dydit-s/2", *(f"{k}={v}" for k, v in TINY.items()), "--memory", "--rank", "4", "--experts", "2",
                 "--batch", "2", "--engine", "single", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    rows = {r["method"]: r for r in info["memory"]["plans"]}
    cfg = model_config("dydit-s/2", **TINY)
    want = plan(cfg, LoraSpec(method="tdlora", rank=4, experts=2), batch=2, engine="single").as_dict()
    assert rows["tdlora"] == want
    assert rows["full"]["trainable"] == info["params"]["total"]
    assert main(["dydit-s/2", *(f"{k}={v}" for k, v in TINY.items()), "--memory", "--rank", "4", "--experts", "2",
                 "--batch", "2", "--engine", "single"]) == 0
    text = capsys.readouterr().out
    line = next(ln for ln in text.splitlines() if ln.startswith("tdlora"))
    assert f"{want['trainable']:,}" in line and f"{want['peak_bytes'] / 1024**3:.2f}" in line
