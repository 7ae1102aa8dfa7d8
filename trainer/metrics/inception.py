"""The standard FID Inception, read from a local weights file: pool_3, logits and sFID's spatial tap.

The network is torch-fidelity's port of TensorFlow's 2015-12-05 Inception graph (the one ADM's
evaluator and every published FID use): TF1's bilinear resize to 299², `(x − 128) / 128`, the
graph's patched pooling. We add what it lacks: sFID's `mixed_6/conv` features. In the TF graph
`mixed_6` is the seventh mixed block, `Mixed_6d` here, and `mixed_6/conv` its 1×1 branch after
batch-norm and ReLU (`Mixed_6d.branch1x1`, 192 × 17 × 17); ADM keeps its first 7 channels and
flattens them in TF's NHWC order, so `mu_s`/`sigma_s` of the ADM reference batches are comparable
only in that order.

Nothing is downloaded: the weights are pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (or
torch-fidelity's copy of the same conversion), found at an explicit path, `$DITILL_INCEPTION_WEIGHTS`
or torch hub's checkpoint folder.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from trainer.metrics.frechet import GaussianStats, RunningMoments

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FIDELITY_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's name for the same conversion
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE
STANDARD_DIGEST = "6726825d"  # torch hub names files by their sha256 prefix
ENV = "DITILL_INCEPTION_WEIGHTS"
SPATIAL_CHANNELS = 7
POOL_DIM, LOGITS_DIM, SPATIAL_DIM = 2048, 1008, 17 * 17 * SPATIAL_CHANNELS


class InceptionWeightsError(FileNotFoundError):
    """The Inception weights file is missing or is not the FID Inception."""


def candidate_paths() -> list[Path]:
    """Where the weights are looked for when no path is given, in order."""
    out = [Path(os.environ[ENV]).expanduser()] if os.environ.get(ENV) else []
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return out + [hub / WEIGHTS_FILE, hub / FIDELITY_WEIGHTS_FILE]


def find_weights(path: Optional[str | os.PathLike] = None) -> Path:
    """The weights file to use; a clear error naming where to put it when there is none."""
    fetch = (f"Nothing is downloaded: on a machine with network, fetch {WEIGHTS_URL} and copy it to {{where}} "
             f"(or pass --inception PATH, or set ${ENV}).")
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InceptionWeightsError(f"Inception weights {str(p)!r} do not exist. " + fetch.format(where=p))
        return p
    tried = candidate_paths()
    for p in tried:
        if p.is_file():
            return p
    raise InceptionWeightsError("no FID Inception weights found; looked at " + ", ".join(map(str, tried)) + ". "
                                + fetch.format(where=tried[-2] if len(tried) > 1 else tried[0]))


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _check_state(path: Path) -> None:
    """Refuse anything but a plain tensor state dict of the FID Inception before torch-fidelity unpickles it."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise InceptionWeightsError(f"{path} is not a readable PyTorch state dict ({type(e).__name__}: {e}); "
                                    f"it should be {WEIGHTS_FILE} from {WEIGHTS_URL}") from e
    want = {"fc.weight": (LOGITS_DIM, POOL_DIM), "Mixed_6d.branch1x1.conv.weight": (192, 768, 1, 1)}
    for key, shape in want.items():
        got = tuple(sd[key].shape) if isinstance(sd, dict) and key in sd else None
        if got != shape:
            raise InceptionWeightsError(f"{path} is not the FID Inception: {key} is {got}, expected {shape} "
                                        f"(torchvision's ImageNet Inception has 1000 classes; use {WEIGHTS_FILE})")


class InceptionFeatures:
    """uint8 images (N, H, W, 3) → {"pool": (N, 2048), "logits": (N, 1008), "spatial": (N, 2023)}.

    `logits` are torch-fidelity's `logits_unbiased` (pool_3 · W without the bias), which is what
    ADM's evaluator takes the softmax of for the Inception Score.
    """

    def __init__(self, weights: Optional[str | os.PathLike] = None, device: str | torch.device = "cpu") -> None:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.path = find_weights(weights)
        _check_state(self.path)
        self.digest = file_digest(self.path)
        self.standard = self.digest.startswith(STANDARD_DIGEST)
        self.device = torch.device(device)
        try:
            net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                              feature_extractor_weights_path=str(self.path))
        except RuntimeError as e:  # strict load_state_dict: missing or unexpected keys
            raise InceptionWeightsError(f"{self.path} does not fit the FID Inception: {e}") from e
        self.net = net.to(self.device)
        self._spatial: Optional[torch.Tensor] = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output: torch.Tensor) -> None:
        self._spatial = output

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.tensor(np.asarray(images, dtype=np.uint8)).permute(0, 3, 1, 2).contiguous().to(self.device)
        pool, logits = self.net(x)
        spatial = spatial_features(self._spatial)
        self._spatial = None
        return {"pool": pool.cpu().numpy(), "logits": logits.cpu().numpy(), "spatial": spatial.float().cpu().numpy()}

    def describe(self) -> dict[str, object]:
        return {"weights": str(self.path), "sha256": self.digest, "standard_weights": self.standard,
                "port": "torch-fidelity FeatureExtractorInceptionV3 (TF1 bilinear resize to 299)",
                "spatial_layer": f"Mixed_6d.branch1x1 (TF mixed_6/conv), first {SPATIAL_CHANNELS} channels, NHWC order"}


def spatial_features(mixed_6_conv: torch.Tensor) -> torch.Tensor:
    """(N, 192, 17, 17) → (N, 17·17·7): ADM's `spatial[..., :7]` of the NHWC tensor, flattened."""
    n = len(mixed_6_conv)
    return mixed_6_conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(n, -1)


class FeatureSummary:
    """What one pass over an image set leaves: pool_3 and spatial statistics, and (when asked)
    the pool_3 features for precision/recall and the logits for the Inception Score."""

    def __init__(self, keep_pool: bool, keep_logits: bool) -> None:
        self._pool, self._spatial = RunningMoments(), RunningMoments()
        self._keep_pool, self._keep_logits = keep_pool, keep_logits
        self._pool_rows: list[np.ndarray] = []
        self._logit_rows: list[np.ndarray] = []

    def add(self, feats: dict[str, np.ndarray]) -> None:
        self._pool.update(feats["pool"])
        self._spatial.update(feats["spatial"])
        if self._keep_pool:
            self._pool_rows.append(feats["pool"])
        if self._keep_logits:
            self._logit_rows.append(feats["logits"])

    @property
    def n(self) -> int:
        return self._pool.n

    @property
    def pool(self) -> GaussianStats:
        return self._pool.stats()

    @property
    def spatial(self) -> GaussianStats:
        return self._spatial.stats()

    @property
    def pool_features(self) -> Optional[np.ndarray]:
        return np.concatenate(self._pool_rows) if self._pool_rows else None

    @property
    def logits(self) -> Optional[np.ndarray]:
        return np.concatenate(self._logit_rows) if self._logit_rows else None


def extract(chunks: Iterable[np.ndarray], net: InceptionFeatures, keep_pool: bool = False, keep_logits: bool = False,
            total: Optional[int] = None, desc: str = "inception") -> FeatureSummary:
    """Run every chunk through the network once; only statistics (and what is asked for) are kept."""
    from tqdm.auto import tqdm

    summary = FeatureSummary(keep_pool, keep_logits)
    with tqdm(total=total, desc=desc, unit="img", disable=None) as bar:
        for chunk in chunks:
            summary.add(net(chunk))
            bar.update(len(chunk))
    return summary
