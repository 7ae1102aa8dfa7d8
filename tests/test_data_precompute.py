"""Precompute with tiny random-weight VAE, T5 and CLIP saved locally: every stored value against a direct
encoder call, both mask conventions, the null caption and prompts, storage layouts, crash resume, rank
split, buckets, the CLI, and T5 sharded with FSDP2 over 2 gloo ranks."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from data import DataConfig, build_loader
from data.captions import digits_captions_source, prompt_rows, write_prompts
from data.manifest import read_manifest
from data.precompute import Encoders, PrecomputeConfig, precompute
from data.readers import WdsShard
from data.sources import Source, digits_arrays, pairs_source
from data.text_files import NULL_TEXT, load_null_text, load_prompt_embeddings
from data.writers import write_dataset
from launch import precompute as precompute_cli
from tests.data_helpers import latent_dataset, png, take, tiny_encoders, write_digits
from tests.trainer_utils import REPO, assert_ok, base_env, free_port

L = 32  # max_length: "a handwritten digit 7" is 21 bytes + </s>, so every caption is padded
BF16 = dict(rtol=2**-8, atol=1e-5)  # the stored value is the fp32 output rounded to bf16 (half an ulp: 2^-9 relative)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    vae, text = tiny_encoders(str(root))
    cfg = PrecomputeConfig(vae=vae, text_encoder=text.t5, max_length=L, image_size=8, batch_size=16)
    src = write_digits(str(root / "in"), "wds", n=48, samples_per_shard=16)
    return root, cfg, Encoders(cfg), src, text


def direct_t5(t5_dir, captions, masked):
    """The reference: transformers' own model and ByT5 tokenizer, called as PixArt (mask) or FLUX (none) do."""
    from transformers import ByT5Tokenizer, T5EncoderModel

    tok = ByT5Tokenizer()(captions, max_length=L, padding="max_length", truncation=True, return_tensors="pt")
    model = T5EncoderModel.from_pretrained(t5_dir, local_files_only=True)
    with torch.no_grad():
        out = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"] if masked else None).last_hidden_state
    return out, tok["attention_mask"].bool()


