"""Augmentations: random flips and posterior-sampled latents, drawn per sample so that order, resume,
workers and world size never change a draw; their defaults, the stored posterior and mirrored latents
against direct VAE calls, and clear errors."""
import json

import numpy as np
import pytest
import torch

from data import DataConfig, build_loader
from data.augment import Augment, flipped, posterior_noise, resolve_augment, sample_words
from data.catalog import build_catalog, mds_entries
from data.manifest import read_manifest
from data.precompute import Encoders, PrecomputeConfig, precompute
from data.readers import MdsShard
from data.sources import digits_arrays, imagefolder_source
from data.writers import write_dataset
from tests.data_helpers import assert_same_batches, png, take, tiny_encoders, write_digits


@pytest.fixture(scope="module")
def classes(tmp_path_factory):
    """40 random 8×8 RGB images in two class folders: class-conditional data that may be mirrored."""
    root = tmp_path_factory.mktemp("aug")
    for i in range(40):
        folder = root / "images" / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:02d}.png").write_bytes(png(8, 8, seed=i))
    out = str(root / "wds")
    write_dataset(imagefolder_source(str(root / "images")), out, "wds", samples_per_shard=12)
    return out


def _cfg(path, **kw):
    return DataConfig(**{"format": "wds", "path": path, "batch_size": 8, "image_size": 8, "seed": 5, **kw})


def test_defaults_follow_the_recipes():
    kw = dict(fields={"image", "cls", "caption"}, where="x")
    assert resolve_augment(None, None, input="image", cond="class", source="imagefolder", **kw) == Augment(flip=True)  # DiT
    assert resolve_augment(None, None, input="image", cond="text_emb", source="pairs", **kw) == Augment()  # PixArt-Σ
    assert resolve_augment(None, None, input="image", cond="class", source="digits", **kw) == Augment()  # a mirrored 2 is no 2
    assert resolve_augment(True, None, input="image", cond="class", source="digits", **kw) == Augment(flip=True)
    lat = dict(input="latent", cond="class", source="imagefolder", where="x")
    assert resolve_augment(None, None, fields={"latent", "cls"}, **lat) == Augment()  # no mirrored copy: nothing to flip to
    full = {"latent", "latent_std", "latent_flip", "latent_flip_std", "cls"}
    assert resolve_augment(None, None, fields=full, **lat) == Augment(flip=True, sample_latent=True)
    assert resolve_augment(False, False, fields=full, **lat) == Augment()
    for flip, sample, fields, match in ((True, None, {"latent"}, "--flip-copy"), (None, True, {"latent"}, "--posterior"),
                                        (True, True, {"latent", "latent_std", "latent_flip"}, "--flip-copy --posterior")):
        with pytest.raises(ValueError, match=match):
            resolve_augment(flip, sample, fields=fields, **lat)
    assert build_catalog(DataConfig()).specs[0].augment == Augment()  # the bundled digits, as the quickstart trains on them


def test_flips_are_per_sample_and_redrawn_each_epoch(classes):
    plain = take(build_loader(_cfg(classes, flip=False), 0, 1), 10)  # 5 steps per epoch: 2 epochs
    aug = take(build_loader(_cfg(classes), 0, 1), 10)  # class-conditional: flipped by default
    state = {}
    for step, (p, a) in enumerate(zip(plain, aug)):
        assert p["key"] == a["key"]
        for k, xp, xa in zip(p["key"], p["x"], a["x"]):
            mirror = torch.equal(xa, xp.flip(-1))
            assert mirror or torch.equal(xa, xp)
            assert not torch.equal(xp, xp.flip(-1))  # random images: a flip is visible
            state.setdefault(k, []).append(mirror)
    per_epoch = np.array([v for v in state.values() if len(v) == 2])
    assert len(per_epoch) == 40 and 0.3 < per_epoch.mean() < 0.7  # about half flipped
    assert (per_epoch[:, 0] != per_epoch[:, 1]).any()  # a new draw every epoch, not a fixed mirror


@pytest.mark.parametrize("workers", [0, 2])
def test_flips_resume_exactly_and_do_not_depend_on_world_size(classes, workers):
    ref = take(build_loader(_cfg(classes), 0, 1), 8)
    loader = build_loader(_cfg(classes, num_workers=workers), 0, 1)
    assert_same_batches(take(loader, 3), ref[:3])
    state = json.loads(json.dumps(loader.state_dict()))
    resumed = build_loader(_cfg(classes, num_workers=2 - workers), 0, 1)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 5), ref[3:])
    ranks = [build_loader(_cfg(classes, batch_size=4, num_workers=workers), r, 2) for r in range(2)]
    for step in range(4):  # rank r holds rows [4r, 4r+4) of the single-process global batch, flips included
        halves = [next(ld) for ld in ranks]
        assert torch.equal(torch.cat([h["x"] for h in halves]), ref[step]["x"])


@pytest.fixture(scope="module")
def posterior(tmp_path_factory):
    root = tmp_path_factory.mktemp("post")
    vae, _ = tiny_encoders(str(root))
    src = write_digits(str(root / "in"), "mds", n=24, samples_per_shard=12)
    cfg = PrecomputeConfig(vae=vae, image_size=8, posterior=True, flip_copy=True, batch_size=8)
    out = str(root / "latents")
    enc = Encoders(cfg)
    precompute(src, out, cfg, encoders=enc)
    return out, enc


