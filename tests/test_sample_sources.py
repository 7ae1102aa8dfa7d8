"""`launch.sample`'s sources and outputs: a run directory's EMA (by default) or student weights, text-to-image
with prompts embedded by a local encoder or read precomputed, a guidance-distilled model told g, and
`--to-shards` written so that the data loader and the evaluator read back exactly the samples."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data import DataConfig, build_loader
from launch.sample import main as sample_main
from models import build_model, load_pretrained
from models.convert import save_safetensors
from models.diffusion import build_objective
from models.diffusion.samplers import sample
from tests.helpers import randomize_
from tests.sample_helpers import npz
from tests.trainer_utils import assert_ok, run_train, write_config
from trainer.sampling import initial_noise

FAST = ["--steps", "4", "--no-progress"]


def _batches(path, cond: str, n: int, size: int) -> list[dict]:
    cfg = DataConfig(format="wds", path=str(path), input="image", cond=cond, batch_size=size, shuffle=False, image_size=8, flip=False)
    it = iter(build_loader(cfg, 0, 1))
    return [next(it) for _ in range(n // size)]


def test_a_run_directory_samples_its_ema_by_default_and_shards_read_back(tmp_path):
    from trainer.export import export_run
    from trainer.metrics.evaluator import EvalSettings, evaluate

    cfg = write_config(tmp_path / "c.yaml", model="dit-s/2", train={"steps": 3, "global_batch": 8},
                       checkpoint={"every": 3, "async_save": False}, optim={"lr": 1e-2}, ema={"decay": 0.5})
    run = tmp_path / "run"
    assert_ok(run_train(cfg, [f"run_dir={run}"]))
    exported = export_run(run, tmp_path / "exp")
    common = ["--num-samples", "12", "--chunk", "5", "--method", "ddim", "--cfg-scale", "1.5", *FAST]
    assert sample_main([str(run), "--out", str(tmp_path / "run_ema"), "--to-shards", str(tmp_path / "shards"), *common]) == 0
    assert sample_main([str(exported["ema"]), "--out", str(tmp_path / "file_ema"), "--objective", "gaussian", *common]) == 0
    assert sample_main([str(run), "--out", str(tmp_path / "run_student"), "--weights", "student", *common]) == 0
    assert sample_main([str(exported["student"]), "--out", str(tmp_path / "file_student"), *common]) == 0
    ema, student = npz(tmp_path / "run_ema" / "samples.npz"), npz(tmp_path / "run_student" / "samples.npz")
    for key in ema:
        assert np.array_equal(ema[key], npz(tmp_path / "file_ema" / "samples.npz")[key]), key
        assert np.array_equal(student[key], npz(tmp_path / "file_student" / "samples.npz")[key]), key
    assert not np.array_equal(ema["latents"], student["latents"])  # the EMA is not the student (decay 0.5, lr 1e-2)

    # the shards: the loader's batches in key order are the samples (pixels, labels); the evaluator pairs them
    got = _batches(tmp_path / "shards", "class", 12, 4)
    pixels = np.concatenate([((b["x"][:, 0] + 1) * 127.5).round().numpy() for b in got])
    assert np.array_equal(pixels.astype(np.uint8), ema["arr_0"][..., 0])
    assert np.array_equal(torch.cat([b["y"] for b in got]).numpy(), ema["labels"])
    res = evaluate(EvalSettings(samples=str(tmp_path / "run_ema" / "samples.npz"), teacher=str(tmp_path / "shards"),
                                metrics=["teacher_mse"]))
    assert res["metrics"]["teacher_mse_images"] == 0.0


@pytest.fixture(scope="module")
def text_setup(tmp_path_factory):
    """Tiny T5, text-toy weights (plain and guidance-distilled), a prompt file, and launch.precompute's
    embeddings of the same prompts (from input shards carrying the prompts.jsonl)."""
    from data.captions import write_prompts
    from data.precompute import PrecomputeConfig, precompute
    from data.sources import png_bytes
    from data.tiny_encoders import build_tiny_text_encoders
    from data.writers import write_samples

    root = tmp_path_factory.mktemp("t2i")
    enc = build_tiny_text_encoders(str(root / "enc"), clip=False)
    weights = {}
    for name in ("text-toy", "text-toy-g"):
        torch.manual_seed(0)
        m = randomize_(build_model(f"tests.toy_text_family:{name}", text_len=16), seed=1, std=0.05)
        weights[name] = root / f"{name}.safetensors"
        save_safetensors(m.state_dict(), m.config, weights[name])
    prompts = ["a handwritten seven", "the digit 3", "someone wrote nine here"]
    (root / "prompts.txt").write_text("\n".join(prompts) + "\n")
    raw = [{"key": f"{i:05d}", "image": png_bytes(np.full((8, 8), 40 * i, np.uint8)), "caption": c,
            "json": {"original_size": [8, 8], "aspect_ratio": 1.0}} for i, c in enumerate(["one", "two"])]
    write_samples(raw, str(root / "raw"), "wds", {"source": "test", "channels": 1})
    write_prompts(str(root / "raw"), [{"prompt": p} for p in prompts])
    precompute(str(root / "raw"), str(root / "pre"), PrecomputeConfig(text_encoder=enc.t5, max_length=16))
    return {"root": root, "t5": enc.t5, "weights": weights, "prompts": prompts}


def test_text_to_image_prompts_live_or_precomputed_and_shards(text_setup, tmp_path):
    from data.text_encoders import TextEncoders

    s = text_setup
    common = ["--objective", "flow", "--cfg-scale", "3", "--images-per-prompt", "2", "--chunk", "4", *FAST]
    live, pre = tmp_path / "live", tmp_path / "pre"
    assert sample_main([str(s["weights"]["text-toy"]), "--out", str(live), "--prompts", str(s["root"] / "prompts.txt"),
                        "--text-encoder", s["t5"], "--max-length", "16", "--to-shards", str(tmp_path / "shards"), *common]) == 0
    assert sample_main([str(s["weights"]["text-toy"]), "--out", str(pre), "--prompt-embeddings", str(s["root"] / "pre"),
                        *common]) == 0
    a, b = npz(live / "samples.npz"), npz(pre / "samples.npz")
    assert sorted(a) == ["arr_0", "captions", "latents"]
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert list(a["captions"]) == [p for p in s["prompts"] for _ in range(2)]

    # independently: T5 of the prompts (bf16-rounded, as shards store it), the null caption T5(""), the flow sampler
    enc = TextEncoders(s["t5"], max_length=16)
    text, null = enc.encode(s["prompts"]), enc.encode([""])
    model = load_pretrained(s["weights"]["text-toy"])
    model.set_null_condition({"text_emb": null.emb[0].bfloat16().float()})
    ids = torch.arange(4) // 2
    cond = {"text_emb": text.emb[ids].bfloat16().float(), "text_mask": text.mask[ids].bool()}
    ref = sample(model, build_objective("flow"), initial_noise(0, torch.arange(4), (1, 8, 8)), cond,
                 null_cond=model.null_condition(cond), cfg_scale=3.0, steps=4, method="euler", seq_len=64)
    assert torch.equal(torch.from_numpy(a["latents"][:4]), ref)

    # shards: text fields as precompute stores them (bf16, only the real tokens), null caption beside them
    got = _batches(tmp_path / "shards", "text_emb", 6, 3)
    emb = torch.cat([g["text_emb"] for g in got]).float()
    assert torch.equal(emb, text.emb[torch.arange(6) // 2].bfloat16().float() * text.mask[torch.arange(6) // 2, :, None])
    assert torch.equal(torch.cat([g["text_mask"] for g in got]), text.mask[torch.arange(6) // 2].bool())
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["text"]["storage"] == "unpadded" and (tmp_path / "shards" / "null_text.safetensors").exists()


def test_a_guidance_distilled_model_is_told_g_and_runs_once_per_step(text_setup, tmp_path):
    s = text_setup
    args = ["--prompt-embeddings", str(s["root"] / "pre"), "--objective", "flow", "--chunk", "3", *FAST]
    assert sample_main([str(s["weights"]["text-toy-g"]), "--out", str(tmp_path / "g3"), "--cfg-scale", "3", *args]) == 0
    assert sample_main([str(s["weights"]["text-toy"]), "--out", str(tmp_path / "cfg"), "--cfg-scale", "3", *args]) == 0
    assert json.loads((tmp_path / "g3" / "samples.json").read_text())["flops"]["forwards_per_sample"] == 4
    assert json.loads((tmp_path / "cfg" / "samples.json").read_text())["flops"]["forwards_per_sample"] == 8
    from data import load_prompt_embeddings

    _, t = load_prompt_embeddings(str(s["root"] / "pre"))
    model = load_pretrained(s["weights"]["text-toy-g"])
    cond = {"text_emb": t["text_emb"].float(), "text_mask": t["text_mask"], "guidance": torch.full((3,), 3.0)}
    ref = sample(model, build_objective("flow"), initial_noise(0, torch.arange(3), (1, 8, 8)), cond, steps=4,
                 method="euler", seq_len=64)
    assert torch.equal(torch.from_numpy(npz(tmp_path / "g3" / "samples.npz")["latents"]), ref)
