"""`python -m launch.make_shards --source {digits,digits-captions,imagefolder,pairs,webdataset,mds} --format {wds,mds} --out DIR`.

Writes shards plus `manifest.json` (sample counts per shard). `digits-captions` is the
text-to-image test bed: digits captioned from the training sentence templates, with every
(template, digit) prompt, held-out templates marked, in `prompts.jsonl` beside the shards. Examples:
  python -m launch.make_shards --source digits --format wds --out runs/digits-wds
  python -m launch.make_shards --source digits-captions --captions-per-image 2 --format wds --out runs/digits-t2i
  python -m launch.make_shards --source imagefolder --input /data/imagenet/train --format mds --out /data/in1k-mds
  python -m launch.make_shards --source pairs --input pairs.jsonl --format wds --out /data/t2i --buckets 512
  python -m launch.make_shards --source webdataset --input /data/laion-i2d --format wds --out /data/laion-ditill --buckets 512
  python -m launch.make_shards --source mds --input s3://bucket/set --fields image=jpg --format mds --out /data/set-ditill
A third-party set (img2dataset's webdataset, any MDS set; local, s3://, gs:// or https://) is
resharded into DiTill's layout; `python -m launch.precompute` then adds latents and text embeddings.
"""
from __future__ import annotations

import argparse
import logging
import sys

from data.captions import digits_captions_source, write_prompts
from data.conversions import thirdparty_source
from data.sources import digits_source, imagefolder_source, pairs_source
from data.writers import parse_bytes, write_dataset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.make_shards", description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, choices=["digits", "digits-captions", "imagefolder", "pairs", "webdataset", "mds"])
    p.add_argument("--input", help="imagefolder: the root of class folders; pairs: a .jsonl or .csv table; webdataset: "
                                   "a directory, a .tar or a brace pattern of tars; mds: the folder of an index.json")
    p.add_argument("--format", required=True, choices=["wds", "mds"])
    p.add_argument("--out", required=True, help="output directory (new or empty)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--shard-bytes", type=parse_bytes, default=None, help="also cap shard size, e.g. 256MB")
    p.add_argument("--buckets", type=int, default=None, metavar="RESOLUTION",
                   help="group samples by aspect-ratio bucket (PixArt-Σ style) at this base resolution, e.g. 512")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order written (output is deterministic)")
    p.add_argument("--image-column", default="image", help="pairs: column holding the image path")
    p.add_argument("--caption-column", default="caption", help="pairs: column holding the caption")
    p.add_argument("--captions-per-image", type=int, default=1,
                   help="digits-captions: distinct training templates per image (each pair is one sample)")
    p.add_argument("--fields", default="", help="webdataset/mds: field=extension-or-column pairs, e.g. image=jpg,caption=txt")
    p.add_argument("--cache-dir", default=None, help="webdataset/mds: local cache of remote or compressed shards")
    p.add_argument("--cache-gb", type=float, default=64.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    if args.source == "digits":
        source = digits_source()
    elif args.source == "digits-captions":
        source = digits_captions_source(args.captions_per_image, seed=args.seed)
    elif not args.input:
        p.error(f"--source {args.source} needs --input")
    elif args.source == "imagefolder":
        source = imagefolder_source(args.input)
    elif args.source in ("webdataset", "mds"):
        try:
            fields = dict(pair.split("=", 1) for pair in args.fields.split(",") if pair)
        except ValueError:
            p.error(f"--fields {args.fields!r}: write field=extension pairs separated by commas, e.g. image=jpg,caption=txt")
        source = thirdparty_source("wds" if args.source == "webdataset" else "mds", args.input, fields,
                                   cache_dir=args.cache_dir, cache_gb=args.cache_gb)
    else:
        source = pairs_source(args.input, args.image_column, args.caption_column)
    report = write_dataset(source, args.out, args.format, samples_per_shard=args.samples_per_shard,
                           shard_bytes=args.shard_bytes, bucket_resolution=args.buckets, seed=args.seed)
    if args.source == "digits-captions":
        print(f"evaluation prompts (held-out templates marked) in {write_prompts(args.out)}")
    m = report.manifest
    print(f"wrote {m.samples} samples in {sum(len(g.shards) for g in m.groups)} {m.format} shards "
          f"({len(m.groups)} group{'s' if len(m.groups) > 1 else ''}) to {args.out}; fields {', '.join(m.fields)}")
    if report.skipped:
        print(f"skipped {len(report.skipped)} unreadable inputs (listed in the warnings above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