def test_posterior_and_mirrored_latents_match_direct_vae_calls(posterior):
    out, enc = posterior
    m = read_manifest(out)
    assert m.fields == ["caption", "cls", "json", "key", "latent", "latent_flip", "latent_flip_std", "latent_std"]
    assert m.latent["posterior"] and m.latent["flip_copy"]
    rec = m.groups[0].shards[0]
    shard = MdsShard(f"{out}/{rec.path}", mds_entries(out, m)[rec.path])
    raw = shard.read(0, frozenset(m.fields))
    img = torch.from_numpy(digits_arrays()[0][int(raw["key"])]).expand(3, -1, -1)[None]
    with torch.no_grad():
        dist, mirror = enc.vae.encode(img).latent_dist, enc.vae.encode(img.flip(-1)).latent_dist
    for name, ref in (("latent", dist.mean), ("latent_std", dist.std), ("latent_flip", mirror.mean), ("latent_flip_std", mirror.std)):
        assert raw[name].dtype == np.float16
        torch.testing.assert_close(torch.from_numpy(raw[name].astype(np.float32)), ref[0], rtol=1e-3, atol=1e-3)  # fp16
    assert not torch.allclose(mirror.mean, dist.mean.flip(-1), atol=1e-2)  # a latent of the mirror is no mirrored latent


def test_each_step_draws_its_latent_from_the_posterior(posterior):
    out, _ = posterior
    stored = _stored(out)
    cfg = DataConfig(format="mds", path=out, input="latent", cond="class", batch_size=8, flip=True, seed=3)
    loader = build_loader(cfg, 0, 1)
    assert loader.catalog.specs[0].augment == Augment(flip=True, sample_latent=True)  # std stored: on by default
    shards, index = _addresses(loader.catalog)
    mirrored = 0
    for b in take(build_loader(DataConfig(**{**cfg.__dict__, "sample_latent": False}), 0, 1), 3):
        for k, x in zip(b["key"], b["x"]):  # without sampling: the stored mean of the copy the flip chose, × 0.5
            flip = flipped(sample_words(3, 0, shards[k], index[k]))
            assert torch.equal(x, torch.from_numpy(stored[k]["latent_flip" if flip else "latent"].astype(np.float32)) * 0.5)
            mirrored += flip
    assert 3 <= mirrored <= 21
    seen = {}
    for b in take(loader, 6):  # two epochs
        for k, x in zip(b["key"], b["x"]):
            seen.setdefault(k, []).append(x)
    eps = []
    for k, xs in seen.items():
        assert len(xs) == 2 and not torch.equal(xs[0], xs[1])  # a new latent every epoch
        for epoch, x in enumerate(xs):  # x = 0.5 · (mean + std · ε) of whichever copy the flip chose
            words = sample_words(3, epoch, shards[k], index[k])
            name = "latent_flip" if flipped(words) else "latent"
            mean, std = (torch.from_numpy(stored[k][n].astype(np.float32)) for n in (name, f"{name}_std"))
            e = (x / 0.5 - mean) / std
            torch.testing.assert_close(e, torch.from_numpy(posterior_noise(words, tuple(x.shape))), rtol=1e-4, atol=1e-4)
            eps.append(e)
    eps = torch.stack(eps)
    assert abs(eps.mean()) < 0.1 and abs(eps.std() - 1) < 0.1  # standard normal ε (24 samples × 2 epochs × 64 values)
    state = loader.state_dict()
    rest = take(loader, 2)
    again = build_loader(DataConfig(**{**cfg.__dict__, "num_workers": 2}), 0, 1)
    again.load_state_dict(state)
    assert_same_batches(take(again, 2), rest)


def _addresses(catalog):
    """Key → (catalog shard id, index in shard), read straight from the shards."""
    shards, index = {}, {}
    for sid, loc in enumerate(catalog.shards):
        reader = loc.open()
        for i in range(loc.samples):
            key = reader.read(i, frozenset())["key"]
            shards[key], index[key] = sid, i
        reader.close()
    return shards, index


def _stored(out):
    m = read_manifest(out)
    entries, stored = mds_entries(out, m), {}
    for rec in m.groups[0].shards:
        shard = MdsShard(f"{out}/{rec.path}", entries[rec.path])
        for i in range(rec.samples):
            raw = shard.read(i, frozenset(m.fields))
            stored[raw["key"]] = {k: np.array(v) for k, v in raw.items() if k.startswith("latent")}
        shard.close()
    return stored


def test_missing_stored_copies_are_clear_errors(posterior, tmp_path):
    out, _ = posterior
    plain = str(tmp_path / "plain")
    src = write_digits(str(tmp_path / "in"), "mds", n=8, samples_per_shard=8)
    precompute(src, plain, PrecomputeConfig(vae=read_manifest(out).latent["vae"], image_size=8))
    with pytest.raises(ValueError, match="precompute with `--flip-copy`"):
        build_loader(DataConfig(format="mds", path=plain, input="latent", cond="class", batch_size=4, flip=True), 0, 1)
    with pytest.raises(ValueError, match="precompute with `--posterior`"):
        build_loader(DataConfig(format="mds", path=plain, input="latent", cond="class", batch_size=4, sample_latent=True), 0, 1)
    b = next(build_loader(DataConfig(format="mds", path=plain, input="latent", cond="class", batch_size=4), 0, 1))
    assert b["x"].shape == (4, 4, 4, 4)  # defaults: the mean, unflipped (no copies stored)

