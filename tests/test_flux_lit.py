"""LiT-FLUX: RoPE-numerator linear attention against a naive O(N²) reference built from explicit
rotation matrices; joint attention over text + image with the DWC on image tokens only; the no-RoPE
variant; few heads; inheritance of everything but the attention projections."""
from __future__ import annotations

import pytest
import torch

from models.attention import rope_linear_attention
from models.inherit import default_exclude, inherit_weights
from models.kernels.reference import linear_attention
from models.rope import RopeTable, apply_rope, image_text_ids, rope_table
from tests.flux_helpers import flux_inputs, tiny_flux

AXES = [4, 6, 6]


def rotation_matrices(ids: torch.Tensor, axes_dim, theta: float = 10000.0) -> torch.Tensor:
    """(L, R, R) block-diagonal RoPE matrices, one 2×2 rotation per channel pair, in float64."""
    blocks = []
    for a, dim in enumerate(axes_dim):
        for j in range(dim // 2):
            ang = ids[:, a].double() * theta ** (-2 * j / dim)
            c, s = torch.cos(ang), torch.sin(ang)
            blocks.append(torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2))  # (L, 2, 2)
    r = sum(axes_dim)
    out = torch.zeros(ids.shape[0], r, r, dtype=torch.float64)
    for p, blk in enumerate(blocks):
        out[:, 2 * p:2 * p + 2, 2 * p:2 * p + 2] = blk
    return out


def naive_rope_linear(q, k, v, rot, eps):
    """O_i = Σ_j (R_i φq_i)·(R_j φk_j) v_j / N  /  (Σ_j φq_i·φk_j / N + eps), all pairs explicitly."""
    fq, fk = torch.relu(q.double()), torch.relu(k.double())
    r = rot.shape[-1]

    def rotate(f):  # rotate the first r channels of every token, the rest unchanged
        return torch.cat([torch.einsum("lab,xhlb->xhla", rot, f[..., :r]), f[..., r:]], dim=-1)

    scores = rotate(fq) @ rotate(fk).transpose(-1, -2)  # (B, H, N, N)
    n = k.shape[-2]
    num = scores @ v.double() / n
    den = (fq @ fk.transpose(-1, -2)).sum(-1, keepdim=True) / n + eps
    return num / den


@pytest.mark.parametrize("head_dim", [16, 24])  # 24: partial RoPE (a student with wider heads)
def test_rope_numerator_matches_the_naive_all_pairs_reference(head_dim):
    g = torch.Generator().manual_seed(0)
    n_txt, grid = 3, (3, 4)
    ids = image_text_ids(n_txt, grid, "cpu")
    n = ids.shape[0]
    q, k, v = (torch.randn(2, 2, n, head_dim, generator=g, dtype=torch.float64) for _ in range(3))
    table = rope_table(ids, AXES, 10000.0, torch.float64)
    out = rope_linear_attention(q, k, v, table, eps=1e-6)
    ref = naive_rope_linear(q, k, v, rotation_matrices(ids, AXES), 1e-6)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    # the rotation is RoPE's: the explicit matrices and apply_rope agree, and R_iᵀR_j depends on j − i only
    x = torch.randn(1, 1, n, 16, dtype=torch.float64, generator=g)
    rot = rotation_matrices(ids, AXES)
    torch.testing.assert_close(apply_rope(x, table)[0, 0],
                               torch.einsum("lab,lb->la", rot, x[0, 0]))


def test_normaliser_stays_positive_where_a_rotated_one_would_not():
    """Features on the row axis' fastest channel pair (1 rad per row): rotated, their mean points away
    from some queries, so a rotated normaliser would be ≤ 0 there; the rotation-free one is not."""
    ids = image_text_ids(0, (8, 8), "cpu")
    q = torch.zeros(1, 1, 64, 16, dtype=torch.float64)
    q[..., 4:6] = 1.0  # channels 4, 5: axis 1 (rows), frequency θ^0 = 1
    k, v = q.clone(), torch.randn(1, 1, 64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rot = rotation_matrices(ids, AXES)
    rq = torch.einsum("lab,lb->la", rot, q[0, 0])
    rk = torch.einsum("lab,lb->la", rot, k[0, 0])
    assert ((rq @ rk.mean(0)) <= 0).any()  # rotating the normaliser too would divide by ≤ 0 somewhere
    out = rope_linear_attention(q, k, v, rope_table(ids, AXES, 10000.0, torch.float64))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, naive_rope_linear(q, k, v, rot, 1e-6))


