"""Teacher-relative fidelity: how far a student's samples are from the teacher's on the same prompts
(or labels) and seeds. Sample i of both sets came from the same noise, so they are compared pair by
pair. The mean-squared error needs no network and is always available:
- images: pixels scaled to [0, 1], mean over every pixel and channel, with its PSNR;
- latents: as stored (both sets must hold latents, e.g. `latents` in the `.npz` or shard `latent`).
FID of student vs teacher images is `evaluator`'s (the teacher set is one more Inception pass).
"""
from __future__ import annotations

import math
from itertools import zip_longest
from typing import Iterator, Optional

import numpy as np

from trainer.metrics.images import ImageSet


def paired_mse(a: Iterator[np.ndarray], b: Iterator[np.ndarray], scale: float = 1.0, what: str = "images") -> tuple[float, int]:
    """(mean of (a − b)²·scale², count): chunks of both walked in lockstep, in float64."""
    total, elements, rows = 0.0, 0, 0
    for ca, cb in zip_longest(a, b):
        if ca is None or cb is None or len(ca) != len(cb):
            raise ValueError(f"the student and teacher sets hold different numbers of {what} (a shard sample skipped?); "
                             "they must pair one to one")
        if ca.shape != cb.shape:
            raise ValueError(f"student and teacher {what} differ in shape: {ca.shape[1:]} vs {cb.shape[1:]}")
        d = (ca.astype(np.float64) - cb.astype(np.float64)) * scale
        total += float(np.square(d).sum())
        elements += d.size
        rows += len(d)
    return total / max(elements, 1), rows


def teacher_mse(student: ImageSet, teacher: ImageSet, batch: int) -> dict[str, Optional[float]]:
    """{"teacher_mse_images", "teacher_psnr_images", "teacher_mse_latents" (None without latents)}."""
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student samples vs {len(teacher)} teacher samples: teacher-relative metrics "
                         "pair sample i with sample i (same prompt and seed), so the sets must be the same size")
    mse, _ = paired_mse(student.chunks(batch), teacher.chunks(batch), 1 / 255)
    out: dict[str, Optional[float]] = {"teacher_mse_images": mse,
                                       "teacher_psnr_images": math.inf if mse == 0 else 10 * math.log10(1 / mse),
                                       "teacher_mse_latents": None}
    la, lb = student.latent_chunks(batch), teacher.latent_chunks(batch)
    if la is not None and lb is not None:
        out["teacher_mse_latents"], _ = paired_mse(la, lb, what="latents")
    return out
