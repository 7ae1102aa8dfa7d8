"""The cross-attention routing measurement (`launch.benchmark pixart-routing`) end to end on a tiny
stand-in for the captioned-digits test bed: digits captioned from templates, "encoded" by a fixed
random word table into the layout `launch.precompute` writes (text embeddings and masks in the
shards, `null_text.safetensors`, `prompts.jsonl` + `prompts.safetensors` with held-out templates).
It checks the pipeline and the report, not which variant wins (that needs the real test bed and
thousands of steps)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data.manifest import read_manifest, write_manifest
from data.sources import Source, SourceItem, digits_source
from data.writers import write_dataset
from launch.benchmarks import pixart_routing as routing

L, D = 8, 16
WORDS = ["a", "handwritten", "the", "digit", "someone", "wrote", "here", *[str(i) for i in range(10)]]
TEMPLATES = [("a handwritten {d}", False), ("the digit {d}", False), ("someone wrote {d} here", True)]


def encode(text: str) -> tuple[np.ndarray, np.ndarray]:
    """A stand-in T5: one fixed random vector per word plus an EOS, zero padding, mask of the tokens."""
    table = np.random.default_rng(0).standard_normal((len(WORDS) + 1, D)).astype(np.float16)
    ids = [WORDS.index(w) for w in text.split()] + [len(WORDS)]
    emb, mask = np.zeros((L, D), np.float16), np.zeros(L, np.uint8)
    emb[: len(ids)], mask[: len(ids)] = table[ids], 1
    return emb, mask


def stand_in_test_bed(path, n: int = 48):
    from safetensors.torch import save_file

    digits = digits_source()
    items = []
    for i, item in enumerate(digits.items[:n]):
        def load(item=item, i=i):
            s = item.load()
            emb, mask = encode(TEMPLATES[i % 2][0].format(d=s["cls"]))
            return {**s, "text_emb": emb, "text_mask": mask}

        items.append(SourceItem(item.key, load, item.where))
    write_dataset(Source("digits-captions", items, channels=1, classes=digits.classes), str(path), "wds", samples_per_shard=16)
    manifest = read_manifest(str(path))
    manifest.text = {"max_length": L, "dim": D}
    write_manifest(str(path), manifest)
    null_emb, null_mask = encode("")
    save_file({"text_emb": torch.from_numpy(null_emb), "text_mask": torch.from_numpy(null_mask)}, str(path / routing.NULL_TEXT))
    rows = [{"prompt": t.format(d=d), "digit": d, "template": k, "held_out": held}
            for k, (t, held) in enumerate(TEMPLATES) for d in range(10)]
    (path / routing.PROMPTS_JSONL).write_text("".join(json.dumps(r) + "\n" for r in rows))
    enc = [encode(r["prompt"]) for r in rows]
    save_file({"text_emb": torch.from_numpy(np.stack([e for e, _ in enc])).to(torch.bfloat16),
               "text_mask": torch.from_numpy(np.stack([m for _, m in enc]))}, str(path / routing.PROMPT_EMBEDDINGS))
    return path


def test_evaluation_measures_both_variants_against_the_teacher(tmp_path):
    """The measuring stage on weights made here (no training): report fields, splits, realised FLOPs."""
    from models import build_model
    from models.convert import save_safetensors
    from models.inherit import inherit_weights
    from tests.helpers import randomize_

    data = stand_in_test_bed(tmp_path / "bed")
    bed = routing.read_test_bed(data)
    s = routing.QUICK
    args = routing.model_args(bed, s)
    torch.manual_seed(0)
    teacher = randomize_(build_model("pixart-sigma-xl/2", **args), std=0.05)
    weights = {"teacher": tmp_path / "t.safetensors"}
    save_safetensors(teacher.state_dict(), teacher.config, weights["teacher"])
    for name, cross in routing.VARIANTS.items():
        student = build_model("dydit-pixart-sigma-xl/2", **args, mlp_groups=s.heads, cross_attn_routing=cross)
        inherit_weights(student, teacher.state_dict())
        with torch.no_grad():  # routers that switch units off depending on t
            for block in student.blocks:
                for r in block.width_routers():
                    r.router.weight.normal_(0, 1.0)
                    r.router.bias.zero_()
        weights[name] = tmp_path / f"{name}.safetensors"
        save_safetensors(student.state_dict(), student.config, weights[name])
    res = routing.evaluate(weights, bed, s)
    for name in routing.VARIANTS:
        assert res[name]["seen"]["samples"] == 20 and res[name]["held_out"]["samples"] == 10
        assert res[name]["seen"]["teacher_rel_mse"] > 0 and 0 < res[name]["flops_ratio"] < 1
        assert res[name]["gflops"] < res[name]["gflops_static"]
    assert 0 < res["cross_routed"]["cross_heads_on"] < 1 and "cross_heads_on" not in res["heads_only"]
    assert "teacher_rel_mse" not in res["teacher"]["seen"] and 0 <= res["teacher"]["seen"]["digit_accuracy"] <= 1
    choice = routing.choose(res)
    assert set(choice["best"]) == {"seen", "held_out"}
    assert choice["route_cross_attention"] is None and "not learnt" in choice["why"]  # a random teacher decides nothing
    agree = {**res, "teacher": {"seen": {"digit_accuracy": 0.9}}}
    for name, mse in (("heads_only", 0.2), ("cross_routed", 0.1)):
        agree[name] = {**res[name], "flops_ratio": 0.6, "seen": {"teacher_rel_mse": mse}, "held_out": {"teacher_rel_mse": mse}}
    assert routing.choose(agree)["route_cross_attention"] is True
    agree["heads_only"] = {**agree["heads_only"], "seen": {"teacher_rel_mse": 0.05}}
    assert routing.choose(agree)["route_cross_attention"] is None  # the splits disagree


@pytest.mark.slow
def test_both_variants_trained_and_measured_on_the_test_bed(tmp_path, capsys):
    data = stand_in_test_bed(tmp_path / "bed")
    assert routing.main(["--data", str(data), "--out", str(tmp_path / "out"), "--quick", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    res = rep["results"]
    assert set(res) == {"teacher", "heads_only", "cross_routed"}
    for name in ("heads_only", "cross_routed"):
        for split, count in (("seen", 20), ("held_out", 10)):
            assert res[name][split]["samples"] == count and res[name][split]["teacher_rel_mse"] > 0
            assert 0 <= res[name][split]["digit_accuracy"] <= 1
        assert 0 < res[name]["flops_ratio"] <= 1 and res[name]["gflops"] <= res[name]["gflops_static"]
    assert "cross_heads_on" in res["cross_routed"] and "cross_heads_on" not in res["heads_only"]
    assert "flops_ratio" not in res["teacher"] and set(rep["choice"]["best"]) == {"seen", "held_out"}
    assert rep["choice"]["route_cross_attention"] in (True, False, None) and rep["choice"]["why"]
    # the teacher started from the data's null caption, and the students inherited it
    from models import load_pretrained

    null = torch.from_numpy(encode("")[0]).float()
    for name in ("teacher", "cross_routed"):
        assert torch.equal(load_pretrained(rep["weights"][name]).y_embedder.y_embedding, null)
    assert load_pretrained(rep["weights"]["cross_routed"]).config.cross_attn_routing
    assert (tmp_path / "out" / "routing.json").is_file()
    assert "route cross-attention heads" in routing.format_report(rep)


def test_plain_shards_are_refused_with_the_way_to_make_the_test_bed(tmp_path, capsys):
    write_dataset(Source("digits", digits_source().items[:8], channels=1), str(tmp_path / "plain"), "wds")
    assert routing.main(["--data", str(tmp_path / "plain"), "--out", str(tmp_path / "o"), "--quick"]) == 2
    assert "digits-captions" in capsys.readouterr().err
    with pytest.raises(routing.TestBedError):
        routing.read_test_bed(tmp_path / "plain")