def test_products_run_in_fp32_under_bf16_autocast():
    """Long sequences of large bf16 features: the fp32 products stay close to a float64 evaluation."""
    g = torch.Generator().manual_seed(2)
    ids = image_text_ids(16, (32, 32), "cpu")
    q, k, v = ((torch.randn(1, 2, ids.shape[0], 16, generator=g) * 30).bfloat16() for _ in range(3))
    table = rope_table(ids, AXES, 10000.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rope_linear_attention(q, k, v, table)
    assert out.dtype == torch.bfloat16
    ref = rope_linear_attention(q.double(), k.double(), v.double(), RopeTable(table.cos.double(), table.sin.double()))
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)


def test_joint_attention_dwc_acts_on_image_tokens_only():
    m = tiny_flux("lit-flux-dev").eval()
    x, t, te, tp = flux_inputs(hw=(8, 12))
    names = ["double_blocks.0", "single_blocks.0"]
    _, a = m(x, t, te, tp, return_aux=True, features=names)
    with torch.no_grad():
        for block in m.all_blocks():
            block.attn_mix.dwc.weight.mul_(-3.0)
    _, b = m(x, t, te, tp, return_aux=True, features=names)
    fa, fb = a["features"]["double_blocks.0"], b["features"]["double_blocks.0"]
    n_txt = te.shape[1]
    assert torch.equal(fa[:, :n_txt], fb[:, :n_txt])  # text rows: no DWC term
    assert (fa[:, n_txt:] - fb[:, n_txt:]).abs().max() > 1e-3
    assert fa.shape == (2, n_txt + 24, 32)


def test_no_rope_variant_is_plain_relu_linear_attention_plus_dwc():
    m = tiny_flux("lit-flux-dev", linear_rope=False, dwc_kernel=0).eval()
    block = m.single_blocks[0]
    captured = {}
    block.norm.register_forward_hook(lambda mod, args, out: captured.update(q=out[0], k=out[1], v=args[2]))
    x, t, te, tp = flux_inputs()
    _, aux = m(x, t, te, tp, return_aux=True, features=["single_blocks.0"])
    ref = linear_attention(captured["q"], captured["k"], captured["v"], m.config.linear_eps).transpose(1, 2).flatten(2)
    torch.testing.assert_close(aux["features"]["single_blocks.0"], ref)
    default = tiny_flux("lit-flux-dev").config  # the recipe's default: RoPE in the numerator, 5×5 DWC
    assert default.linear_rope and default.dwc_kernel == 5 and default.num_heads == 2


def test_lit_inherits_all_but_the_attention_projections():
    teacher = tiny_flux("flux-dev", seed=3)
    student = tiny_flux("lit-flux-dev", seed=9)
    own = {k: v.clone() for k, v in student.state_dict().items()}
    report = inherit_weights(student, teacher.state_dict(), default_exclude(teacher.config, student.config))
    sd, t_sd, d = student.state_dict(), teacher.state_dict(), 32
    assert sorted(report.initialised) == sorted(f"{b}.attn_mix.dwc.{w}" for b in ("double_blocks.0", "single_blocks.0",
                                                                                 "single_blocks.1") for w in ("weight", "bias"))
    assert all(".img_attn." in k or ".txt_attn." in k or ".norm." in k or k.startswith("null_") for k in report.skipped)
    assert "double_blocks.0.img_attn.qkv.weight" in report.skipped and "single_blocks.0.norm.query_norm.scale" in report.skipped
    for i in range(2):
        w1, w2 = f"single_blocks.{i}.linear1.weight", f"single_blocks.{i}.linear2.weight"
        assert torch.equal(sd[w1][:3 * d], own[w1][:3 * d]) and torch.equal(sd[w1][3 * d:], t_sd[w1][3 * d:])
        assert torch.equal(sd[w2][:, :d], own[w2][:, :d]) and torch.equal(sd[w2][:, d:], t_sd[w2][:, d:])
    for k in ("double_blocks.0.img_mlp.0.weight", "double_blocks.0.txt_mod.lin.weight", "final_layer.linear.weight",
              "single_blocks.1.modulation.lin.bias", "txt_in.weight"):
        assert torch.equal(sd[k], t_sd[k])


def test_few_heads_option_with_partial_rope():
    teacher = tiny_flux("flux-dev", seed=3)
    student = tiny_flux("lit-flux-dev", num_heads=1)  # one 32-channel head: RoPE on its first 16 channels
    report = inherit_weights(student, teacher.state_dict(), default_exclude(teacher.config, student.config))
    assert student.config.head_dim == 32 and "single_blocks.0.norm.key_norm.scale" in report.skipped
    out = student(*flux_inputs())
    assert out.shape == (2, 4, 8, 12) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="axes_dim"):
        tiny_flux("lit-flux-dev", num_heads=4)  # 8-channel heads cannot hold 16 RoPE channels
