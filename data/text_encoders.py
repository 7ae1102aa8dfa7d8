"""The frozen text encoders of precompute: T5 (optionally sharded with FSDP2) and CLIP's pooled vector.

Both load from local directories only. T5 is loaded in its dtype rather than cast afterwards,
so transformers keeps the modules T5 needs in fp32 in fp32 (`_keep_in_fp32_modules`: a manual
`.half()` of T5-XXL overflows). The attention-mask convention is explicit, because the two
families differ (`../shared/T2I.md` §2.2, trap 5): PixArt-Σ runs T5 *with* its mask, FLUX runs it
*without* one, so FLUX's pad positions are encoded, attended and part of what the model sees.

T5-XXL has 4.7 B parameters. With `shard=True` each T5 block (and the root: embeddings, final
norm) is an FSDP2 unit over all ranks, so a rank holds 1/W of the weights and gathers one block at
a time. A sharded forward is a collective: every rank must call `encode` equally often, which is
why `pad_calls` exists (a rank with less work runs empty forwards until all ranks are done). CLIP
(123 M) stays replicated, as torchtitan does for FLUX.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

log = logging.getLogger("ditill.data")

@dataclass
class TextBatch:
    """Encoder outputs for a list of captions, full length (padded to max_length), on the CPU."""

    emb: torch.Tensor  # (B, L, D) float32
    mask: torch.Tensor  # (B, L) uint8, 1 = token (the tokenizer's, whether or not the encoder used it)
    pooled: Optional[torch.Tensor] = None  # (B, Dp) float32, CLIP's pooler output


def local_dir(path: str, flag: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{flag} {path!r} is not a local directory; encoders load only from local "
                                "directories (save them with save_pretrained first) — nothing is downloaded")
    return path


def shard_text_encoder(model: torch.nn.Module, mesh: Any) -> torch.nn.Module:
    """FSDP2 over `mesh`: one unit per T5 block, then the root (shared embedding, final norm)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.encoder.block:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model


class TextEncoders:
    """T5 (+ CLIP) and their tokenizers; `encode(captions)` gives a `TextBatch`."""

    def __init__(self, t5_dir: str, *, tokenizer: Optional[str] = None, max_length: int = 300, attention_mask: bool = True,
                 clip_dir: Optional[str] = None, clip_tokenizer: Optional[str] = None, clip_max_length: int = 77,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, shard: bool = False):
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        self.device, self.max_length, self.attention_mask = torch.device(device), max_length, attention_mask
        self.t5_dir = local_dir(t5_dir, "--text-encoder")
        self.t5 = T5EncoderModel.from_pretrained(self.t5_dir, local_files_only=True, **_dtype_kw(dtype)).eval()
        self.t5.requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(local_dir(tokenizer or t5_dir, "--tokenizer"), local_files_only=True)
        if shard:
            import torch.distributed as dist
            from torch.distributed.device_mesh import init_device_mesh

            if not dist.is_initialized():
                raise RuntimeError("sharding the text encoder needs a process group: run under torchrun (WORLD_SIZE > 1)")
            total = sum(p.numel() for p in self.t5.parameters())  # fully_shard moves each shard to the device
            shard_text_encoder(self.t5, init_device_mesh(self.device.type, (dist.get_world_size(),)))
            local = sum(p.to_local().numel() for p in self.t5.parameters())
            log.info("T5 sharded with FSDP2 over %d ranks: rank %d holds %d of its %d parameters",
                     dist.get_world_size(), dist.get_rank(), local, total)
        else:
            self.t5.to(self.device)
        self.sharded = shard
        self.calls = 0  # T5 forwards so far (a sharded forward is a collective: ranks must match)
        self.clip = self.clip_tokenizer = None
        self.clip_max_length = clip_max_length
        if clip_dir:
            self.clip = CLIPTextModel.from_pretrained(local_dir(clip_dir, "--clip-encoder"), local_files_only=True,
                                                      **_dtype_kw(dtype)).to(self.device).eval()
            self.clip.requires_grad_(False)
            self.clip_tokenizer = AutoTokenizer.from_pretrained(local_dir(clip_tokenizer or clip_dir, "--clip-tokenizer"),
                                                                local_files_only=True)
            eos, end = self.clip.config.eos_token_id, self.clip_tokenizer.eos_token_id
            # eos_token_id 2 is CLIP's legacy marker for "pool at the highest id", right only when the end id is the highest
            if eos != end and not (eos == 2 and end == len(self.clip_tokenizer) - 1):
                raise ValueError(f"--clip-encoder {clip_dir!r} pools at eos_token_id={eos}, but its tokenizer's end id is "
                                 f"{end}; set the model config's eos_token_id to the tokenizer's")

    @property
    def dim(self) -> int:
        return int(self.t5.config.d_model)

    @property
    def pooled_dim(self) -> Optional[int]:
        return int(self.clip.config.hidden_size) if self.clip is not None else None

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TextBatch:
        tok = self.tokenizer(captions, max_length=self.max_length, padding="max_length", truncation=True, return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        # FLUX: no mask, pads are encoded like tokens; PixArt-Σ: the mask (pads attend nowhere)
        emb = self.t5(input_ids=ids, attention_mask=mask if self.attention_mask else None).last_hidden_state
        self.calls += 1
        pooled = None
        if self.clip is not None:
            ctok = self.clip_tokenizer(captions, max_length=self.clip_max_length, padding="max_length", truncation=True,
                                       return_tensors="pt")
            # as FLUX calls it: no mask (CLIP's attention is causal, so pads after the end change nothing)
            pooled = self.clip(input_ids=ctok["input_ids"].to(self.device)).pooler_output.float().cpu()
        return TextBatch(emb.float().cpu(), mask.to(torch.uint8).cpu(), pooled)

    def pad_calls(self, target: int) -> None:
        """Run empty T5 forwards until `target` calls: a sharded rank with less work keeps the others going."""
        while self.calls < target:
            self.encode([""])


def _dtype_kw(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """`dtype=` since transformers 4.56 (`torch_dtype=` is deprecated there), `torch_dtype=` before."""
    import transformers

    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def bf16_words(t: torch.Tensor) -> np.ndarray:
    """A tensor rounded to bf16, as its raw 16-bit words (numpy has no bf16)."""
    return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)


def words_bf16(words: np.ndarray) -> torch.Tensor:
    """Raw bf16 words (uint16) → a bf16 tensor, bit for bit."""
    return torch.from_numpy(np.ascontiguousarray(words).view(np.int16)).view(torch.bfloat16)


def token_count(mask: np.ndarray, caption: str) -> int:
    """Tokens of a right-padded mask (1…1 0…0); anything else cannot be stored unpadded."""
    n = int(np.count_nonzero(mask))
    if not mask[:n].all():
        raise ValueError(f"the tokenizer's mask for {caption!r} is not 1…1 then 0…0 (left padding?); unpadded "
                         "storage needs right padding: set the tokenizer's padding_side='right'")
    return n
