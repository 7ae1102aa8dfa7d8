"""CLIP score of text-to-image samples, with local open_clip weights (nothing is downloaded).

CLIP score = 100 · max(cos(image embedding, text embedding), 0), averaged over samples (the
convention of torchmetrics' CLIPScore and of the text-to-image papers that report "CLIP score";
Hessel et al.'s CLIPScore is the same cosine with weight 2.5). The mean raw cosine is reported too.

The model is an open_clip architecture name (`ViT-L-14`, …) with `--clip-weights FILE`, or a local
directory in open_clip's hub layout (`open_clip_config.json` plus the weights file), which is what an
open_clip checkpoint downloaded elsewhere looks like. Images go through the model's own eval
preprocessing (resize, centre crop, normalise) from 8-bit pixels.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


class ClipWeightsError(FileNotFoundError):
    """The CLIP model or its weights are not on local disk."""


def _open_clip():
    try:
        import open_clip
    except ImportError as e:
        raise ImportError("the CLIP score needs open_clip_torch: pip install -c constraints.txt -e '.[eval]'") from e
    return open_clip


def resolve_clip(model: str, weights: Optional[str]) -> tuple[str, Optional[str]]:
    """open_clip's (model_name, pretrained) for a local directory or a name plus a weights file."""
    open_clip = _open_clip()

    if os.path.isdir(model):
        d = Path(model)
        if not (d / "open_clip_config.json").is_file():
            raise ClipWeightsError(f"{model} has no open_clip_config.json; a CLIP directory needs it beside the weights "
                                   "(open_clip's hub layout), or pass an architecture name with --clip-weights FILE")
        if not any(p.suffix in WEIGHT_SUFFIXES for p in d.iterdir()):
            raise ClipWeightsError(f"{model} has open_clip_config.json but no weights file ({', '.join(WEIGHT_SUFFIXES)}); "
                                   "copy the checkpoint (e.g. open_clip_pytorch_model.bin) into it")
        return f"local-dir:{d}", None
    if model not in open_clip.list_models():
        raise ClipWeightsError(f"--clip-model {model!r} is neither a local directory nor an open_clip architecture "
                               "(see open_clip.list_models(), e.g. ViT-L-14)")
    if not weights or not os.path.isfile(weights):
        where = f"{weights!r} does not exist" if weights else "no --clip-weights given"
        raise ClipWeightsError(f"CLIP weights for {model}: {where}. Nothing is downloaded: copy the open_clip "
                               f"checkpoint of {model} to a local file and pass it as --clip-weights FILE")
    return model, weights


class ClipScorer:
    """Cosine similarity of each image with its caption in the CLIP embedding space."""

    def __init__(self, model: str, weights: Optional[str] = None, device: str | torch.device = "cpu") -> None:
        open_clip = _open_clip()
        name, pretrained = resolve_clip(model, weights)
        self.model_name, self.weights = name, pretrained
        self.device = torch.device(device)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=self.device, require_pretrained=True)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)

    @torch.no_grad()
    def cosine(self, images: np.ndarray, texts: list[str]) -> np.ndarray:
        x = torch.stack([self.preprocess(Image.fromarray(im)) for im in images]).to(self.device)
        tokens = self.tokenizer(texts).to(self.device)
        fi = F.normalize(self.model.encode_image(x).float(), dim=-1)
        ft = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return (fi * ft).sum(-1).cpu().numpy()

    def describe(self) -> dict[str, object]:
        return {"model": self.model_name, "weights": self.weights}


def clip_score(chunks: Iterator[np.ndarray], captions: list[str], scorer: ClipScorer) -> dict[str, float]:
    """{"clip_score", "clip_cosine"} over images in caption order."""
    cos, start = [], 0
    for chunk in chunks:
        cos.append(scorer.cosine(chunk, captions[start:start + len(chunk)]))
        start += len(chunk)
    if start != len(captions):
        raise ValueError(f"{len(captions)} captions for {start} images; they must pair one to one")
    c = np.concatenate(cos).astype(np.float64)
    return {"clip_score": float(100 * np.clip(c, 0, None).mean()), "clip_cosine": float(c.mean())}


def read_prompts(path: str, images_per_prompt: int = 1) -> list[str]:
    """Captions in sample order from a prompt file: `.txt` one prompt a line, or `.jsonl` rows with
    "prompt" (or "caption"); sample i is prompt i // images_per_prompt (k images per prompt, in order)."""
    if images_per_prompt < 1:
        raise ValueError(f"--images-per-prompt must be ≥ 1, got {images_per_prompt}")
    import json

    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                row = json.loads(line)
                text = row.get("prompt", row.get("caption"))
                if not isinstance(text, str):
                    raise ValueError(f"{path} line {n + 1}: no 'prompt' (or 'caption') string")
                prompts.append(text)
            else:
                prompts.append(line.rstrip("\n"))
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return [p for p in prompts for _ in range(images_per_prompt)]
