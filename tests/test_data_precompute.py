"""Precompute with tiny random-weight VAE and T5 saved locally: output, crash resume, rank split, buckets, CLI."""
import json
import os

import numpy as np
import pytest
import torch

from data import DataConfig, build_loader
from data.manifest import read_manifest
from data.precompute import Encoders, PrecomputeConfig, precompute
from data.sources import pairs_source
from data.writers import write_dataset
from launch import precompute as precompute_cli
from tests.data_helpers import png, take, tiny_encoders, write_digits


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    vae, t5 = tiny_encoders(str(root))
    cfg = PrecomputeConfig(vae=vae, text_encoder=t5, max_length=6, image_size=8, batch_size=16)
    src = write_digits(str(root / "in"), "wds", n=48, samples_per_shard=16)
    return root, cfg, Encoders(cfg), src


def _files(root):
    return {os.path.relpath(os.path.join(d, n), root): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(root) for n in names if ".done" not in d}


def test_latents_and_embeddings_load_as_a_text_to_image_dataset(setup):
    root, cfg, enc, src = setup
    out = str(root / "out")
    report = precompute(src, out, cfg, encoders=enc)
    assert report.manifest_written and len(report.done) == 3 and report.skipped_samples == 0
    m = read_manifest(out)
    assert m.fields == ["caption", "cls", "json", "key", "latent", "text_emb", "text_mask"]
    assert m.groups[0].latent_shape == [4, 4, 4] and m.text == {"max_length": 6, "dim": 16, "encoder": os.path.abspath(cfg.text_encoder)}
    assert m.latent["scaling_factor"] == 0.5 and m.samples == 48
    b = next(build_loader(DataConfig(format="wds", path=out, input="latent", cond="text_emb", batch_size=4, shuffle=False), 0, 1))
    assert b["x"].shape == (4, 4, 4, 4) and b["text_emb"].shape == (4, 6, 16) and b["text_mask"].dtype == torch.bool
    # the first sample by hand: PNG → [-1, 1] RGB → VAE mean × 0.5; caption → T5
    from data.sources import digits_arrays
    i = int(b["key"][0])
    img = torch.from_numpy(digits_arrays()[0][i]).expand(3, -1, -1)[None]
    with torch.no_grad():
        z = enc.vae.encode(img).latent_dist.mean[0] * 0.5
    assert torch.allclose(b["x"][0], z.half().float() * 1.0, atol=2e-3)
    tok = enc.tokenizer([f"a handwritten digit {int(b['y'][0])}"], max_length=6, padding="max_length", truncation=True)
    assert b["text_mask"][0].tolist() == [bool(v) for v in tok["attention_mask"][0]]


def test_a_crash_costs_only_the_shard_in_flight(setup, monkeypatch):
    root, cfg, enc, src = setup
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
    root, cfg, enc, src = setup
    out = str(root / "ranks")
    r0 = precompute(src, out, cfg, rank=0, world_size=2, encoders=enc)
    assert r0.done == ["shard-000000.tar", "shard-000002.tar"] and not r0.manifest_written
    r1 = precompute(src, out, cfg, rank=1, world_size=2, encoders=enc)
    assert r1.done == ["shard-000001.tar"] and r1.manifest_written
    assert _files(out) == _files(str(root / "out"))


def test_bucketed_images_become_latents_of_their_bucket_shape(setup):
    root, cfg, enc, _ = setup
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
    root, cfg, _, src = setup
    out = str(root / "cli")
    args = ["--in", src, "--out", out, "--vae", cfg.vae, "--text-encoder", cfg.text_encoder, "--max-length", "6",
            "--image-size", "8", "--format", "mds", "--device", "cpu"]
    assert precompute_cli.main(args + ["--rank", "1", "--world-size", "3"]) == 0
    assert "rank 1/3: wrote 1 shards" in capsys.readouterr().out
    assert precompute_cli.main(args + ["--rank", "1", "--world-size", "3"]) == 0
    assert "0 shards, 1 were already done" in capsys.readouterr().out
    with pytest.raises(ValueError, match="give --vae and/or --text-encoder"):
        precompute(src, out, PrecomputeConfig())
    with pytest.raises(ValueError, match="--image-size is required"):
        precompute(src, out, PrecomputeConfig(vae=cfg.vae))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        precompute(src, out, PrecomputeConfig(vae="stabilityai/sdxl-vae", image_size=8))
    assert np.isclose(read_manifest(str(root / "out")).latent["scaling_factor"], 0.5)
