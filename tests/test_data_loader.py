"""The loader: batches, same samples in every format, seeded order, exact and elastic resume, buckets."""
import json

import numpy as np
import pytest
import torch

from data import DataConfig, build_loader, digits_arrays
from data.buckets import bucket_table, nearest_bucket
from data.sources import pairs_source
from data.writers import write_dataset
from tests.data_helpers import assert_same_batches, png, take, write_digits


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    return {fmt: write_digits(str(root / fmt), fmt, samples_per_shard=250) for fmt in ("wds", "mds")}


def cfg_for(fmt, shards, **kw):
    return DataConfig(format=fmt, path=None if fmt == "digits" else shards[fmt], **kw)


def test_digits_batches_have_the_promised_types():
    loader = build_loader(DataConfig(batch_size=32, image_size=16), 0, 1)
    b = next(loader)
    assert b["x"].shape == (32, 1, 16, 16) and b["x"].dtype == torch.float32
    assert -1.0 <= b["x"].min() < 0 < b["x"].max() <= 1.0
    assert b["y"].dtype == torch.int64 and b["y"].shape == (32,) and 0 <= b["y"].min() and b["y"].max() <= 9
    assert isinstance(b["key"], list) and len(set(b["key"])) == 32
    b = next(build_loader(DataConfig(batch_size=4, cond="caption"), 0, 1))
    assert b["caption"] == [f"a handwritten digit {int(y)}" for y in b["y"]]
    x, y = digits_arrays()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == np.float32 and x.min() == -1.0 and x.max() == 1.0
    assert y.shape == (1797,) and set(y.tolist()) == set(range(10))
    assert digits_arrays(32)[0].shape == (1797, 1, 32, 32)


@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_shards_hold_the_same_samples_as_in_memory_digits(shards, fmt):
    x, y = digits_arrays(16)
    loader = build_loader(cfg_for(fmt, shards, batch_size=599, image_size=16), 0, 1)  # 3 × 599 = 1797
    seen = {}
    for b in take(loader, 3):
        for k, xi, yi in zip(b["key"], b["x"], b["y"]):
            seen[k] = (xi, int(yi))
    assert len(seen) == 1797
    assert all(torch.equal(xi, torch.from_numpy(x[int(k)])) and yi == y[int(k)] for k, (xi, yi) in seen.items())


def test_order_is_seeded_and_independent_of_workers(shards):
    a = take(build_loader(cfg_for("wds", shards, batch_size=64, seed=3), 0, 1), 4)
    b = take(build_loader(cfg_for("wds", shards, batch_size=64, seed=3, num_workers=2), 0, 1), 4)
    c = take(build_loader(cfg_for("wds", shards, batch_size=64, seed=4), 0, 1), 4)
    assert_same_batches(a, b)
    assert a[0]["key"] != c[0]["key"]
    in_order = next(build_loader(cfg_for("mds", shards, batch_size=64, shuffle=False), 0, 1))["key"]
    assert in_order == [f"{i:05d}" for i in np.random.default_rng(0).permutation(1797)[:64]]  # as the writer wrote them
    assert next(build_loader(DataConfig(batch_size=3, shuffle=False), 0, 1))["key"] == ["00000", "00001", "00002"]


def test_epochs_cover_each_sample_once_and_reshuffle():
    loader = build_loader(DataConfig(batch_size=64), 0, 1)
    assert loader.steps_per_epoch == 28
    epoch0 = [k for b in take(loader, 28) for k in b["key"]]
    assert len(set(epoch0)) == 28 * 64 and loader.stats()["data/epoch"] == 1
    epoch1 = [k for b in take(loader, 28) for k in b["key"]]
    assert len(set(epoch1)) == 28 * 64 and epoch1 != epoch0


@pytest.mark.parametrize("fmt", ["digits", "wds", "mds"])
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_the_uninterrupted_batches(shards, fmt, workers):
    cfg = cfg_for(fmt, shards, batch_size=128, num_workers=workers, seed=7)  # 14 steps/epoch: 20 crosses an epoch
    loader = build_loader(cfg, 0, 1)
    first = take(loader, 9)
    state = json.loads(json.dumps(loader.state_dict()))  # plain, JSON-able
    rest = take(loader, 11)
    resumed = build_loader(cfg, 0, 1)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 11), rest)
    assert resumed.stats()["data/batches"] == 20 and len(first) == 9
    other = build_loader(cfg_for(fmt, shards, batch_size=128, num_workers=2 - workers, seed=7), 0, 1)
    other.load_state_dict(state)  # another number of workers resumes the same stream
    assert_same_batches(take(other, 3), rest[:3])


