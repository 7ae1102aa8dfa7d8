"""`python -m launch.info`: parameters counted without allocating, the DiT paper's GFLOPs, clear errors."""
import json

import pytest

from launch import info


def run_json(capsys, *argv):
    assert info.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name,paper", [("dit-s/2", 6.06), ("dit-b/2", 23.01), ("dit-l/2", 80.71), ("dit-xl/2", 118.64)])
def test_json_gflops_match_dit_paper(capsys, name, paper):
    out = run_json(capsys, name)
    assert out["gflops"] == pytest.approx(paper, rel=0.01)
    assert out["tokens"] == 256 and out["model"] == name and out["family"] == "dit"
    parts = sum(out["gflops_parts"].values())
    assert parts == pytest.approx(out["gflops"], rel=1e-9)  # the split adds up to the total


def test_parameter_groups_add_up_and_match_official_dit_xl(capsys):
    p = run_json(capsys, "dit-xl/2")["params"]
    groups = {k: v for k, v in p.items() if k != "total"}
    assert sum(groups.values()) == p["total"]
    # DiT's train.py prints 675,129,632, which counts its frozen pos_embed (256 x 1152) as a parameter.
    assert p["total"] + 256 * 1152 == 675_129_632
    assert p["routers"] == 0


def test_dynamic_model_with_overrides(capsys):
    out = run_json(capsys, "dydit-xl/2", "input_size=64")
    assert out["tokens"] == 1024 and out["overrides"] == {"input_size": 64} and out["dynamic"]
    assert out["params"]["routers"] > 0 and out["gflops_parts"]["routers"] > 0
    assert out["gflops"] > 4 * 118  # quadratic attention makes 4x tokens cost more than 4x


def test_linear_attention_counted_as_computed(capsys):
    lit = run_json(capsys, "lit-s/2")
    dit = run_json(capsys, "dit-s/2")
    assert lit["attention"] == "linear" and lit["config"]["num_heads"] == 2 and lit["kind"] == "lit"
    assert lit["gflops_parts"]["attention"] < dit["gflops_parts"]["attention"]
    assert lit["gflops_parts"]["mlp"] == dit["gflops_parts"]["mlp"]


def test_table_output(capsys):
    assert info.main(["dit-s/2", "depth=2", "hidden_size=64", "num_heads=4"]) == 0
    text = capsys.readouterr().out
    for word in ("dit-s/2", "parameters", "GFLOPs", "attention", "mlp", "adaLN", "embeddings", "total"):
        assert word in text
    # The parts add up to the totals: params, GFLOPs and shares (the total row repeats model_info's).
    rows = [line.split() for line in text.splitlines()[text.splitlines().index("") + 2:]]
    parts, total = rows[:-1], rows[-1]
    num = lambda s: float(s.replace(",", "").rstrip("%"))  # noqa: E731
    assert total[0] == "total" and len(parts) == 6
    assert sum(num(r[1]) for r in parts) == num(total[1])
    assert sum(num(r[-2]) for r in parts) == pytest.approx(num(total[-2]), abs=1e-3)
    assert sum(num(r[-1]) for r in parts) == pytest.approx(100.0, abs=0.5)
    info_json = info.model_info("dit-s/2", {"depth": 2, "hidden_size": 64, "num_heads": 4})
    assert num(total[1]) == info_json["params"]["total"] and num(total[-2]) == pytest.approx(info_json["gflops"], abs=1e-4)


@pytest.mark.parametrize(
    "argv,msg",
    [(["dit-q/2"], "unknown model"), (["dit-s/2", "depthx=3"], "unknown model override"),
     (["dit-s/2", "depth"], "not key=value"), (["dit-s/2", "num_heads=5"], "num_heads"),
     (["dit-s/2", "depth=abc"], "depth")],
)
def test_bad_input_is_a_clear_error_with_exit_code_2(capsys, argv, msg):
    assert info.main(argv) == 2
    captured = capsys.readouterr()
    assert msg in captured.err and captured.out == ""


def test_override_values_are_typed():
    assert info.parse_overrides(["depth=2", "mlp_ratio=2.5", "learn_sigma=false", "attention=linear", "mlp_groups=None"]) == {
        "depth": 2, "mlp_ratio": 2.5, "learn_sigma": False, "attention": "linear", "mlp_groups": None,
    }
