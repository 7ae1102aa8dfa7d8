"""Text conditions written beside the shards by precompute: the null caption and the evaluation prompts.

`null_text.safetensors` is T5("") of the encoder that made the shards, at full length: PixArt-Σ's
`y_embedding` buffer holds exactly this (the official loader overwrites it with T5("") padded to
max_length, pad positions included, `../shared/T2I.md` §1.7, trap 3), and classifier-free guidance
and caption dropout swap it in. Model code copies it into the teacher's and the student's buffers,
so both see the same null condition as the captions they were trained on (same encoder, same
rounding). Tensors: `text_emb` (L, D), `text_mask` (L,), and `text_pooled` (Dp,) when CLIP was used.

`prompts.safetensors` holds the same three fields, one row per line of `prompts.jsonl` (the
evaluation prompts of a test bed such as `data.captions`), so an evaluation scores prompts encoded
exactly as the training captions were, without loading a 4.7 B-parameter encoder itself.
Embeddings are stored in the shards' text dtype (bf16 for new shards); masks are returned as bool.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch

from data.captions import read_prompts
from data.text_encoders import TextBatch

NULL_TEXT = "null_text.safetensors"
PROMPT_EMBEDDINGS = "prompts.safetensors"
STORE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def write_text_file(path: str, batch: TextBatch, dtype: str, rows: Optional[int] = None) -> None:
    """The batch's full-length tensors (row 0 alone when `rows` is None), written atomically.

    No safetensors metadata: its key order varies between processes, and the same input must give
    the same bytes (the manifest's `text` entry describes the encoder instead)."""
    from safetensors.torch import save_file

    pick = (lambda t: t[0]) if rows is None else (lambda t: t)
    tensors = {"text_emb": pick(batch.emb).to(STORE_DTYPES[dtype]).contiguous(), "text_mask": pick(batch.mask).contiguous()}
    if batch.pooled is not None:
        tensors["text_pooled"] = pick(batch.pooled).to(STORE_DTYPES[dtype]).contiguous()
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, tmp)
    os.replace(tmp, path)


def _read(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = load_file(path)
    out["text_mask"] = out["text_mask"] != 0
    return out


def load_null_text(shard_dir: str) -> Optional[dict[str, torch.Tensor]]:
    """The null condition of a precomputed shard directory, or None when it has none.

    `text_emb` (L, D) and `text_mask` (L,) bool, plus `text_pooled` (Dp,) for shards with CLIP.
    """
    path = os.path.join(shard_dir, NULL_TEXT)
    return _read(path) if os.path.isfile(path) else None


def load_prompt_embeddings(shard_dir: str) -> Optional[tuple[list[dict[str, Any]], dict[str, torch.Tensor]]]:
    """(rows of prompts.jsonl, their `text_emb` (P, L, D), `text_mask` (P, L), `text_pooled`), or None."""
    path = os.path.join(shard_dir, PROMPT_EMBEDDINGS)
    rows = read_prompts(shard_dir)
    if rows is None or not os.path.isfile(path):
        return None
    tensors = _read(path)
    if len(tensors["text_emb"]) != len(rows):
        raise ValueError(f"{path} holds {len(tensors['text_emb'])} prompts but prompts.jsonl has {len(rows)} lines; "
                         "rerun launch.precompute into a new directory")
    return rows, tensors
