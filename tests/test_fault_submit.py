"""`launch.submit` without a cluster: the SLURM job it would queue (one task per GPU, the time-out
signal, requeue), time parsing, and a config error caught before anything is queued."""
import pytest

from launch import submit
from tests.trainer_utils import write_config


def test_dry_run_shows_one_task_per_gpu_the_signal_and_requeue(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", train={"steps": 10, "global_batch": 64})
    argv = [str(cfg), f"run_dir={tmp_path / 'run'}", "--nodes", "4", "--gpus-per-node", "8", "--cluster", "slurm",
            "--partition", "gpu", "--account", "proj", "--qos", "high", "--constraint", "a100", "--time", "2-00:00:00",
            "--dry-run"]
    assert submit.main(argv) == 0
    script = capsys.readouterr().out
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj", "#SBATCH --qos=high", "#SBATCH --constraint=a100", "#SBATCH --time=2880",
                 "#SBATCH --signal=USR2@180", "#SBATCH --requeue", "srun ", "world size 32"):
        assert line in script, line
    assert str(tmp_path / "run" / "launch" / "submitit") in script
    assert not (tmp_path / "run").exists()  # nothing queued, nothing written


def test_a_config_that_does_not_fit_the_world_size_fails_before_submission(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", train={"steps": 10, "global_batch": 16})
    assert submit.main([str(cfg), "--nodes", "1", "--gpus-per-node", "3", "--cluster", "local", "--dry-run"]) == 2
    assert "train.global_batch=16" in capsys.readouterr().err


@pytest.mark.parametrize("text,minutes", [("90s", 1.5), ("45m", 45), ("2h", 120), ("01:30:00", 90), ("2-00:00:00", 2880),
                                          ("10", 10), ("1-12:00", 2160), ("30:00", 30), ("2-12", 3600)])
def test_time_formats(text, minutes):
    assert submit.parse_minutes(text) == pytest.approx(minutes)


def test_requeues_stop_at_max_requeues(tmp_path):
    """Each preemption records a requeue before submitit asks for the resubmission: the Kth is
    resubmitted, the (K+1)th is refused and recorded, so a crash-looping job cannot requeue forever."""
    import submitit

    job = submit.TrainJob("c.yaml", [], str(tmp_path), "cmd", max_requeues=2, signals=["SIGTERM"])
    for n in (1, 2):
        submit.record(str(tmp_path), "requeue", job_id=str(n), step=n)
        again = job.checkpoint()
        assert isinstance(again, submitit.helpers.DelayedSubmission) and again.function is job
    submit.record(str(tmp_path), "requeue", job_id="3", step=3)
    assert job.checkpoint() is None
    assert submit.read_jobs(str(tmp_path))[-1]["event"] == "requeue-refused"