def direct_clip(clip_dir, captions):
    from transformers import ByT5Tokenizer, CLIPTextModel

    ids = ByT5Tokenizer()(captions, max_length=77, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = CLIPTextModel.from_pretrained(clip_dir, local_files_only=True)(input_ids=ids)
    return out.pooler_output, out.last_hidden_state


def _files(root):
    return {os.path.relpath(os.path.join(d, n), root): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(root) for n in names if ".done" not in d}


def test_latents_and_masked_t5_embeddings_match_direct_encoder_calls(setup):
    root, cfg, enc, src, text = setup
    out = str(root / "out")
    report = precompute(src, out, cfg, encoders=enc)
    assert report.manifest_written and len(report.done) == 3 and report.skipped_samples == 0
    m = read_manifest(out)
    assert m.fields == ["caption", "cls", "json", "key", "latent", "text_emb", "text_mask"]
    assert m.groups[0].latent_shape == [4, 4, 4] and m.latent["scaling_factor"] == 0.5 and m.samples == 48
    assert m.text == {"max_length": L, "dim": 16, "encoder": os.path.abspath(text.t5), "dtype": "bf16", "storage": "unpadded",
                      "attention_mask": True, "null": NULL_TEXT}
    b = next(build_loader(DataConfig(format="wds", path=out, input="latent", cond="text_emb", batch_size=8, shuffle=False), 0, 1))
    assert b["x"].shape == (8, 4, 4, 4) and b["text_emb"].shape == (8, L, 16) and b["text_mask"].dtype == torch.bool
    assert b["text_emb"].dtype == torch.bfloat16 and "text_pooled" not in b
    # the first sample by hand: PNG → [-1, 1] RGB → VAE mean × 0.5
    i = int(b["key"][0])
    img = torch.from_numpy(digits_arrays()[0][i]).expand(3, -1, -1)[None]
    with torch.no_grad():
        z = enc.vae.encode(img).latent_dist.mean[0] * 0.5
    assert torch.allclose(b["x"][0], z.half().float(), atol=2e-3)
    # every caption against T5 called directly with its mask; pad rows come back as zeros
    ref, mask = direct_t5(text.t5, [f"a handwritten digit {int(y)}" for y in b["y"]], masked=True)
    assert torch.equal(b["text_mask"], mask)
    valid = mask[..., None].expand_as(ref)
    torch.testing.assert_close(b["text_emb"].float()[valid], ref[valid], **BF16)
    assert not b["text_emb"][~valid].any()
    # stored unpadded: (n, D) bf16 words, n = the mask's count (22 of 32 positions)
    raw = WdsShard(os.path.join(out, m.groups[0].shards[0].path), 16).read(0, frozenset({"text_emb", "text_mask"}))
    assert raw["text_emb"].dtype == np.uint16 and raw["text_emb"].shape == (int(raw["text_mask"].sum()), 16) == (22, 16)
    # the null caption: T5("") with its mask, all L positions (pads included), as PixArt-Σ's y_embedding
    null = load_null_text(out)
    ref, mask = direct_t5(text.t5, [""], masked=True)
    assert set(null) == {"text_emb", "text_mask"} and null["text_emb"].shape == (L, 16) and null["text_emb"].dtype == torch.bfloat16
    torch.testing.assert_close(null["text_emb"].float(), ref[0], **BF16)
    assert torch.equal(null["text_mask"], mask[0]) and null["text_mask"].sum() == 1
    assert load_null_text(src) is None


@pytest.fixture(scope="module")
def flux_shards(setup):
    """Captioned digits (with prompts.jsonl) → T5 without a mask + CLIP, no VAE: images carried through."""
    root, _, _, _, text = setup
    full = digits_captions_source(captions_per_image=1)
    src = str(root / "captions")
    write_dataset(Source(full.name, full.items[:40], full.channels, full.classes), src, "mds", samples_per_shard=16)
    write_prompts(src)
    out = str(root / "flux")
    cfg = PrecomputeConfig(text_encoder=text.t5, clip_encoder=text.clip, text_attention_mask=False, max_length=L, batch_size=16)
    assert precompute(src, out, cfg).manifest_written
    return out, text


def test_mask_free_t5_and_clip_pooled_vectors_match_direct_calls(flux_shards):
    out, text = flux_shards
    m = read_manifest(out)
    assert m.fields == ["caption", "cls", "image", "json", "key", "text_emb", "text_mask", "text_pooled"] and m.channels == 1
    assert m.text["storage"] == "padded" and m.text["attention_mask"] is False and m.text["pooled_dim"] == 24
    b = next(build_loader(DataConfig(format="mds", path=out, input="image", cond="text_emb", batch_size=8, shuffle=False), 0, 1))
    x = digits_arrays()[0]
    assert all(torch.equal(b["x"][j], torch.from_numpy(x[int(k[:5])])) for j, k in enumerate(b["key"]))
    captions = [c for c in take(build_loader(DataConfig(format="mds", path=out, cond="caption", batch_size=8, shuffle=False),
                                             0, 1), 1)[0]["caption"]]
    ref, mask = direct_t5(text.t5, captions, masked=False)
    torch.testing.assert_close(b["text_emb"].float(), ref, **BF16)  # every position: the pads are encoded and kept
    assert torch.equal(b["text_mask"], mask)
    masked, _ = direct_t5(text.t5, captions, masked=True)
    assert (masked - ref)[mask].abs().max() > 0.05  # the convention matters: the test above tells the two apart
    pooled, hidden = direct_clip(text.clip, captions)
    assert b["text_pooled"].shape == (8, 24) and b["text_pooled"].dtype == torch.bfloat16
    torch.testing.assert_close(b["text_pooled"].float(), pooled, **BF16)
    eos = [len(c.encode()) for c in captions]  # CLIP pools at the end token: one id per byte, then </s>
    torch.testing.assert_close(b["text_pooled"].float(), hidden[torch.arange(8), eos], **BF16)
    null = load_null_text(out)
    ref, _ = direct_t5(text.t5, [""], masked=False)
    torch.testing.assert_close(null["text_emb"].float(), ref[0], **BF16)
    torch.testing.assert_close(null["text_pooled"].float(), direct_clip(text.clip, [""])[0][0], **BF16)


def test_evaluation_prompts_are_encoded_like_the_captions(flux_shards):
    out, text = flux_shards
    rows, tensors = load_prompt_embeddings(out)
    assert rows == prompt_rows() and tensors["text_emb"].shape == (len(rows), L, 16) and tensors["text_pooled"].shape == (len(rows), 24)
    pick = [0, 87, max(i for i, r in enumerate(rows) if r["held_out"])]  # a seen template and two held-out ones
    assert [rows[i]["held_out"] for i in pick] == [False, True, True]
    prompts = [rows[i]["prompt"] for i in pick]
    torch.testing.assert_close(tensors["text_emb"][pick].float(), direct_t5(text.t5, prompts, masked=False)[0], **BF16)
    torch.testing.assert_close(tensors["text_pooled"][pick].float(), direct_clip(text.clip, prompts)[0], **BF16)
    assert load_prompt_embeddings(str(os.path.dirname(out))) is None


def test_first_layout_float16_padded_shards_still_load(tmp_path):
    shards = latent_dataset(str(tmp_path / "old"), "wds", n=8, per_shard=4)  # fp16 (L, D), manifest without dtype/storage
    b = next(build_loader(DataConfig(format="wds", path=str(tmp_path / "old"), input="latent", cond="text_emb", batch_size=4,
                                     shuffle=False), 0, 1))
    assert b["text_emb"].dtype == torch.float16
    assert all(torch.equal(b["text_emb"][j], torch.from_numpy(s["text_emb"])) for j, s in enumerate(shards[0]))
    assert all(torch.equal(b["text_mask"][j], torch.from_numpy(s["text_mask"] != 0)) for j, s in enumerate(shards[0]))


@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_damaged_bf16_embeddings_are_skipped_and_counted(tmp_path, fmt):
    """bf16 words with an all-ones exponent (NaN/Inf), a length its mask disagrees with, float data under a bf16 label."""
    from data.manifest import write_manifest
    from data.text_encoders import bf16_words
    from tests.data_helpers import write_raw

    rng = np.random.default_rng(0)
    samples = []
    for i in range(10):
        n = 2 + i % 4
        mask = (np.arange(6) < n).astype(np.uint8)
        samples.append({"key": f"{i:06d}", "latent": rng.standard_normal((4, 4, 4)).astype(np.float16),
                        "text_emb": bf16_words(torch.randn(n, 8)), "text_mask": mask})
    samples[2]["text_emb"] = samples[2]["text_emb"].copy()
    samples[2]["text_emb"][1, 3] = 0x7FC0  # a bf16 NaN
    samples[5]["text_emb"] = samples[5]["text_emb"][:-1]  # one token fewer than its mask counts
    bad = {"000002", "000005"}
    if fmt == "wds":  # (an MDS column has one dtype: its writer refuses this one)
        samples[7]["text_emb"] = samples[7]["text_emb"].view(np.float16)  # not bf16 words
        bad.add("000007")
    m = write_raw(str(tmp_path / fmt), fmt, [samples[:5], samples[5:]], text=(6, 8))
    m.text.update(dtype="bf16", storage="unpadded")
    write_manifest(str(tmp_path / fmt), m)
    loader = build_loader(DataConfig(format=fmt, path=str(tmp_path / fmt), input="latent", cond="text_emb", batch_size=10,
                                     shuffle=False, max_skipped_fraction=1.0), 0, 1)
    b = next(loader)  # the bad ones' places are topped up with good samples from the start
    assert loader.stats()["data/skipped/nonfinite"] == 1 and loader.stats()["data/skipped/bad_shape"] == len(bad) - 1
    assert set(b["key"]) == {f"{i:06d}" for i in range(10)} - bad
    for j, key in enumerate(b["key"]):
        n = int(samples[int(key)]["text_mask"].sum())
        assert np.array_equal(b["text_emb"][j, :n].view(torch.int16).numpy().view(np.uint16), samples[int(key)]["text_emb"])
        assert not b["text_emb"][j, n:].any()


def test_a_crash_costs_only_the_shard_in_flight(setup, monkeypatch):
    root, cfg, enc, src, _ = setup
    clean = str(root / "clean")
    precompute(src, clean, cfg, encoders=enc)
    out = str(root / "crashed")
    real, calls = Encoders.latents, []

    def dying(self, images):
        calls.append(1)
        if len(calls) == 2:  # the second shard's batch
            raise RuntimeError("node lost")
        return real(self, images)

    monkeypatch.setattr(Encoders, "latents", dying)
    with pytest.raises(RuntimeError, match="node lost"):
        precompute(src, out, cfg, encoders=enc)
    monkeypatch.setattr(Encoders, "latents", real)
    assert sorted(os.listdir(out)) == [".done", "shard-000000.tar"]  # no partial shard under a final name, no manifest
    report = precompute(src, out, cfg, encoders=enc)
    assert report.skipped_shards == ["shard-000000.tar"] and report.done == ["shard-000001.tar", "shard-000002.tar"]
    assert report.manifest_written and _files(out) == _files(clean)


def test_ranks_split_the_shards_and_the_last_writes_the_manifest(setup):
    root, cfg, enc, src, _ = setup
    out = str(root / "ranks")
    r0 = precompute(src, out, cfg, rank=0, world_size=2, encoders=enc)
    assert r0.done == ["shard-000000.tar", "shard-000002.tar"] and not r0.manifest_written
    assert not os.path.exists(os.path.join(out, NULL_TEXT))  # written with the manifest, by whoever finishes
    r1 = precompute(src, out, cfg, rank=1, world_size=2, encoders=enc)
    assert r1.done == ["shard-000001.tar"] and r1.manifest_written
    assert _files(out) == _files(str(root / "out"))


def test_bucketed_images_become_latents_of_their_bucket_shape(setup):
    root, cfg, enc, _, _ = setup
    (root / "img").mkdir()
    sizes, rows = [(16, 64), (64, 16), (32, 32)], []
    for i in range(12):
        (root / "img" / f"{i}.png").write_bytes(png(*sizes[i % 3], seed=i))
        rows.append({"image": f"img/{i}.png", "caption": f"a photo of {i}"})
    (root / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = str(root / "pairs")
    write_dataset(pairs_source(str(root / "p.jsonl")), src, "mds", samples_per_shard=4, bucket_resolution=32)
    out = str(root / "pairs-latents")
    precompute(src, out, PrecomputeConfig(**{**cfg.__dict__, "image_size": None}), encoders=enc)
    m = read_manifest(out)
    assert {g.key: g.latent_shape for g in m.groups} == {"0.25": [4, 8, 32], "1.0": [4, 16, 16], "4.0": [4, 32, 8]}
    loader = build_loader(DataConfig(format="mds", path=out, input="latent", cond="text_emb", batch_size=2, buckets=True,
                                     image_size=32), 0, 1)
    shapes = [tuple(b["x"].shape[1:]) for b in take(loader, loader.steps_per_epoch)]
    assert len(shapes) == 6 and set(shapes) == {(4, 8, 32), (4, 16, 16), (4, 32, 8)}
    with pytest.raises(ValueError, match="set data.buckets=true"):
        build_loader(DataConfig(format="mds", path=out, input="latent", cond="text_emb", batch_size=2), 0, 1)


def test_cli_and_its_errors(setup, capsys):
    root, cfg, _, src, text = setup
    out = str(root / "cli")
    args = ["--in", src, "--out", out, "--vae", cfg.vae, "--text-encoder", cfg.text_encoder, "--max-length", str(L),
            "--image-size", "8", "--format", "mds", "--device", "cpu"]
    assert precompute_cli.main(args + ["--rank", "1", "--world-size", "3"]) == 0
    assert "rank 1/3: wrote 1 shards" in capsys.readouterr().out
    assert precompute_cli.main(args + ["--rank", "1", "--world-size", "3"]) == 0
    assert "0 shards, 1 were already done" in capsys.readouterr().out
    for bad, match in ((PrecomputeConfig(), "give --vae and/or --text-encoder"),
                       (PrecomputeConfig(vae=cfg.vae), "--image-size is required"),
                       (PrecomputeConfig(vae="stabilityai/sdxl-vae", image_size=8), "nothing is downloaded"),
                       (PrecomputeConfig(clip_encoder=text.clip, vae=cfg.vae), "give --text-encoder too"),
                       (PrecomputeConfig(text_encoder=text.t5, posterior=True), "give --vae"),
                       (PrecomputeConfig(text_encoder=text.t5, max_length=0), "--max-length 0"),
                       (PrecomputeConfig(text_encoder=text.t5, shard_text_encoder=True), "process group")):
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            precompute(src, out, bad)
    assert np.isclose(read_manifest(str(root / "out")).latent["scaling_factor"], 0.5)


def test_t5_sharded_over_two_ranks_gives_the_unsharded_embeddings(setup, flux_shards):
    """torchrun, 2 gloo ranks, FSDP2: 3 shards split 2/1, so rank 1 runs padding forwards to stay in step."""
    root, _, _, _, text = setup
    src = os.path.join(str(root), "captions")
    single, sharded = str(root / "t5-single"), str(root / "t5-sharded")
    common = ["--in", src, "--text-encoder", text.t5, "--clip-encoder", text.clip, "--max-length", str(L), "--batch-size", "16"]
    assert precompute_cli.main(common + ["--out", single, "--device", "cpu"]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "launch.precompute", *common, "--out", sharded, "--shard-text-encoder"]
    proc = subprocess.run(cmd, cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=300)
    assert_ok(proc)
    log = proc.stdout + proc.stderr
    held = sorted(tuple(map(int, m)) for m in re.findall(r"over 2 ranks: rank (\d) holds (\d+) of its (\d+) parameters", log))
    assert len(held) == 2 and "manifest written" in log
    (a_rank, a_held, a_total), (b_rank, b_held, b_total) = held
    assert (a_rank, b_rank) == (0, 1) and a_held + b_held == a_total == b_total and max(a_held, b_held) < 0.6 * a_total
    assert read_manifest(sharded).samples == read_manifest(single).samples == 40
    cfg = dict(format="mds", input="image", cond="text_emb", batch_size=40, shuffle=False)
    a = next(build_loader(DataConfig(path=single, **cfg), 0, 1))
    b = next(build_loader(DataConfig(path=sharded, **cfg), 0, 1))
    assert a["key"] == b["key"]
    torch.testing.assert_close(b["text_emb"].float(), a["text_emb"].float(), **BF16)
    torch.testing.assert_close(b["text_pooled"].float(), a["text_pooled"].float(), **BF16)
    torch.testing.assert_close(load_null_text(sharded)["text_emb"].float(), load_null_text(single)["text_emb"].float(), **BF16)
    torch.testing.assert_close(load_prompt_embeddings(sharded)[1]["text_emb"].float(),
                               load_prompt_embeddings(single)[1]["text_emb"].float(), **BF16)


def test_storage_benchmark_reports_the_bytes_the_layouts_must_take(capsys):
    from launch import benchmark

    D = 64
    assert benchmark.main(["text-storage", "--samples", "6", "--dim", str(D), "--json"]) == 0
    rows = {(r["captions"], r["layout"]): r for r in json.loads(capsys.readouterr().out)["rows"]}
    member = lambda payload: 512 + -(-(128 + payload) // 512) * 512  # tar header block + .npy (128-byte header) in blocks
    for captions in ("short captions", "long captions"):
        old, new, flux = (rows[(captions, k)] for k in ("fp16 padded (first layout)", "bf16 unpadded (PixArt-Σ)", "bf16 padded (FLUX)"))
        assert old["text_emb_bytes"] == member(300 * D * 2) and flux["text_emb_bytes"] == member(512 * D * 2)
        assert abs(new["text_emb_bytes"] - (512 + 128 + new["tokens"] * D * 2)) <= 512  # n tokens × D × 2 B, rounded to blocks
        assert new["fp32_padded_bytes"] == 300 * D * 4 and flux["fp32_padded_bytes"] == 512 * D * 4
    assert rows[("long captions", "bf16 unpadded (PixArt-Σ)")]["tokens"] > 4 * rows[("short captions", "bf16 unpadded (PixArt-Σ)")]["tokens"]
