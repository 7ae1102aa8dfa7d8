"""`python -m launch.evaluate` end to end, and the inputs it reads.

The Inception network is a random-weight file of the FID Inception's layout (see
tests/metrics_helpers.py): the numbers are meaningless as quality, but every metric the command
prints must equal the same formula applied directly to features the network gives for the same
images in one call, and the teacher-relative errors must equal numpy on the pixels and latents.
"""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from data.writers import write_samples
from launch.evaluate import main
from tests.metrics_helpers import random_inception_state
from trainer.metrics.frechet import GaussianStats, frechet_distance, stats_of
from trainer.metrics.images import NpyStream, center_crop_arr, open_images
from trainer.metrics.inception import ENV, InceptionFeatures
from trainer.metrics.manifold import inception_score, precision_recall
from trainer.metrics.reference import load_reference, save_reference


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _write_shards(out, images, latents=None, captions=None, fmt="wds"):
    """Written in reverse key order, two per shard: the reader must restore key order."""
    samples = []
    for i in reversed(range(len(images))):
        s = {"key": f"{i:08d}", "image": _png(images[i])}
        if latents is not None:
            s["latent"] = latents[i].astype(np.float16)
        if captions is not None:
            s["caption"] = captions[i]
        samples.append(s)
    write_samples(samples, str(out), fmt, {"source": "test", "channels": 3}, samples_per_shard=2)
    return str(out)


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(random_inception_state(seed=1), path)
    return str(path)


@pytest.fixture()
def no_weights(tmp_path, monkeypatch):
    """No Inception weights anywhere this process would look."""
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


def test_npz_arrays_stream_in_chunks_stored_or_compressed(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
    for save in (np.savez, np.savez_compressed):
        path = str(tmp_path / f"{save.__name__}.npz")
        save(path, arr_0=arr, latents=rng.standard_normal((7, 2, 3)).astype(np.float32))
        chunks = list(NpyStream(path, "arr_0").chunks(3))
        assert [len(c) for c in chunks] == [3, 3, 1]
        np.testing.assert_array_equal(np.concatenate(chunks), arr)
    grey = str(tmp_path / "grey.npz")
    np.savez(grey, arr_0=arr[..., 0])
    (rgb,) = open_images(grey).chunks(10)
    np.testing.assert_array_equal(rgb, np.repeat(arr[..., :1], 3, axis=-1))
    np.savez(str(tmp_path / "float.npz"), arr_0=arr.astype(np.float32))
    with pytest.raises(ValueError, match="must be uint8"):
        open_images(str(tmp_path / "float.npz"))


def test_center_crop_follows_adms_recipe():
    """ADM's `center_crop_arr`: a 300×130 (W×H) image to 64 — the short side 130 ≥ 128, so one box
    halving to 150×65, then bicubic to round(150·64/65)=148 × 64, then the centre 64 columns from 42."""
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (130, 300, 3), dtype=np.uint8))
    half = im.resize((150, 65), resample=Image.BOX)
    want = np.asarray(half.resize((148, 64), resample=Image.BICUBIC))[:, 42:106]
    np.testing.assert_array_equal(center_crop_arr(im, 64), want)
    same = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(center_crop_arr(Image.fromarray(same), 32), same)  # already the size: untouched


@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_shards_are_read_in_key_order_with_latents_and_captions(tmp_path, fmt):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    latents = rng.standard_normal((5, 4, 2, 2)).astype(np.float16)
    caps = [f"prompt {i}" for i in range(5)]
    s = open_images(_write_shards(tmp_path / fmt, images, latents, caps, fmt))
    np.testing.assert_array_equal(np.concatenate(list(s.chunks(2))), images)
    np.testing.assert_array_equal(np.concatenate(list(s.latent_chunks(3))), latents)
    assert s.captions() == caps and len(s) == 5 and s.resolution == (16, 16)


