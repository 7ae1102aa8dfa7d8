"""FLOPs accounting against the DiT paper, the loss terms against closed forms, inheritance rules."""
import pytest
import torch

from models import model_config
from models.flops import attention_cost, block_cost, static_gflops
from models.inherit import default_exclude, inherit_weights
from models.losses import FlopsLoss, HybridDistillLoss, flops_target
from tests.helpers import randomize_, tiny


@pytest.mark.parametrize("name,paper", [("dit-s/2", 6.06), ("dit-b/2", 23.01), ("dit-l/2", 80.71), ("dit-xl/2", 118.64)])
def test_dit_paper_gflops(name, paper):
    assert static_gflops(model_config(name)) == pytest.approx(paper, rel=0.01)


def test_dydit_loss_constants():
    # DyDiT's loss.py table (GFLOPs per layer at 256 tokens)
    for name, attn, mlp in [("dit-s/2", 0.201326592, 0.301989888), ("dit-xl/2", 1.50994944, 2.717908992)]:
        c = block_cost(model_config(name))
        assert c.attn / 1e9 == pytest.approx(attn, rel=1e-12) and c.mlp / 1e9 == pytest.approx(mlp, rel=1e-12)


def test_linear_attention_counted_as_computed():
    cfg = model_config("lit-xl/2")  # 4 heads of 288
    n, d, dh = 256, 1152, 288
    expected = 4 * n * d * d + 2 * n * d * dh + n * d + 25 * n * d
    assert attention_cost(cfg, n) == expected
    # quadratic vs linear in tokens: at 16k tokens linear attention is far cheaper than softmax
    big = 128 * 128
    assert attention_cost(cfg, big) < 0.25 * attention_cost(model_config("dit-xl/2"), big)


def test_hybrid_kd_terms():
    s = torch.randn(2, 8, 4, 4)
    t = torch.randn(2, 8, 4, 4)
    terms = HybridDistillLoss(0.5, 0.05, in_channels=4)(s, t)
    noise = ((s[:, :4] - t[:, :4]) ** 2).mean(dim=(1, 2, 3))
    var = ((s[:, 4:] - t[:, 4:]) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(terms["kd_noise"], noise)
    torch.testing.assert_close(terms["kd_var"], var)
    torch.testing.assert_close(terms["kd"], 0.5 * noise + 0.05 * var)
    s.requires_grad_(True)
    t.requires_grad_(True)
    HybridDistillLoss()(s, t)["kd"].sum().backward()
    assert t.grad is None  # the teacher is a constant


def test_flops_target_schedule_and_loss():
    assert flops_target(50, 0.5, 1000) == 1.0
    assert flops_target(500, 0.5, 1000) == pytest.approx(0.75)
    assert flops_target(1000, 0.5, 1000) == pytest.approx(0.5)
    assert flops_target(5000, 0.5, 1000) == 0.5
    ratio = torch.tensor([0.9, 0.7], requires_grad=True)
    out = FlopsLoss(0.5, weight=2.0, warmup_steps=1000)(ratio, step=2000)
    torch.testing.assert_close(out["flops"], torch.tensor(2.0 * (0.8 - 0.5) ** 2))  # batch mean, not per sample
    out["flops"].backward()
    torch.testing.assert_close(ratio.grad, torch.tensor([0.6, 0.6]))
    with pytest.raises(ValueError, match="flops_target"):
        FlopsLoss(1.5)


def test_lit_inheritance_skips_attention_and_reports():
    teacher = randomize_(tiny("dit-s/2"), seed=1)
    student = tiny("lit-s/2")
    report = inherit_weights(student, teacher.state_dict(), default_exclude(teacher.config, student.config))
    assert sorted(report.skipped) == sorted(f"blocks.{i}.attn.{p}.{w}" for i in range(2) for p in ("qkv", "proj") for w in ("weight", "bias"))
    assert sorted(report.initialised) == sorted(f"blocks.{i}.attn.dwc.{w}" for i in range(2) for w in ("weight", "bias"))
    sd_s, sd_t = student.state_dict(), teacher.state_dict()
    for k in report.inherited:
        assert torch.equal(sd_s[k], sd_t[k])
    assert not torch.equal(sd_s["blocks.0.attn.proj.weight"], sd_t["blocks.0.attn.proj.weight"])


def test_inheritance_shape_mismatch_is_an_error():
    teacher = tiny("dit-s/2")
    student = tiny("dit-s/2", hidden_size=60)
    with pytest.raises(ValueError, match="shapes differ"):
        inherit_weights(student, teacher.state_dict())
