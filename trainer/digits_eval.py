"""Scoring generated digits: a small classifier trained on the real digits, and a Fréchet distance.

- `train_classifier` fits a two-conv CNN on a fixed split of scikit-learn's 1,797 digits and reports
  its accuracy on the held-out part.
- `score` runs generated images through it: the accuracy of the samples against the classes they were
  asked for, and the Fréchet distance between their penultimate-layer features and the real digits'
  (FID's formula, in this classifier's 128-d feature space instead of Inception's).

Inputs are (N, 1, 8, 8) tensors in [-1, 1], the layout of `data.digits_arrays()` and of the samplers.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data import digits_arrays
from trainer.metrics.frechet import GaussianStats, frechet_distance, stats_of

FEATURES = 128


class DigitClassifier(nn.Module):
    """conv 32 → conv 64 → pool → 128-d features → 10 logits."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, FEATURES)
        self.head = nn.Linear(FEATURES, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def split_digits(held_out: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): a fixed, seeded split of the real digits."""
    x, y = digits_arrays()
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(held_out * len(y)))
    test, train = order[:n_test], order[n_test:]
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    return x_t[train], y_t[train], x_t[test], y_t[test]


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to one pixel (edges filled with the background, -1)."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,), generator=g).tolist()
    return padded[:, :, dy : dy + 8, dx : dx + 8]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


@contextmanager
def _one_thread():
    """Batches of 64 8x8 images are too small to split across threads: on a busy 2-core machine two
    OpenMP threads wait on each other's barriers and training takes minutes instead of seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_classifier(epochs: int = 30, seed: int = 0, batch: int = 64, lr: float = 3e-3) -> tuple[DigitClassifier, dict]:
    """The classifier and {"held_out_accuracy", "train_size", "test_size"}; ~10 s on one CPU core."""
    with _one_thread():
        return _train_classifier(epochs, seed, batch, lr)


def _train_classifier(epochs: int, seed: int, batch: int, lr: float) -> tuple[DigitClassifier, dict]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_tr, y_tr, x_te, y_te = split_digits(seed=seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * ((len(y_tr) + batch - 1) // batch))
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y_tr), generator=g)
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            loss = F.cross_entropy(model(_shift(x_tr[idx], g)), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    info = {"held_out_accuracy": accuracy(model, x_te, y_te), "train_size": len(y_tr), "test_size": len(y_te)}
    return model, info


def save_classifier(model: DigitClassifier, info: dict, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": model.state_dict(), "info": info}, tmp)
    tmp.replace(path)


def load_classifier(path: str | Path) -> tuple[DigitClassifier, dict]:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = DigitClassifier()
    model.load_state_dict(blob["state_dict"])
    return model.eval(), blob["info"]


# --- Fréchet distance -------------------------------------------------------------------------------

@torch.no_grad()
def feature_stats(model: DigitClassifier, x: torch.Tensor, batch: int = 1024) -> GaussianStats:
    model.eval()
    feats = torch.cat([model.features(x[i : i + batch].float().clamp(-1, 1)) for i in range(0, len(x), batch)])
    return stats_of(feats.double().numpy())


def real_stats(model: DigitClassifier) -> GaussianStats:
    """Features of all 1,797 real digits: the reference every sample set is compared with."""
    x, _ = digits_arrays()
    return feature_stats(model, torch.from_numpy(x))


def real_floor(model: DigitClassifier, n: int, reference: GaussianStats | None = None, seed: int = 0) -> float:
    """FD of `n` real digits drawn with replacement against all real digits (`reference`, from
    `real_stats`): what a perfect sampler of the same sample count would score (FD is biased upward
    at small n)."""
    x, _ = digits_arrays()
    idx = np.random.default_rng(seed).integers(0, len(x), n)
    return frechet_distance(feature_stats(model, torch.from_numpy(x[idx])), reference or real_stats(model))


@torch.no_grad()
def score(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor, reference: GaussianStats) -> dict:
    """{"accuracy", "fd", "n"}: samples (N, 1, 8, 8) asked to be `labels` (N,)."""
    x = images.float().clamp(-1, 1)
    acc = accuracy(model, x, labels)
    return {"accuracy": acc, "fd": frechet_distance(feature_stats(model, x), reference), "n": len(labels)}
