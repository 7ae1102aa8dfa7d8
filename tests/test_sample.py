"""`launch.sample`: sample i is a function of (seed, i) alone, 2 ranks write the bytes 1 rank writes, a
kill -9 mid-run resumes with only the missing chunks, and the outputs hold what the issue asks for."""
from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch

from launch.sample import main as sample_main
from models import load_pretrained
from models.diffusion import build_objective
from models.diffusion.samplers import sample
from tests.fault_utils import finish, kill9, start, tail, wait_until
from tests.sample_helpers import dynamic_weights, npz, run_sample, sample_cmd
from tests.trainer_utils import base_env
from trainer.sample_store import chunk_path
from trainer.sampling import Sampler, class_labels, initial_noise, sample_latents, step_noise_fn

ARGS = ["--num-samples", "22", "--chunk", "4", "--method", "ddpm", "--steps", "8", "--cfg-scale", "1.5", "--no-progress"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return dynamic_weights(tmp_path_factory.mktemp("w") / "dydit.safetensors")


def test_per_sample_draws_do_not_depend_on_the_batch():
    idx = torch.arange(40)
    noise = initial_noise(3, idx, (2, 4, 4))
    assert torch.equal(noise[[7, 31]], initial_noise(3, torch.tensor([7, 31]), (2, 4, 4)))
    assert not torch.equal(noise, initial_noise(4, idx, (2, 4, 4)))  # the seed matters
    x = torch.zeros(40, 2, 4, 4)
    step = step_noise_fn(3, idx)
    assert torch.equal(step(5, x)[[7, 31]], step_noise_fn(3, torch.tensor([7, 31]))(5, x[:2]))
    assert not torch.equal(step(5, x), step(6, x))  # a new draw every step
    assert not torch.equal(step(0, x), noise.view_as(x))  # and not the initial noise again
    labels = class_labels(3, idx, 10)
    assert torch.equal(labels[[7, 31]], class_labels(3, torch.tensor([7, 31]), 10))
    assert torch.equal(class_labels(3, idx, 10, balanced=True), idx % 10)


def test_labels_drawn_per_sample_are_uniform():
    counts = np.bincount(class_labels(0, torch.arange(20000), 1000).numpy(), minlength=1000)
    chi2 = float(((counts - 20.0) ** 2 / 20.0).sum())  # 999 degrees of freedom: 0.1 % critical value 1143
    assert chi2 < 1143 and counts.min() >= 1


def test_step_noise_replaces_the_generator_draws_exactly(weights):
    """The sampler's `step_noise` hook: feeding it the generator's own draws reproduces the generator path."""
    model, objective = load_pretrained(weights), build_objective("gaussian")
    noise, cond = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)), {"y": torch.tensor([1, 2, 3])}
    ref = sample(model, objective, noise, cond, steps=5, method="ddpm", generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    got = sample(model, objective, noise, cond, steps=5, method="ddpm",
                 step_noise=lambda i, x: torch.randn(x.shape, generator=g, dtype=x.dtype))
    assert torch.equal(ref, got)


def test_a_sample_does_not_depend_on_its_chunk_beyond_blas_rounding(weights):
    """The same samples in chunks of 12 and of 5 + 7: the draws are per sample, so only GEMM rounding of
    the other batch shapes differs (measured here: a few 1e-4 in latents after 50 DDPM steps, below
    one uint8 level). This is why chunks have a fixed size: then the bytes are equal."""
    model, objective = load_pretrained(weights), build_objective("gaussian")
    s = Sampler(method="ddpm", steps=50, cfg_scale=1.5)
    idx = torch.arange(12)

    def run(ix):
        return sample_latents(model, objective, s, ix, model.condition({"y": class_labels(0, ix, 10)}), shape=(1, 8, 8),
                              device=torch.device("cpu"))

    (whole, f_whole), parts = run(idx), [run(idx[:5]), run(idx[5:])]
    split = torch.cat([p[0] for p in parts])
    assert (whole - split).abs().max() < 2e-3
    assert torch.equal(run(idx[:5])[0], parts[0][0])  # the same chunk again: the same bits
    levels = (127.5 * whole + 128).clamp(0, 255) - (127.5 * split + 128).clamp(0, 255)
    assert levels.abs().max() < 1.0
    assert torch.equal(f_whole, torch.cat([p[1] for p in parts]))  # the routers decided the same


def test_two_ranks_write_the_bytes_of_one_and_a_kill9_resumes_only_missing_chunks(weights, tmp_path):
    one = run_sample(str(weights), "--out", str(tmp_path / "one"), *ARGS)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_sample(str(weights), "--out", str(tmp_path / "two"), *ARGS, nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    ref = npz(tmp_path / "one" / "samples.npz")
    got = npz(tmp_path / "two" / "samples.npz")
    assert sorted(ref) == ["arr_0", "labels", "latents", "realised_flops"]
    assert ref["arr_0"].shape == (22, 8, 8, 3) and ref["arr_0"].dtype == np.uint8
    for key in ref:
        assert ref[key].tobytes() == got[key].tobytes(), key
    assert len(np.unique(ref["realised_flops"])) > 1  # the routers' choices differ between samples
    report = json.loads((tmp_path / "one" / "samples.json").read_text())
    assert report["flops"]["per_sample_mean"] == pytest.approx(float(ref["realised_flops"].mean()))
    assert report["flops"]["forwards_per_sample"] == 16 and 0.3 < report["flops"]["ratio_to_static"] < 0.99

    # kill -9 a 2-rank run after its first chunks, relaunch it on 1 rank: only the missing chunks are sampled
    out = tmp_path / "killed"
    log = tmp_path / "killed.log"
    proc = start(sample_cmd(str(weights), "--out", str(out), *ARGS, nproc=2), log, base_env(DITILL_DEBUG_FAULTS="slow_step=1.0"))
    wait_until(lambda: chunk_path(out, 0).exists() and chunk_path(out, 1).exists(), [proc], what="two chunks")
    kill9([proc])
    assert proc.returncode == -signal.SIGKILL
    done = {c: chunk_path(out, c).stat() for c in range(6) if chunk_path(out, c).exists()}
    assert 2 <= len(done) < 6 and not (out / "samples.npz").exists()
    again = start(sample_cmd(str(weights), "--out", str(out), *ARGS), tmp_path / "again.log", base_env())
    assert finish([again]) == [0], tail(tmp_path / "again.log")
    assert f"{len(done)} done, {6 - len(done)} to sample" in tail(tmp_path / "again.log", 10**6)
    for c, st in done.items():  # finished chunks were kept, not rewritten
        now = chunk_path(out, c).stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert not list((out / "chunks").glob("*.tmp-*"))
    resumed = npz(out / "samples.npz")
    for key in ref:
        assert ref[key].tobytes() == resumed[key].tobytes(), key


def test_settings_are_checked_before_any_work(weights, tmp_path, capsys):
    out = str(tmp_path / "o")
    cases = [
        (["--prompts", str(weights)], "--prompts: the model is class-conditional"),
        (["--num-samples", "4", "--method", "euler"], "'euler' does not sample a gaussian model"),
        (["--num-samples", "4", "--step", "3"], "SOURCE is a weights file"),
        (["--num-samples", "4", "--vae", str(tmp_path / "nowhere")], "is not a local directory"),
        (["--num-samples", "0"], "give the number of samples"),
        (["--num-samples", "4", "--chunk", "0"], "--chunk: must be ≥ 1"),
        (["--num-samples", "4", "--resolution", "128"], "DiT's position embedding is fixed to a 8² latent (64px)"),
        (["--num-samples", "4", "--bucket", "0.5"], "give the base --resolution"),
        (["--num-samples", "4", "--objective", "flow"], "'flow' does not fit the model's output; use 'gaussian'"),
    ]
    for extra, message in cases:
        assert sample_main([str(weights), "--out", out, "--no-progress", *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing started
    assert sample_main([str(weights), "--out", out, "--num-samples", "4", "--steps", "2", "--no-progress", "--png"]) == 0
    from PIL import Image

    arr = npz(tmp_path / "o" / "samples.npz")["arr_0"]
    pngs = sorted((tmp_path / "o" / "png").iterdir())
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(4)]
    assert all(np.array_equal(np.asarray(Image.open(p)), arr[i, ..., 0]) for i, p in enumerate(pngs))  # grey, lossless
    assert sample_main([str(weights), "--out", out, "--num-samples", "4", "--steps", "3", "--no-progress"]) == 2
    assert "holds samples made with other settings (changed: steps)" in capsys.readouterr().err
