"""`python -m launch.benchmark teacher_load` runs end to end (dit-s/2 here, 66 MB in bf16; its default is
dit-xl/2, 1.35 GB). The bar is for the default size (a fixed ~30 MB of start-up allocations is small
next to it, not next to 66 MB), so this checks what the measurement must show at any size: the
sharded ranks hold half of the teacher and peak lower than the replicated ones by about that half."""
import json

import pytest

from launch import benchmark
from launch.benchmarks.teacher_load import write_teacher


def test_teacher_load_benchmark_measures_half_the_teacher_less_per_sharded_rank(capsys, tmp_path):
    benchmark.main(["teacher_load", "--json", "--model", "dit-s/2", "--dir", str(tmp_path)])
    r = json.loads(capsys.readouterr().out)
    ranks = {(x["mode"], x["rank"]): x for x in r["ranks"]}
    assert set(ranks) == {(m, k) for m in ("sharded", "replicated") for k in (0, 1)}
    half = r["teacher_bytes"] / 2
    for k in (0, 1):
        sharded, replicated = ranks["sharded", k], ranks["replicated", k]
        assert sharded["share"] == pytest.approx(0.5, abs=0.01) and replicated["share"] == 1.0
        assert sharded["dtypes"] == replicated["dtypes"] == ["torch.bfloat16"]  # stored dtype, no fp32 copy
        assert replicated["peak"] - replicated["baseline"] >= r["teacher_bytes"]
        saved = (replicated["peak"] - replicated["baseline"]) - (sharded["peak"] - sharded["baseline"])
        assert 0.75 * half < saved < 1.25 * half, (k, saved / half)
    assert list(tmp_path.iterdir()) == []  # the teacher file is removed


def test_generated_teacher_file_is_the_registry_model(tmp_path):
    from models import model_config
    from models.convert import read_checkpoint

    nbytes = write_teacher("dit-s/2", "bf16", tmp_path / "t.safetensors")
    ckpt = read_checkpoint(tmp_path / "t.safetensors", lazy=True)
    assert ckpt.config == model_config("dit-s/2")
    assert nbytes == sum(t.nbytes for t in ckpt.state_dict.values())