def test_reference_reads_stored_statistics_and_computes_only_what_is_missing(tmp_path):
    rng = np.random.default_rng(2)
    stored = {"mu": rng.standard_normal(4), "sigma": np.eye(4), "mu_s": rng.standard_normal(3), "sigma_s": 2 * np.eye(3)}
    path = str(tmp_path / "adm_ref.npz")
    np.savez(path, arr_0=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8), **stored)
    calls = []

    class Summary:  # what one Inception pass over the reference images would give
        n = 6
        pool = GaussianStats(np.zeros(4), np.eye(4), 6)
        spatial = GaussianStats(np.zeros(3), np.eye(3), 6)
        pool_features = rng.standard_normal((6, 4)).astype(np.float32)

    def summarize(images):
        calls.append(len(images))
        return Summary()

    ref = load_reference(path, {"pool", "spatial"}, summarize)
    assert calls == []  # FID and sFID from the stored statistics: no image is read
    np.testing.assert_array_equal(ref.pool.mu, stored["mu"])
    np.testing.assert_array_equal(ref.spatial.sigma, stored["sigma_s"])
    ref = load_reference(path, {"pool", "spatial", "features"}, summarize)
    assert calls == [6]  # precision/recall needs per-image features: one pass over arr_0 ...
    np.testing.assert_array_equal(ref.pool.mu, stored["mu"])  # ... and the stored statistics still win for FID
    np.testing.assert_array_equal(ref.pool_features, Summary.pool_features)
    assert ref.origin == {"pool": "stored mu/sigma", "spatial": "stored mu_s/sigma_s", "features": "computed from 6 images"}

    saved = save_reference(str(tmp_path / "saved"), ref)
    again = load_reference(saved, {"pool", "spatial", "features"}, summarize)
    assert calls == [6] and saved.endswith("saved.npz")
    np.testing.assert_array_equal(again.pool_features, Summary.pool_features)
    np.testing.assert_array_equal(again.spatial.mu, stored["mu_s"])

    stats_only = str(tmp_path / "stats_only.npz")
    np.savez(stats_only, **stored)
    with pytest.raises(ValueError, match="no images"):
        load_reference(stats_only, {"features"}, summarize)


def test_evaluate_end_to_end_matches_the_formulas_on_direct_features(tmp_path, inception, capsys):
    rng = np.random.default_rng(3)
    samples = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    ref = rng.integers(40, 216, (5, 32, 32, 3), dtype=np.uint8)
    latents = rng.standard_normal((5, 4, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "samples.npz", arr_0=samples, latents=latents)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    teacher = _write_shards(tmp_path / "teacher", samples, latents)  # the same images, as shards: distance 0
    out = tmp_path / "metrics.json"
    argv = [str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), "--teacher", teacher, "--inception", inception,
            "--batch-size", "2", "--is-splits", "1", "--out", str(out), "--save-ref-stats", str(tmp_path / "ref_stats.npz")]
    assert main(argv) == 0
    table = capsys.readouterr().out
    result = json.loads(out.read_text())
    m = result["metrics"]

    net = InceptionFeatures(inception)
    fs, fr = net(samples), net(ref)  # every image in one call: chunking must not change anything
    # float64 statistics of identical features; 1e-6 relative covers chunked vs one-shot moments
    assert m["fid"] == pytest.approx(frechet_distance(stats_of(fs["pool"]), stats_of(fr["pool"])), rel=1e-6)
    assert m["sfid"] == pytest.approx(frechet_distance(stats_of(fs["spatial"]), stats_of(fr["spatial"])), rel=1e-6)
    assert m["inception_score"] == pytest.approx(inception_score(fs["logits"], 1)[0], rel=1e-6)
    assert (m["precision"], m["recall"]) == pytest.approx(precision_recall(fr["pool"], fs["pool"], 3))
    assert m["teacher_fid"] == pytest.approx(0.0, abs=1e-6 * m["fid"])
    assert m["teacher_mse_images"] == 0.0 and result["metrics"]["teacher_psnr_images"] == "inf"
    want_latent_mse = float(np.mean((latents.astype(np.float64) - latents.astype(np.float16).astype(np.float64)) ** 2))
    assert m["teacher_mse_latents"] == pytest.approx(want_latent_mse, rel=1e-9)  # the shards store float16
    assert m["samples"] == 5 and result["inputs"]["reference"]["origin"]["pool"] == "computed from 5 images"
    assert result["inception"]["standard_weights"] is False and result["settings"]["batch_size"] == 2
    assert f"{m['fid']:.4f}" in table and "sFID" in table and "precision" in table

    # the saved reference: ADM's layout plus the pool_3 features, which stand in for the images next time
    saved = np.load(tmp_path / "ref_stats.npz")
    assert set(saved.files) == {"mu", "sigma", "mu_s", "sigma_s", "pool_3"}
    direct = stats_of(fr["pool"])
    np.testing.assert_allclose(saved["mu"], direct.mu, rtol=1e-9)
    np.testing.assert_allclose(saved["sigma"], direct.sigma, rtol=1e-6, atol=1e-9 * np.abs(direct.sigma).max())
    out2 = tmp_path / "again.json"
    assert main([str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref_stats.npz"), "--inception", inception,
                 "--metrics", "pr", "--out", str(out2)]) == 0
    again = json.loads(out2.read_text())
    assert (again["metrics"]["precision"], again["metrics"]["recall"]) == (m["precision"], m["recall"])
    assert again["inputs"]["reference"]["origin"]["features"] == "stored pool_3"


