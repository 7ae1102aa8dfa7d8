"""`python -m launch.convert SRC OUT.safetensors [--num-heads N] [--set KEY=VALUE ...] [--prefer ema|model]`.

Reads an official checkpoint (DiT `.pt`, PixArt-Σ `.pth`, BFL `flux1-*.safetensors`), a diffusers
directory of any family (sharded safetensors with an index too) or one of our safetensors files and
writes our layout with the config in the safetensors metadata, so later loads need no guessing.
`--set` gives config fields a file cannot tell (e.g. `pe_interpolation=2`, `axes_dim=[4,6,6]`).
"""
from __future__ import annotations

import argparse
import sys

from launch.info import count_params, parse_overrides
from models.convert import CheckpointError, describe, read_checkpoint, save_safetensors


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.convert", description=__doc__.split("\n\n")[1])
    p.add_argument("src", help="official .pt/.pth, diffusers directory, or .safetensors")
    p.add_argument("out", help="output .safetensors path")
    p.add_argument("--num-heads", type=int, default=None, help="heads, when the hidden size is not a registry width")
    p.add_argument("--input-size", type=int, default=None, help="latent side, when the file has no pos_embed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config field the file cannot tell (repeatable), e.g. model_max_length=120 or axes_dim=[4,6,6]")
    p.add_argument("--prefer", choices=("ema", "model"), default="ema", help="weights of a training checkpoint")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {k: v for k, v in (("num_heads", args.num_heads), ("input_size", args.input_size)) if v is not None}
    try:
        overrides.update(parse_overrides(args.set))
    except ValueError as e:
        print(f"error: --set: {e}", file=sys.stderr)
        return 2
    if not args.out.endswith(".safetensors"):
        print(f"error: output {args.out} must end in .safetensors", file=sys.stderr)
        return 2
    try:
        ckpt = read_checkpoint(args.src, prefer=args.prefer, **overrides)
        save_safetensors(ckpt.state_dict, ckpt.config, args.out)
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    params = count_params(ckpt.config)["total"]  # parameters only: fixed buffers (positions, null caption) excluded
    print(f"{ckpt.format} {args.src} -> {args.out}: {describe(ckpt.config)}, {params:,} params")
    return 0


if __name__ == "__main__":
    sys.exit(main())
