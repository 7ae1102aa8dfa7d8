"""`python -m launch.info pixart-sigma-xl/2`: 610,856,096 parameters (`../shared/T2I.md` §1.1) and GFLOPs
at 512, 1024 and 2048 px with cross-attention and the caption projection in them, against a hand count."""
from __future__ import annotations

import json

import pytest

from launch import info

D, HEADS, DEPTH, L, T5 = 1152, 16, 28, 300, 4096


def hand_count(tokens: int) -> dict[str, float]:
    """PixArt-Σ-XL/2's multiply-adds per image, written out: q/k/v/out projections and QKᵀ, AV for
    self-attention; q/out over the image tokens, k/v over the 300 caption tokens and QKᵀ, AV for
    cross-attention; fc1 and fc2 of the 4× MLP; t_block (6·D²); patch embedding (2×2×4 → D), the
    timestep MLP (256 → D → D), the caption projection (4096 → D → D over 300 tokens); output D → 2·2·8."""
    n = tokens
    self_attn = 4 * n * D * D + 2 * n * n * D
    cross_attn = 2 * n * D * D + 2 * L * D * D + 2 * n * L * D
    mlp = 2 * n * D * 4 * D
    embeddings = n * 16 * D + 256 * D + D * D + L * (T5 * D + D * D)
    final = n * D * 32
    parts = {"attention": DEPTH * (self_attn + cross_attn), "mlp": DEPTH * mlp, "adaLN": 6 * D * D,
             "embeddings": embeddings, "final_layer": final}
    return {k: v / 1e9 for k, v in {**parts, "total": sum(parts.values())}.items()}


def test_parameters_and_gflops_at_512_1024_2048(capsys):
    assert info.main(["pixart-sigma-xl/2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"]["total"] == 610_856_096 and out["family"] == "pixart" and out["tokens"] == 4096
    assert out["gflops"] == pytest.approx(hand_count(4096)["total"], rel=1e-12)
    by_px = {r["resolution"][0]: r for r in out["at_resolutions"]}
    assert sorted(by_px) == [512, 1024, 2048]
    for px, tokens in ((512, 1024), (1024, 4096), (2048, 16384)):
        r, ref = by_px[px], hand_count(tokens)
        assert r["tokens"] == tokens and r["latent"] == [px // 8, px // 8]
        assert r["gflops"] == pytest.approx(ref["total"], rel=1e-12)
        for part in ("attention", "mlp", "adaLN", "embeddings", "final_layer"):
            assert r["gflops_parts"][part] == pytest.approx(ref[part], rel=1e-12), (px, part)


def test_table_prints_every_resolution(capsys):
    assert info.main(["pixart-sigma-xl/2"]) == 0
    text = capsys.readouterr().out
    assert "610,856,096" in text and "(610.86 M" in text
    for px, tokens in ((512, 1024), (1024, 4096), (2048, 16384)):
        assert f"{px}x{px}" in text and f"{hand_count(tokens)['total']:12.1f}" in text


def test_other_resolutions_and_students(capsys):
    lit = info.model_info("lit-pixart-sigma-xl/2", {}, [(768, 1024), 2048])
    teacher = info.model_info("pixart-sigma-xl/2", {}, [(768, 1024), 2048])
    assert lit["at_resolutions"][0]["tokens"] == 48 * 64
    for a, b in zip(lit["at_resolutions"], teacher["at_resolutions"]):
        assert a["gflops_parts"]["mlp"] == b["gflops_parts"]["mlp"]
        assert a["gflops_parts"]["attention"] < b["gflops_parts"]["attention"]
    big_t, big_l = teacher["at_resolutions"][1], lit["at_resolutions"][1]  # 16k tokens: softmax is quadratic
    assert big_t["gflops_parts"]["attention"] / big_l["gflops_parts"]["attention"] > 4 and big_t["gflops"] / big_l["gflops"] > 2.5
    dy = info.model_info("dydit-pixart-sigma-xl/2", {"cross_attn_routing": True}, [])
    assert dy["params"]["routers"] > 0 and dy["at_resolutions"] == []


@pytest.mark.parametrize("argv,msg", [(["dit-xl/2", "--resolution", "512"], "fixed to a 32"),
                                      (["pixart-sigma-xl/2", "--resolution", "1000"], "multiple of 16"),
                                      (["pixart-sigma-xl/2", "--resolution", "big"], "not R or HxW")])
def test_bad_resolutions_are_clear_errors(capsys, argv, msg):
    assert info.main(argv) == 2
    assert msg in capsys.readouterr().err