def test_teacher_mse_needs_no_weights_and_is_numpys(tmp_path, no_weights, capsys):
    rng = np.random.default_rng(4)
    a, b = (rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8) for _ in range(2))
    la, lb = (rng.standard_normal((3, 4, 2, 2)).astype(np.float32) for _ in range(2))
    np.savez(tmp_path / "student.npz", arr_0=a, latents=la)
    np.savez(tmp_path / "teacher.npz", arr_0=b, latents=lb)
    out = tmp_path / "m.json"
    assert main([str(tmp_path / "student.npz"), "--teacher", str(tmp_path / "teacher.npz"), "--metrics", "teacher_mse",
                 "--out", str(out)]) == 0
    m = json.loads(out.read_text())["metrics"]
    want = np.mean((a / 255.0 - b / 255.0) ** 2)
    assert m["teacher_mse_images"] == pytest.approx(want, rel=1e-12)
    assert m["teacher_psnr_images"] == pytest.approx(10 * np.log10(1 / want), rel=1e-12)
    assert m["teacher_mse_latents"] == pytest.approx(np.mean((la.astype(np.float64) - lb) ** 2), rel=1e-12)
    capsys.readouterr()
    # the default asks for Inception metrics too: without weights that is an error naming the way out
    assert main([str(tmp_path / "student.npz"), "--teacher", str(tmp_path / "teacher.npz")]) == 2
    err = capsys.readouterr().err
    assert "pt_inception-2015-12-05-6726825d.pth" in err and "--metrics teacher_mse" in err


@pytest.mark.parametrize("argv, message", [
    (["--metrics", "fid,blur"], "unknown metric"),
    (["--metrics", "fid"], "'fid' needs --ref"),
    (["--metrics", "clip"], "'clip' needs --clip-model"),
    (["--device", "cuda:0", "--metrics", "teacher_mse", "--teacher", "{s}"], "CUDA is not available"),
    (["--metrics", "teacher_mse", "--teacher", "{t}"], "pair sample i with sample i"),
    (["--ref", "{missing}"], "does not exist"),
    (["--metrics", "is", "--inception", "{w}"], "cannot make 10 Inception Score splits"),
])
def test_bad_settings_are_clear_errors(tmp_path, no_weights, capsys, argv, message):
    if "cuda" in argv[1] and torch.cuda.is_available():
        pytest.skip("CUDA is available")
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "t.npz", arr_0=np.zeros((3, 8, 8, 3), np.uint8))
    (tmp_path / "w.pth").write_bytes(b"")  # never opened: the count is checked before the network loads
    fill = {"s": str(tmp_path / "s.npz"), "t": str(tmp_path / "t.npz"), "missing": str(tmp_path / "nope.npz"),
            "w": str(tmp_path / "w.pth")}
    assert main([str(tmp_path / "s.npz")] + [a.format(**fill) for a in argv]) == 2
    assert message in capsys.readouterr().err
