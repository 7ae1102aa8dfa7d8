"""End-to-end training jobs on the bundled digits: multi-rank equals single-process, resume
continues the same trajectory, activation checkpointing changes nothing, distillation learns."""
import io
import math

import pytest
import torch

from tests.trainer_utils import assert_ok, losses, metrics, run_train, write_config

# The 2-rank runs reduce gradients in a different order than the single process (a sum of two
# half-batch means instead of one mean), so the parameters differ in the last bits after step 1 and
# the difference compounds over a few Adam steps; 1e-5 relative is ~100 float32 ulps.
MULTI_RANK_RTOL = 1e-5


def test_two_ranks_ddp_and_fsdp_match_single_process(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", model="lit-s/2")
    assert_ok(run_train(cfg, [f"run_dir={tmp_path / 'single'}"]))
    ref = losses(tmp_path / "single")
    assert len(ref) == 6
    for engine in ("ddp", "fsdp"):
        run_dir = tmp_path / engine
        assert_ok(run_train(cfg, [f"run_dir={run_dir}", f"engine.kind={engine}"], nproc=2))
        got = losses(run_dir)
        assert got == pytest.approx(ref, rel=MULTI_RANK_RTOL), engine


def test_resume_continues_the_same_trajectory_bit_for_bit(tmp_path):
    """Stopped after step 3 and relaunched with the same command: steps 4..8 are identical.

    A dynamic student exercises the router RNG (Gumbel noise) and the FLOPs-target schedule."""
    cfg = write_config(
        tmp_path / "c.yaml", model="dylit-s/2", args={"mlp_groups": 4},
        train={"steps": 8}, checkpoint={"every": 3, "async_save": True},
        dynamic={"flops_target": 0.5, "warmup_steps": 4, "hold_steps": 0},
    )
    assert_ok(run_train(cfg, [f"run_dir={tmp_path / 'full'}"]))
    assert_ok(run_train(cfg, [f"run_dir={tmp_path / 'cut'}", "train.steps=3"]))
    assert_ok(run_train(cfg, [f"run_dir={tmp_path / 'cut'}"]))
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert [m["step"] for m in metrics(tmp_path / "cut")] == list(range(1, 9))  # each step logged once
    assert cut == full  # exact: RNG states, data position, optimizer and EMA all restored


def test_asking_for_a_missing_step_is_an_error_not_a_fresh_start(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", train={"steps": 2}, checkpoint={"every": 2})
    assert_ok(run_train(cfg, [f"run_dir={tmp_path / 'r'}"]))
    proc = run_train(cfg, [f"run_dir={tmp_path / 'r'}", "checkpoint.resume=7"])
    assert proc.returncode != 0
    assert "checkpoint.resume=7 cannot be used" in proc.stderr and "[2]" in proc.stderr


def test_activation_checkpointing_gives_identical_losses(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", model="dydit-s/2", args={"num_heads": 4, "mlp_groups": 4},
                       train={"steps": 3}, dynamic={"hold_steps": 0, "warmup_steps": 2})
    assert_ok(run_train(cfg, [f"run_dir={tmp_path / 'none'}"]))
    assert_ok(run_train(cfg, [f"run_dir={tmp_path / 'full'}", "engine.activation_checkpointing=full"]))
    assert_ok(run_train(cfg, [f"run_dir={tmp_path / 'k'}", "engine.activation_checkpointing=every-k", "engine.ac_every=2"]))
    assert losses(tmp_path / "full") == losses(tmp_path / "none") == losses(tmp_path / "k")


def test_run_directory_tensorboard_and_metrics(tmp_path):
    """TensorBoard holds the values, read back: every scalar equals metrics.jsonl's at its step, and the
    ones known in advance are those values (routers start all on, so the realised ratio is 1 and the
    FLOPs loss is 2·(1 − target)² on the annealed target; the LR follows its warm-up; loss is the sum of
    its terms; throughput is the global batch over the step time); the images are the sample grid
    written beside them and router maps with every unit on."""
    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from models.losses import flops_target
    from trainer.config import OptimConfig
    from trainer.optim import lr_factor

    cfg = write_config(tmp_path / "c.yaml", model="dydit-s/2", args={"num_heads": 4, "mlp_groups": 4},
                       train={"steps": 4, "log_every": 2}, sample={"every": 4, "num": 8, "steps": 4},
                       checkpoint={"every": 2}, optim={"lr": 1e-3, "warmup_steps": 4},
                       dynamic={"flops_target": 0.5, "hold_steps": 1, "warmup_steps": 4})
    run = tmp_path / "r"
    assert_ok(run_train(cfg, [f"run_dir={run}"]))
    assert (run / "config.yaml").exists() and (run / "checkpoints" / "latest").read_text() == "step_00000004"
    rec = {m["step"]: m for m in metrics(run)}
    assert sorted(rec) == [2, 4] and all(math.isfinite(m["loss"]) for m in rec.values())
    ea = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    tb = {tag: {e.step: e.value for e in ea.Scalars(tag)} for tag in ea.Tags()["scalars"]}
    for tag in ("loss", "loss/mse", "loss/vb", "loss/flops", "flops/ratio", "flops/target", "lr", "grad_norm",
                "throughput/samples_per_s", "time/data", "time/student", "time/optimizer", "memory/peak_gb"):
        assert tag in tb, tag
    for step, m in rec.items():  # every finite number of the record, at its step, as float32
        for key, value in m.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                assert tb[key][step] == pytest.approx(value, rel=1e-6, abs=1e-30), (key, step)
    optim = OptimConfig(lr=1e-3, warmup_steps=4)
    for step, window in ((2, (0, 1)), (4, (2, 3))):  # a logged value is the mean over its window of steps
        targets = [flops_target(s, 0.5, 4, 1, "continuous") for s in window]  # the config default
        assert tb["flops/target"][step] == pytest.approx(sum(targets) / 2, rel=1e-6)
        assert tb["flops/ratio"][step] == 1.0
        assert tb["loss/flops"][step] == pytest.approx(sum(2 * (1 - x) ** 2 for x in targets) / 2, rel=1e-6)
        assert tb["lr"][step] == pytest.approx(1e-3 * sum(lr_factor(s + 1, optim, 4) for s in window) / 2, rel=1e-6)
        assert tb["loss"][step] == pytest.approx(tb["loss/mse"][step] + tb["loss/vb"][step] + tb["loss/flops"][step], rel=1e-5)
        assert tb["throughput/samples_per_s"][step] * tb["time/step"][step] == pytest.approx(16, rel=1e-5)
    assert {"samples/ema", "routers/heads", "routers/channels"} <= set(ea.Tags()["images"])
    (grid,) = ea.Images("samples/ema")
    shown = np.asarray(Image.open(io.BytesIO(grid.encoded_image_string)).convert("RGB"), dtype=np.int16)
    saved = np.asarray(Image.open(run / "samples" / "samples_ema_00000004.png").convert("RGB"), dtype=np.int16)
    assert grid.step == 4 and shown.shape == saved.shape and np.abs(shown - saved).max() <= 1  # rounding only
    assert shown.std() > 0  # a picture, not a blank
    for tag in ("routers/heads", "routers/channels"):  # labelled figures; their values: tests/test_trainer_eval.py
        (img,) = ea.Images(tag)
        pixels = np.asarray(Image.open(io.BytesIO(img.encoded_image_string)).convert("L"))
        assert img.step == 4 and pixels.std() > 0, tag


def test_distillation_from_a_teacher_file_lowers_the_kd_loss(tmp_path):
    """A LiT student inherits all but attention from a (random, non-trivial) DiT teacher and learns
    to match it: the hybrid KD loss falls. The teacher is frozen: its file is unchanged."""
    from models.convert import save_safetensors
    from tests.helpers import randomize_
    from tests.trainer_utils import TINY_ARGS

    from models import build_model

    torch.manual_seed(0)
    teacher = randomize_(build_model("dit-s/2", **TINY_ARGS), seed=1, std=0.05)
    path = tmp_path / "teacher.safetensors"
    save_safetensors(teacher.state_dict(), teacher.config, path)
    before = path.read_bytes()
    cfg = write_config(
        tmp_path / "c.yaml", model="lit-s/2", student={"init": "inherit"},
        teacher={"path": str(path)}, train={"steps": 40, "log_every": 1},
        optim={"lr": 2e-3}, distill={"lambda_noise": 1.0, "lambda_var": 0.05, "diffusion_weight": 0.0},
        sample={"every": 40, "num": 4, "steps": 2},
    )
    assert_ok(run_train(cfg, [f"run_dir={tmp_path / 'r'}"]))
    grid = tmp_path / "r" / "samples" / "samples_ema_vs_teacher_00000040.png"
    from PIL import Image

    assert Image.open(grid).size[0] > Image.open(tmp_path / "r" / "samples" / "samples_ema_00000040.png").size[0]
    kd = [m["loss/kd"] for m in metrics(tmp_path / "r")]
    first, last = sum(kd[:5]) / 5, sum(kd[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert path.read_bytes() == before


def test_export_consolidates_student_and_ema(tmp_path):
    from models import load_pretrained
    from trainer.export import export_run

    cfg = write_config(tmp_path / "c.yaml", model="lit-s/2", train={"steps": 3}, checkpoint={"every": 3},
                       optim={"lr": 1e-2})
    assert_ok(run_train(cfg, [f"run_dir={tmp_path / 'r'}", "engine.kind=fsdp"], nproc=2))  # sharded on disk
    paths = export_run(tmp_path / "r", tmp_path / "out")
    student, ema = load_pretrained(paths["student"]), load_pretrained(paths["ema"])
    assert student.config.attention == "linear" and student.config.num_heads == 2
    s, e = student.state_dict(), ema.state_dict()
    moved = [k for k in s if not torch.equal(s[k], e[k])]
    assert moved  # the EMA lags the student
    torch.manual_seed(0)
    from models import build_model

    init = build_model(student.config).state_dict()
    assert not torch.equal(init["blocks.0.mlp.fc1.weight"], s["blocks.0.mlp.fc1.weight"])  # trained
