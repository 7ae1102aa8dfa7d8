"""A step's randomness is a function of (seed, step, sample position): counter-based draws
(models/rng.py) that do not depend on the rank, the batch a sample shares or an activation-checkpoint
replay, so a dynamic student on 2 ranks reproduces the 1-rank run and continues across reshards."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from models import rng
from models.dynamic import gumbel_sigmoid_ste
from tests.trainer_utils import assert_ok, losses, run_train, write_config

MULTI_RANK_RTOL = 1e-5  # a sum of two half-batch gradients instead of one mean: ~100 ulps after a few Adam steps
STEPS = 6


def test_counter_draws_are_per_sample_and_deterministic():
    seeds = rng.sample_seeds(0, 3, torch.arange(8), rng.NOISE)
    a = rng.counter_uniform(seeds, 5, 1000)
    b = rng.counter_uniform(seeds[[6, 2]], 5, 1000)  # another batch holding samples 6 and 2
    assert torch.equal(a[[6, 2]], b)
    assert not torch.equal(a, rng.counter_uniform(seeds, 6, 1000))  # salts separate streams
    assert len(set(seeds.tolist())) == 8 and all(0 <= s < 2**63 for s in seeds.tolist())
    assert not torch.equal(seeds, rng.sample_seeds(0, 4, torch.arange(8), rng.NOISE))  # the step matters
    assert not torch.equal(seeds, rng.sample_seeds(1, 3, torch.arange(8), rng.NOISE))  # and the seed
    assert not torch.equal(seeds, rng.sample_seeds(0, 3, torch.arange(8), rng.TIMESTEP))  # and the stream


def test_counter_draws_have_the_right_laws():
    seeds = rng.sample_seeds(7, 0, torch.arange(64), 1)
    u = rng.counter_uniform(seeds, 0, 4096).flatten().double()
    assert 0 < u.min() and u.max() < 1
    # Kolmogorov–Smirnov against U(0, 1): the 0.1 % critical value for n = 262,144 is 1.95/sqrt(n) = 0.0038
    ecdf = torch.arange(1, u.numel() + 1, dtype=torch.float64) / u.numel()
    assert (ecdf - u.sort().values).abs().max() < 0.0038
    z = rng.counter_normal(seeds, 0, 4096).flatten().double()
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01 and abs((z**3).mean()) < 0.03 and abs((z**4).mean() - 3) < 0.05
    # neighbouring samples and salts are uncorrelated
    x = rng.counter_uniform(seeds, 0, 4096)
    y = rng.counter_uniform(seeds, 1, 4096)
    assert abs(torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1]) < 0.01
    assert abs(torch.corrcoef(torch.stack([x[:-1].flatten(), x[1:].flatten()]))[0, 1]) < 0.01
    logistic = rng.counter_logistic(seeds, 2, 4096).flatten().double()
    assert abs(logistic.mean()) < 0.02 and abs(logistic.var() - torch.pi**2 / 3) < 0.05


def test_router_noise_follows_the_sample_not_the_batch():
    logits = torch.zeros(4, 6, requires_grad=True)
    seeds = rng.sample_seeds(0, 0, torch.arange(4), rng.ROUTERS)
    whole = gumbel_sigmoid_ste(logits, 5.0, True, seeds=seeds, salt=9)
    part = gumbel_sigmoid_ste(logits[2:], 5.0, True, seeds=seeds[2:], salt=9)
    assert torch.equal(whole[2:], part)
    again = gumbel_sigmoid_ste(logits, 5.0, True, seeds=seeds, salt=9)
    assert torch.equal(whole, again)  # an activation-checkpoint replay draws the same decisions
    assert 0.3 < whole.float().mean() < 0.7  # logits at 0: about half the units on


def _config(tmp_path):
    return write_config(
        tmp_path / "c.yaml", model="dylit-s/2",
        args={"mlp_groups": 4, "width_router_bias": 0.5, "token_router_bias": 0.5},
        train={"steps": STEPS, "global_batch": 16, "log_every": 1},
        checkpoint={"every": 3, "async_save": False, "keep_last": 0},
        dynamic={"flops_target": 0.6, "hold_steps": 0, "warmup_steps": 2, "router_lr_mult": 10.0},
        optim={"lr": 3e-3},
    )


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dyn")
    cfg = _config(root)
    assert_ok(run_train(cfg, [f"run_dir={root / 'one'}", "engine.kind=fsdp"]))
    assert_ok(run_train(cfg, [f"run_dir={root / 'two'}", "engine.kind=fsdp"], nproc=2))
    return {"cfg": cfg, "one": root / "one", "two": root / "two"}


def test_a_dynamic_student_on_two_ranks_reproduces_one_rank(refs, tmp_path):
    one, two = losses(refs["one"]), losses(refs["two"])
    assert len(one) == STEPS
    assert two == pytest.approx(one, rel=MULTI_RANK_RTOL)
    ratios = [json.loads(line)["flops/ratio"] for line in (refs["one"] / "metrics.jsonl").read_text().splitlines()]
    assert min(ratios) < 0.95  # the routers really drop units: the noise is in play
    assert_ok(run_train(refs["cfg"], [f"run_dir={tmp_path / 'ddp'}", "engine.kind=ddp"], nproc=2))
    assert losses(tmp_path / "ddp") == pytest.approx(one, rel=MULTI_RANK_RTOL)


@pytest.mark.parametrize("direction", ["2to1", "1to2"])
def test_a_dynamic_student_continues_across_a_reshard(refs, tmp_path, direction):
    src, nproc = (refs["two"], 1) if direction == "2to1" else (refs["one"], 2)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / "step_00000003", run / "checkpoints" / "step_00000003")
    shutil.copy(src / "config.yaml", run / "config.yaml")
    assert_ok(run_train(refs["cfg"], [f"run_dir={run}", "engine.kind=fsdp"], nproc=nproc))
    got = losses(run)  # steps 4..6
    ref = losses(refs["one"])[3:]
    assert len(got) == 3 and got == pytest.approx(ref, rel=10 * MULTI_RANK_RTOL)
