"""What `launch.sample` samples: the model (a run's EMA or student, or a weights file), its objective,
and the condition of every sample (a class label, or a prompt's text embedding).

Prompts are embedded once, by the encoder that made the training data (the run's shard manifest
names it) or another local one, in fixed blocks of prompts counted from the first (the blocks
`launch.precompute` encodes evaluation prompts in), and rounded to bf16 as the shards store them:
a prompt then gets the same embedding whichever rank asks for it, and the same as the precomputed
`prompts.safetensors` of the same encoder.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from models import family_of

STORE_DTYPE = torch.bfloat16  # what precompute stores text embeddings in
CACHED_BLOCKS = 4


def is_run_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.yaml"))


def source_identity(path: str, step: Optional[int], weights: str) -> dict[str, Any]:
    """What identifies the weights a sampling job used (cheap: no tensor is read). A run directory: its
    checkpoint and the manifest's file sums; a file: path, size and modification time."""
    import hashlib

    p = Path(path).resolve()
    if is_run_dir(path):
        from trainer.export import checkpoint_dir

        ckpt = checkpoint_dir(p, step)
        manifest = (ckpt / "manifest.json").read_bytes() if (ckpt / "manifest.json").exists() else b""
        return {"run_dir": str(p), "checkpoint": ckpt.name, "weights": weights,
                "manifest_sha256": hashlib.sha256(manifest).hexdigest()}
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return {"path": str(p), "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def source_config(path: str, step: Optional[int]) -> tuple[Any, Optional[Any]]:
    """(model config, run config or None) without reading tensors where the format allows."""
    if is_run_dir(path):
        from trainer.build import student_config
        from trainer.export import checkpoint_dir, read_run_config

        run_cfg = read_run_config(Path(path), checkpoint_dir(Path(path), step))
        return student_config(run_cfg), run_cfg
    from models.convert import read_config

    return read_config(path), None


def load_model(path: str, step: Optional[int], weights: str) -> nn.Module:
    """The model in eval mode: a run's EMA (or student) weights, consolidated from its checkpoint with
    `trainer.export`'s machinery, or any weights file `models.load_pretrained` reads."""
    if is_run_dir(path):
        from models import build_model
        from trainer.export import run_weights

        tensors, mcfg, _ = run_weights(path, step)
        model = build_model(mcfg)
        model.load_state_dict(tensors[weights], strict=True)
        return model.eval()
    from models import load_pretrained

    return load_pretrained(path)


def text_batch(emb: torch.Tensor, mask: torch.Tensor, pooled: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {"text_emb": emb, "text_mask": mask.bool()}
    if pooled is not None:
        out["text_pooled"] = pooled
    return out


@dataclass
class PromptSet:
    """Prompts and their embeddings, `k` samples per prompt (sample i shows prompt i // k).

    Embeddings come from `prompts.safetensors` beside precomputed shards (`tensors`) or from a live
    encoder (`encoder`, blocks of `block` prompts encoded on first use, the latest few kept)."""

    prompts: list[str]
    k: int
    tensors: Optional[dict[str, torch.Tensor]] = None
    encoder: Any = None  # data.text_encoders.TextEncoders
    block: int = 16
    null: Optional[dict[str, torch.Tensor]] = None  # (L, D) null caption: T5(""), + CLIP's pooled
    manifest_text: dict[str, Any] = field(default_factory=dict)  # the shards' `text` entry
    masked: bool = True  # the encoder ran with its mask: shards store only the real tokens
    _cache: "OrderedDict[int, dict[str, torch.Tensor]]" = field(default_factory=OrderedDict)

    @property
    def samples(self) -> int:
        return len(self.prompts) * self.k

    def caption(self, i: int) -> str:
        return self.prompts[i // self.k]

    def rows(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Batch fields (`text_emb` (B, L, D) float32, `text_mask` (B, L) bool, `text_pooled`) of samples."""
        ids = (indices.to(torch.int64) // self.k).tolist()
        if self.tensors is not None:
            t = self.tensors
            return text_batch(t["text_emb"][ids].float(), t["text_mask"][ids], t["text_pooled"][ids].float()
                              if "text_pooled" in t else None)
        parts = [self._encoded(p // self.block) for p in ids]
        rows = [p % self.block for p in ids]
        return {key: torch.stack([part[key][r] for part, r in zip(parts, rows)]) for key in parts[0]}

    def _encoded(self, block: int) -> dict[str, torch.Tensor]:
        if block not in self._cache:
            texts = self.prompts[block * self.block:(block + 1) * self.block]
            out = self.encoder.encode(texts)
            self._cache[block] = text_batch(stored(out.emb), out.mask, stored(out.pooled) if out.pooled is not None else None)
            while len(self._cache) > CACHED_BLOCKS:
                self._cache.popitem(last=False)
        self._cache.move_to_end(block)
        return self._cache[block]


def stored(t: torch.Tensor) -> torch.Tensor:
    """Rounded to the shards' text dtype and back: the values a model trained on precomputed shards saw."""
    return t.to(STORE_DTYPE).float()


def read_prompt_file(path: str) -> list[str]:
    from trainer.metrics.clip import read_prompts

    return read_prompts(path, 1)


def precomputed_prompts(directory: str, prompts_file: Optional[str], k: int) -> PromptSet:
    """Prompts and embeddings from a precompute output directory (`prompts.jsonl` + `prompts.safetensors`,
    `null_text.safetensors`, the manifest's text entry)."""
    from data import load_null_text, load_prompt_embeddings
    from data.manifest import MANIFEST, read_manifest

    found = load_prompt_embeddings(directory)
    if found is None:
        raise FileNotFoundError(f"--prompt-embeddings {directory!r} holds no prompts.jsonl + prompts.safetensors; "
                                "make them with launch.precompute (input shards with a prompts.jsonl), or give "
                                "--prompts FILE with --text-encoder DIR")
    rows, tensors = found
    prompts = [r["prompt"] for r in rows]
    if prompts_file is not None and read_prompt_file(prompts_file) != prompts:
        raise ValueError(f"--prompts {prompts_file!r} lists other prompts than {directory}/prompts.jsonl; give one of them")
    text = read_manifest(directory).text or {} if os.path.isfile(os.path.join(directory, MANIFEST)) else {}
    return PromptSet(prompts, k, tensors=tensors, null=load_null_text(directory), manifest_text=dict(text),
                     masked=text.get("storage", "unpadded") == "unpadded")


def encoded_prompts(prompts_file: str, k: int, encoder: dict[str, Any], device: torch.device, block: int) -> PromptSet:
    """Prompts of a file, embedded by a local T5 (+ CLIP) as `launch.precompute` would."""
    from data.text_encoders import TextEncoders

    enc = TextEncoders(encoder["encoder"], max_length=encoder["max_length"], attention_mask=encoder["attention_mask"],
                       clip_dir=encoder.get("pooled_encoder"), device=device)
    null = enc.encode([""])
    text = {"max_length": encoder["max_length"], "dim": enc.dim, "encoder": os.path.abspath(encoder["encoder"]),
            "dtype": "bf16", "attention_mask": encoder["attention_mask"],
            "storage": "unpadded" if encoder["attention_mask"] else "padded", "null": "null_text.safetensors"}
    if enc.clip is not None:
        text.update(pooled_dim=enc.pooled_dim, pooled_encoder=os.path.abspath(encoder["pooled_encoder"]))
    null_rows = text_batch(stored(null.emb[0]), null.mask[0], stored(null.pooled[0]) if null.pooled is not None else None)
    return PromptSet(read_prompt_file(prompts_file), k, encoder=enc, block=block, null=null_rows, manifest_text=text,
                     masked=encoder["attention_mask"])


def condition_of(model: nn.Module, indices: torch.Tensor, labels: Optional[torch.Tensor],
                 prompts: Optional[PromptSet]) -> dict[str, torch.Tensor]:
    """`model.condition` of the samples' batch fields: labels `y`, or their prompts' text fields."""
    keys = family_of(model).conditioning(model.config).batch_keys
    batch = {"y": labels} if prompts is None else prompts.rows(indices)
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"the model reads {list(keys)} but the sampling job provides {sorted(batch)}: "
                         + ("a pooled text vector needs a CLIP encoder (--clip-encoder)" if "text_pooled" in missing else
                            "class-conditional models take --num-samples, text-to-image models --prompts"))
    return model.condition({k: batch[k] for k in keys})
