"""Tiny random-weight text encoders for tests and the quickstart: T5 and CLIP with a byte tokenizer.

Nothing is downloaded: the models are transformers' own `T5EncoderModel` and `CLIPTextModel` built
from small configs with seeded weights, and the tokenizer is ByT5's (UTF-8 bytes + 3 specials, no
vocabulary file). Each is saved with `save_pretrained` into its own folder, so `launch.precompute`
loads them exactly as it loads T5-XXL and CLIP-L (`from_pretrained(..., local_files_only=True)`).
They are random: they test the conditioning path, not language understanding.

CLIP pools its output at the first `eos_token_id` of each sequence, so its config is given the byte
tokenizer's end id (1) and a vocabulary of at least the tokenizer's 384 ids.

`local_bias` gives T5 a local relative-position bias instead of its random one (ALiBi's shape: head h of
H lowers its logits by local_bias·(h+1)/H per byte of distance), so each byte's output describes its
neighbourhood — word-like features, as a trained encoder's are — while every weight stays random. With
bytes as tokens and near-uniform random attention, a byte's output is mostly its whole sentence's mean,
so a word in an unseen sentence looks unlike the same word in a seen one.

`output_gain` sets the gain of T5's final RMSNorm (1 at random init): the embeddings' scale. PixArt's
caption projection starts at std 0.02, sized for T5-XXL's 4096 channels; from a narrow tiny T5 its
output is so small that every key of the cross-attention is alike, the attention stays uniform and its
queries get almost no gradient. A larger gain makes the keys differ from the start.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

T5_DIR, CLIP_DIR = "t5", "clip"
CLIP_MAX_LENGTH = 77  # CLIP-L's context, as FLUX tokenizes for it


@dataclass(frozen=True)
class TinyTextEncoders:
    t5: str  # folder: T5EncoderModel + ByT5Tokenizer
    clip: str | None  # folder: CLIPTextModel + ByT5Tokenizer, or None when not built


def byte_tokenizer():
    """ByT5's tokenizer: pad 0, eos 1, unk 2, byte b ↦ b + 3, 125 extra ids; 384 ids in all."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


def build_tiny_text_encoders(out: str, seed: int = 0, dim: int = 32, layers: int = 2, heads: int = 2,
                             clip: bool = True, clip_dim: int = 32, head_dim: int | None = None,
                             ff_dim: int | None = None, local_bias: float | None = None,
                             output_gain: float = 1.0) -> TinyTextEncoders:
    """Write `out/t5` (and `out/clip`); the same seed and sizes give byte-identical weight files.

    T5's `head_dim` (default dim / heads) and `ff_dim` (default 2·dim) can be narrow, so a T5 as
    wide as T5-XXL's 4096-d output stays cheap to run (the storage benchmark uses that)."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if (head_dim is None and dim % heads) or clip_dim % heads:
        raise ValueError(f"dim {dim} and clip_dim {clip_dim} must be multiples of heads {heads}")
    tok = byte_tokenizer()
    vocab = len(tok)  # 384
    t5_dir = os.path.join(out, T5_DIR)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
        torch.manual_seed(seed)
        t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=dim, d_ff=ff_dim or 2 * dim, d_kv=head_dim or dim // heads, num_layers=layers,
                                     num_heads=heads, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                     decoder_start_token_id=tok.pad_token_id))
        if local_bias is not None:
            set_local_bias(t5, local_bias)
        if output_gain != 1.0:
            with torch.no_grad():
                t5.encoder.final_layer_norm.weight.fill_(output_gain)
        t5.save_pretrained(t5_dir)
        tok.save_pretrained(t5_dir)
        clip_dir = None
        if clip:
            clip_dir = os.path.join(out, CLIP_DIR)
            torch.manual_seed(seed + 1)
            model = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=clip_dim, intermediate_size=2 * clip_dim,
                                                 num_hidden_layers=layers, num_attention_heads=heads,
                                                 max_position_embeddings=CLIP_MAX_LENGTH, pad_token_id=tok.pad_token_id,
                                                 bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
            model.save_pretrained(clip_dir)
            tok.save_pretrained(clip_dir)
    return TinyTextEncoders(t5_dir, clip_dir)


def set_local_bias(t5, slope: float) -> None:
    """T5's relative-position bias (one table in its first layer, shared by all) as −slope·(h+1)/H·|i − j|
    per head h: near bytes attend to each other more the further apart the far ones are."""
    if slope <= 0:
        raise ValueError(f"local_bias={slope!r}: a slope > 0 (logit drop per byte of distance), or None for T5's random bias")
    attn = t5.encoder.block[0].layer[0].SelfAttention
    table = attn.relative_attention_bias.weight  # (buckets, heads)
    rel = torch.arange(-attn.relative_attention_max_distance, attn.relative_attention_max_distance + 1)
    buckets = attn._relative_position_bucket(rel, bidirectional=True, num_buckets=attn.relative_attention_num_buckets,
                                             max_distance=attn.relative_attention_max_distance)
    heads = table.shape[1]
    slopes = slope * torch.arange(1, heads + 1, dtype=table.dtype) / heads
    with torch.no_grad():  # a bucket of several distances (the far, logarithmic ones) gets the nearest one's bias
        for b in buckets.unique().tolist():
            table[b] = -slopes * rel[buckets == b].abs().min().to(table.dtype)
