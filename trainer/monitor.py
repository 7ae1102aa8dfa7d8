"""What a run reports: TensorBoard under `<run>/tb/`, `<run>/metrics.jsonl`, a tqdm bar on rank 0.

Only rank 0 writes; every rank calls the same methods, so the loop has no `if rank == 0` branches.
"""
from __future__ import annotations

import json
import math
import resource
from pathlib import Path
from typing import Any

import torch

from trainer.distributed import DistEnv

EVAL_JSONL = "eval.jsonl"  # quality vs step (sample.eval_every), kept apart from the per-step losses


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop records logged after `max_step` (by a run that died before its next checkpoint), so a
    resumed run's metrics.jsonl holds each step once."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line torn by a kill mid-write
        if record.get("step", 0) <= max_step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


class Monitor:
    def __init__(self, run_dir: Path, env: DistEnv, total_steps: int, start_step: int, progress: bool = True) -> None:
        self.env = env
        self.run_dir = Path(run_dir)
        self.writer = None
        self.bar = None
        self.jsonl = None
        if env.is_main:
            from torch.utils.tensorboard import SummaryWriter

            (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
            truncate_jsonl(self.run_dir / "metrics.jsonl", start_step)
            truncate_jsonl(self.run_dir / EVAL_JSONL, start_step)
            self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
            self.jsonl = open(self.run_dir / "metrics.jsonl", "a")
            if progress:
                from tqdm import tqdm

                self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="train")

    def _add_scalars(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(k, v, step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        self._add_scalars(step, values)
        record: dict[str, Any] = {"step": step, **{k: v for k, v in values.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()

    def progress(self, step: int, loss: float | None = None) -> None:
        if self.bar is not None:
            self.bar.n = step
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.bar.refresh()

    def images(self, step: int, tag: str, images: torch.Tensor, nrow: int = 8) -> None:
        """images (B, C, H, W) in [-1, 1] → one grid in TensorBoard and `samples/<tag>_<step>.png`."""
        if self.writer is None:
            return
        from torchvision.utils import make_grid, save_image  # imported here: 1.4 s off every process start

        grid = make_grid(images.float().clamp(-1, 1) * 0.5 + 0.5, nrow=nrow, padding=1)
        self.writer.add_image(tag, grid, step)
        save_image(grid, self.run_dir / "samples" / f"{tag.replace('/', '_')}_{step:08d}.png")

    def evaluation(self, step: int, values: dict[str, float]) -> None:
        """Quality metrics of one evaluation: TensorBoard scalars and a line of `<run>/eval.jsonl`."""
        if self.writer is None:
            return
        self._add_scalars(step, values)
        with open(self.run_dir / EVAL_JSONL, "a") as f:
            f.write(json.dumps({"step": step, **{k: v if math.isfinite(v) else str(v) for k, v in values.items()}}) + "\n")
        self.writer.flush()

    def figure(self, step: int, tag: str, fig) -> None:
        """A matplotlib figure as a TensorBoard image and `samples/<tag>_<step>.png` (closed afterwards)."""
        import matplotlib.pyplot as plt

        if self.writer is not None:
            fig.savefig(self.run_dir / "samples" / f"{tag.replace('/', '_')}_{step:08d}.png")
            self.writer.add_figure(tag, fig, step, close=False)
        plt.close(fig)

    def router_plots(self, step: int, rmap) -> None:
        """A dynamic student's router maps and per-layer FLOPs curves (see `trainer.router_plots`)."""
        if self.writer is None:
            return
        from trainer.router_plots import router_figures

        for tag, fig in router_figures(rmap).items():
            self.figure(step, tag, fig)

    def text(self, message: str) -> None:
        if self.env.is_main:
            if self.bar is not None:
                self.bar.write(message)
            else:
                print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
