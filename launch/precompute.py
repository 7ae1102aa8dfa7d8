"""`python -m launch.precompute --vae DIR --text-encoder DIR --in SHARDS --out SHARDS`.

Encodes image shards into latent + text-embedding shards with local encoders. Run one process per
rank (RANK/WORLD_SIZE from the environment, e.g. under torchrun, or --rank/--world-size);
rerunning the same command resumes, skipping finished output shards. Examples:
  PixArt-Σ (T5 with its mask, embeddings stored unpadded in bf16):
    python -m launch.precompute --vae sdxl-vae --text-encoder t5-v1_1-xxl --max-length 300 \\
        --scaling-factor 0.13025 --in /data/t2i-512 --out /data/t2i-512-latents --dtype bf16
  FLUX (T5 without a mask, padded; CLIP's pooled vector), T5 sharded over 8 GPUs with FSDP2:
    torchrun --nproc_per_node 8 -m launch.precompute --vae flux-ae --text-encoder t5-v1_1-xxl \\
        --no-text-mask --max-length 512 --clip-encoder clip-vit-large-patch14 --shard-text-encoder \\
        --in /data/t2i-1024 --out /data/t2i-1024-flux
  DiT (class labels; the posterior std and mirrored latents for per-step sampling and flips):
    python -m launch.precompute --vae sd-vae-ft-ema --image-size 256 --posterior --flip-copy \\
        --in /data/in1k-256 --out /data/in1k-256-latents
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from data.precompute import DTYPES, PrecomputeConfig, precompute


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.precompute", description=__doc__.splitlines()[0])
    p.add_argument("--in", dest="in_dir", required=True, help="input shard directory (images and/or captions)")
    p.add_argument("--out", required=True, help="output shard directory")
    p.add_argument("--vae", help="local diffusers AutoencoderKL directory")
    p.add_argument("--text-encoder", help="local transformers T5EncoderModel directory")
    p.add_argument("--tokenizer", help="local tokenizer directory (default: the text encoder's)")
    p.add_argument("--max-length", type=int, default=300, help="text tokens, padded (PixArt-Σ: 300, FLUX-dev: 512)")
    p.add_argument("--no-text-mask", dest="text_mask", action="store_false",
                   help="run T5 without its attention mask, pads encoded and stored (FLUX); default: with it (PixArt-Σ)")
    p.add_argument("--clip-encoder", help="local transformers CLIPTextModel directory: the pooled vector (FLUX)")
    p.add_argument("--clip-tokenizer", help="local tokenizer directory (default: the CLIP encoder's)")
    p.add_argument("--clip-max-length", type=int, default=77)
    p.add_argument("--shard-text-encoder", action="store_true",
                   help="shard T5 over all ranks with FSDP2 (needs torchrun; each rank holds 1/W of it)")
    p.add_argument("--scaling-factor", type=float, help="latent scale the loader applies (default: the VAE config's)")
    p.add_argument("--shift-factor", type=float, help="latent shift (default: the VAE config's, or 0)")
    p.add_argument("--posterior", action="store_true", help="also store the VAE posterior's std (doubles latent storage)")
    p.add_argument("--flip-copy", action="store_true", help="also store latents of the mirrored images (doubles it again)")
    p.add_argument("--image-size", type=int, help="square side for unbucketed input; overrides the bucket resolution")
    p.add_argument("--format", choices=["wds", "mds"], help="output format (default: the input's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if CUDA is available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="encoder dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    p.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    import torch

    cuda = torch.cuda.is_available()
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    cfg = PrecomputeConfig(vae=args.vae, text_encoder=args.text_encoder, tokenizer=args.tokenizer, max_length=args.max_length,
                           scaling_factor=args.scaling_factor, shift_factor=args.shift_factor, image_size=args.image_size,
                           batch_size=args.batch_size, device=device, dtype=args.dtype or ("bf16" if cuda else "fp32"),
                           format=args.format, text_attention_mask=args.text_mask, clip_encoder=args.clip_encoder,
                           clip_tokenizer=args.clip_tokenizer, clip_max_length=args.clip_max_length,
                           shard_text_encoder=args.shard_text_encoder and args.world_size > 1,
                           posterior=args.posterior, flip_copy=args.flip_copy)
    cfg.validate()  # before any process group
    group = cfg.shard_text_encoder
    if group:
        import torch.distributed as dist

        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=args.rank, world_size=args.world_size)
    try:
        report = precompute(args.in_dir, args.out, cfg, rank=args.rank, world_size=args.world_size)
    finally:
        if group:
            dist.destroy_process_group()
    print(f"rank {args.rank}/{args.world_size}: wrote {len(report.done)} shards, {len(report.skipped_shards)} were already done, "
          f"{report.skipped_samples} samples skipped; "
          + ("manifest written" if report.manifest_written else
             "manifest written by rank 0" if group else "manifest pending other ranks' shards"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