def test_ranks_take_disjoint_slices(shards):
    r0 = build_loader(cfg_for("mds", shards, batch_size=50), 0, 2)
    r1 = build_loader(cfg_for("mds", shards, batch_size=50), 1, 2)
    keys = [k for _ in range(17) for b in (next(r0), next(r1)) for k in b["key"]]
    assert len(keys) == len(set(keys)) == 1700


@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_resume_on_another_world_size_neither_repeats_nor_skips(shards, fmt):
    old = [build_loader(cfg_for(fmt, shards, batch_size=50, num_workers=w), r, 2) for r, w in ((0, 0), (1, 2))]
    seen = [k for _ in range(5) for ld in old for k in next(ld)["key"]]
    state = old[0].state_dict()
    new = [build_loader(cfg_for(fmt, shards, batch_size=50), r, 3) for r in range(3)]
    for ld in new:
        ld.load_state_dict(state)
    steps = new[0].steps_per_epoch
    while new[0].stats()["data/epoch"] == 0:
        seen += [k for ld in new for k in next(ld)["key"]]
    # 500 samples before, then (1797 - 500) // 150 = 8 steps of 150; the last 97 are dropped this epoch
    assert len(seen) == len(set(seen)) == 500 + 8 * 150
    assert steps == 1797 // 150  # full epochs from now on
    assert [(ld.state_dict()["epoch"], ld.state_dict()["step"]) for ld in new] == [(1, 0)] * 3


def test_state_from_another_dataset_or_seed_is_refused(shards):
    state = build_loader(DataConfig(batch_size=64), 0, 1).state_dict()
    with pytest.raises(ValueError, match="data.seed was 0 .* and is 1 now"):
        build_loader(DataConfig(batch_size=64, seed=1), 0, 1).load_state_dict(state)
    small = write_digits(shards["wds"] + "-small", "wds", n=300)
    with pytest.raises(ValueError, match="resume on the same shards"):
        build_loader(DataConfig(format="wds", path=small, batch_size=64), 0, 1).load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        build_loader(DataConfig(batch_size=64), 0, 1).load_state_dict({**state, "version": 99})


def test_drop_last_false_sees_every_sample_and_counts_the_fill():
    loader = build_loader(DataConfig(batch_size=100, drop_last=False), 0, 1)
    assert loader.steps_per_epoch == 18
    keys = [k for b in take(loader, 18) for k in b["key"]]
    assert len(set(keys)) == 1797 and len(keys) == 1800 and loader.stats()["data/repeated"] == 3


def test_held_batches_are_never_overwritten():
    for workers in (0, 2):
        loader = build_loader(DataConfig(batch_size=64, num_workers=workers), 0, 1)
        held = next(loader)
        copy = held["x"].clone()
        view = next(loader)["x"][:3]  # a view keeps its batch's buffer alive too
        view_copy = view.clone()
        labels = next(loader)["y"]  # so does any one field of a batch
        labels_copy = labels.clone()
        for _ in range(12):
            next(loader)
        assert torch.equal(held["x"], copy) and torch.equal(view, view_copy) and torch.equal(labels, labels_copy)


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    (root / "img").mkdir()
    sizes = [(16, 64), (64, 16), (32, 32)]
    rows = []
    for i in range(24):
        h, w = sizes[i % 3]
        (root / "img" / f"{i}.png").write_bytes(png(h, w, seed=i))
        rows.append({"image": f"img/{i}.png", "caption": f"photo {i}"})
    (root / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(root / "wds")
    write_dataset(pairs_source(str(root / "p.jsonl")), out, "wds", samples_per_shard=4, bucket_resolution=64)
    return out, {f"{i:08d}": nearest_bucket(*sizes[i % 3]) for i in range(24)}


def test_bucketing_puts_one_bucket_in_each_batch(bucketed):
    path, bucket_of = bucketed
    loader = build_loader(DataConfig(format="wds", path=path, batch_size=2, buckets=True, image_size=64, cond="caption",
                                     num_workers=2), 0, 1)
    table = bucket_table(64)
    assert loader.steps_per_epoch == 12
    seen = set()
    for b in take(loader, 12):
        (bucket,) = {bucket_of[k] for k in b["key"]}
        assert b["x"].shape == (2, 3, *table[bucket])
        seen.update(b["key"])
    assert len(seen) == 24
    square = next(build_loader(DataConfig(format="wds", path=path, batch_size=5, image_size=24, cond="caption"), 0, 1))
    assert square["x"].shape == (5, 3, 24, 24) and square["caption"][0].startswith("photo ")
    with pytest.raises(ValueError, match="multiple of 16"):
        build_loader(DataConfig(format="wds", path=path, batch_size=2, buckets=True, image_size=24), 0, 1)
    with pytest.raises(ValueError, match="no class labels|cls"):
        build_loader(DataConfig(format="wds", path=path, batch_size=2, cond="class"), 0, 1)
