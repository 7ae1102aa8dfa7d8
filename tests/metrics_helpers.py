"""Stand-ins for the weights the metrics tests cannot have: a random-weight FID Inception and a tiny
random open_clip model, saved to local files in the layouts the real ones come in."""
from __future__ import annotations

import json
import os

import torch

TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The FID Inception's state dict layout (torchvision Inception3, 1008 classes, no aux head; the
    keys and shapes of pt_inception-2015-12-05) with random weights. Batch-norm statistics are set
    from one forward of random images so activations stay O(1) through 90 layers (default init with
    unit running variance grows them to ~1e10), and the classifier is scaled so the logits are O(1)."""
    from torchvision.models import inception_v3

    torch.manual_seed(seed)
    net = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=True)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: the running stats become this batch's
            m.reset_running_stats()
    net.train()
    with torch.no_grad():
        net(torch.rand(4, 3, 299, 299, generator=torch.Generator().manual_seed(seed)) * 2 - 1)
        net.fc.weight.mul_(0.01)
    return {k: v.clone() for k, v in net.eval().state_dict().items()}


def save_random_inception(path: str, seed: int = 0) -> str:
    torch.save(random_inception_state(seed), path)
    return path


def save_tiny_clip(directory: str, seed: int = 0) -> str:
    """An open_clip hub-layout directory: open_clip_config.json + open_clip_pytorch_model.bin."""
    from open_clip.model import CLIP

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}, f)
    torch.manual_seed(seed)
    torch.save(CLIP(**TINY_CLIP).state_dict(), os.path.join(directory, "open_clip_pytorch_model.bin"))
    return directory
