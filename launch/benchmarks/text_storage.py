"""`python -m launch.benchmark text-storage [--json] [--samples N] [--dim 4096]`: bytes per sample of each text layout.

Encodes N captions of the captioned-digits test bed with a random T5 whose output is as wide as
T5-XXL's (4096; narrow heads and feed-forward keep it cheap: the width is all storage depends on)
and measures the shard bytes that `launch.precompute` writes, per sample, beside the layout it
replaces. Two caption lengths: the test bed's short captions, and long ones (several captions
joined, as PixArt-Σ's dense captions are long). Layouts:

- fp32 padded (L × D × 4): the issue's reference, computed, not written;
- fp16 padded: the first DiTill layout, written from the same embeddings;
- bf16 unpadded (PixArt-Σ, masked T5, L = 300): what precompute writes now;
- bf16 padded (FLUX, mask-free T5, L = 512): pads are encoded and kept.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

from data.captions import digits_captions_source
from data.manifest import read_manifest
from data.precompute import PrecomputeConfig, precompute
from data.readers import WdsShard
from data.sources import Source, SourceItem
from data.tiny_encoders import build_tiny_text_encoders
from data.writers import write_dataset, write_samples


def _captions(n: int, join: int) -> Source:
    """n captioned digits; with join > 1 each caption is `join` consecutive captions joined (long captions)."""
    base = digits_captions_source()
    items = []
    for i in range(n):
        parts = [base.items[(i + k) % len(base.items)].load() for k in range(join)]
        sample = {**parts[0], "caption": ", ".join(p["caption"] for p in parts)}
        items.append(SourceItem(base.items[i].key, (lambda s=sample: s), base.items[i].where))
    return Source(base.name, items, base.channels, base.classes)


def _per_sample(path: str) -> tuple[float, float, float]:
    """(shard bytes, text_emb member bytes, tokens) per sample, read back from the written shards."""
    m = read_manifest(path)
    emb = tokens = 0
    for rec in m.groups[0].shards:
        shard = WdsShard(os.path.join(path, rec.path), rec.samples)
        for i in range(rec.samples):
            _, size = shard.members[i]["text_emb"]
            emb += 512 + -(-size // 512) * 512  # the tar member: header block + payload in whole blocks
            tokens += int(shard.read(i, frozenset({"text_mask"}))["text_mask"].sum())
        shard.close()
    n = m.samples
    return sum(r.bytes for r in m.groups[0].shards) / n, emb / n, tokens / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.benchmark text-storage", description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t5 = build_tiny_text_encoders(os.path.join(tmp, "enc"), dim=args.dim, layers=1, heads=1, head_dim=8, ff_dim=16,
                                      clip=False).t5
        for label, join in (("short captions", 1), ("long captions", 6)):
            src = os.path.join(tmp, f"src-{join}")
            write_dataset(_captions(args.samples, join), src, "wds", samples_per_shard=args.samples)
            for layout, L, masked in (("bf16 unpadded (PixArt-Σ)", 300, True), ("bf16 padded (FLUX)", 512, False)):
                out = os.path.join(tmp, f"{join}-{L}")
                precompute(src, out, PrecomputeConfig(text_encoder=t5, max_length=L, text_attention_mask=masked, batch_size=8))
                shard, emb, tokens = _per_sample(out)
                rows.append({"captions": label, "layout": layout, "max_length": L, "tokens": tokens, "text_emb_bytes": emb,
                             "shard_bytes": shard, "fp32_padded_bytes": L * args.dim * 4})
                if masked:  # the first layout, from the same embeddings: float16, all L positions
                    old = os.path.join(tmp, f"{join}-{L}-fp16")
                    write_samples(_fp16_padded(out, args.dim), old, "wds", {"source": "bench"}, samples_per_shard=args.samples)
                    shard, emb, _ = _per_sample(old)
                    rows.append({"captions": label, "layout": "fp16 padded (first layout)", "max_length": L, "tokens": tokens,
                                 "text_emb_bytes": emb, "shard_bytes": shard, "fp32_padded_bytes": L * args.dim * 4})
    if args.json:
        print(json.dumps({"suite": "text-storage", "dim": args.dim, "samples": args.samples, "rows": rows}, indent=1))
        return 0
    print(f"text embeddings, D = {args.dim}, {args.samples} captions each (byte tokenizer: ~1 token per character)")
    print(f"{'captions':15} {'layout':28} {'L':>4} {'tokens':>7} {'text_emb/sample':>16} {'shard/sample':>13} {'vs fp32 padded':>15}")
    for r in rows:
        print(f"{r['captions']:15} {r['layout']:28} {r['max_length']:4d} {r['tokens']:7.1f} {r['text_emb_bytes'] / 1e6:13.3f} MB "
              f"{r['shard_bytes'] / 1e6:10.3f} MB {r['fp32_padded_bytes'] / r['text_emb_bytes']:14.1f}×")
    return 0


def _fp16_padded(path: str, dim: int):
    """The samples of a bf16 unpadded shard set, re-laid as the first layout: float16 (L, D), zeros at pads."""
    import torch

    from data.text_encoders import words_bf16

    m = read_manifest(path)
    L = int(m.text["max_length"])
    for rec in m.groups[0].shards:
        shard = WdsShard(os.path.join(path, rec.path), rec.samples)
        for i in range(rec.samples):
            raw = shard.read(i, frozenset({"text_emb", "text_mask"}))
            emb = np.zeros((L, dim), np.float16)
            emb[: len(raw["text_emb"])] = words_bf16(raw["text_emb"]).to(torch.float16).numpy()
            yield {"key": raw["key"], "text_emb": emb, "text_mask": np.array(raw["text_mask"])}
        shard.close()


if __name__ == "__main__":
    sys.exit(main())
