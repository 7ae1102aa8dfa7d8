"""`python -m launch.tiny_encoders --out DIR [--seed 0]`: random-weight T5 and CLIP text encoders.

Writes DIR/t5 (T5EncoderModel) and DIR/clip (CLIPTextModel, FLUX's pooled vector), each with
ByT5's byte tokenizer (no vocabulary to download), for `launch.precompute --text-encoder DIR/t5
--clip-encoder DIR/clip`. The same seed and sizes give byte-identical weights. They are random:
they exercise the text-conditioning path, not language understanding.
"""
from __future__ import annotations

import argparse
import sys

from data.tiny_encoders import build_tiny_text_encoders


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.tiny_encoders", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory to write t5/ and clip/ into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dim", type=int, default=32, help="T5 d_model (the text embedding width)")
    p.add_argument("--clip-dim", type=int, default=32, help="CLIP hidden size (the pooled vector's width)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, help="T5 attention head width (default: dim / heads)")
    p.add_argument("--ff-dim", type=int, help="T5 feed-forward width (default: 2 × dim)")
    p.add_argument("--local-bias", type=float, default=None, metavar="SLOPE",
                   help="T5 attends locally: its relative-position bias falls by SLOPE·(h+1)/heads per byte of distance "
                        "(word-like byte features; default: T5's random bias)")
    p.add_argument("--output-gain", type=float, default=1.0,
                   help="gain of T5's final RMSNorm, the embeddings' scale (default 1, random init)")
    p.add_argument("--no-clip", action="store_true", help="T5 only (PixArt-style conditioning)")
    args = p.parse_args(argv)
    built = build_tiny_text_encoders(args.out, seed=args.seed, dim=args.dim, layers=args.layers, heads=args.heads,
                                     clip=not args.no_clip, clip_dim=args.clip_dim, head_dim=args.head_dim, ff_dim=args.ff_dim,
                                     local_bias=args.local_bias, output_gain=args.output_gain)
    print(f"T5 encoder: {built.t5}" + (f"\nCLIP text encoder: {built.clip}" if built.clip else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
