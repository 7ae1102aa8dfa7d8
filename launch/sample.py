"""`python -m launch.sample SOURCE --out DIR (--num-samples N | --prompts FILE) [options]`: many samples, reproducibly.

SOURCE is a run directory (its newest valid checkpoint's EMA weights by default) or a weights file
(`models.load_pretrained`: our safetensors, official DiT `.pt`, a diffusers directory). The same
command runs as one process, under `torchrun --nproc_per_node N` and under `srun`; sample i is the
same image whatever the number of ranks, and a relaunch into the same --out samples only the chunks
that are missing. Examples:
  torchrun --nproc_per_node 8 -m launch.sample runs/dydit-xl2 --out samples/dydit --num-samples 50000 \\
      --method ddpm --steps 250 --cfg-scale 1.5 --vae sd-vae-ft-ema --device cuda --chunk 64
  python -m launch.sample pixart.safetensors --out samples/p --prompts prompts.txt --images-per-prompt 4 \\
      --text-encoder t5-v1_1-xxl --method ddim --steps 20 --cfg-scale 4.5 --vae sdxl-vae --to-shards shards/teacher
  python -m launch.sample runs/quickstart/dydit --out samples/digits --num-samples 1000 --balanced --method ddim --steps 25 --png
Outputs in --out: samples.npz (ADM layout: arr_0 uint8 N×H×W×3; latents; labels or captions;
realised_flops of a dynamic model), samples.json (settings, FLOPs per sample), png/ with --png;
--to-shards DIR writes the samples as training shards (teacher-generated data).
"""
from __future__ import annotations

import argparse
import sys


def parse(argv: list[str] | None):
    from trainer.sample_job import SampleSettings

    p = argparse.ArgumentParser(prog="python -m launch.sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("source", help="run directory or weights file")
    p.add_argument("--out", required=True, help="output directory (relaunch into it to resume)")
    g = p.add_argument_group("what to sample")
    g.add_argument("--num-samples", dest="num", type=int, help="class-conditional: number of samples")
    g.add_argument("--balanced", action="store_true", help="labels i mod K (every class equally often) instead of drawn per sample")
    g.add_argument("--prompts", help="text-to-image: prompt file, .txt (one per line) or .jsonl ({\"prompt\": ...})")
    g.add_argument("--images-per-prompt", type=int, default=1, help="k: sample i shows prompt i // k")
    g.add_argument("--weights", default="ema", help="run directory: ema (default) or student")
    g.add_argument("--step", type=int, help="run directory: the checkpoint's step (default: the newest valid one)")
    g = p.add_argument_group("sampler")
    g.add_argument("--method", help="ddpm | ddim (Gaussian models) | euler (flow models); default ddpm / euler")
    g.add_argument("--steps", type=int, default=250)
    g.add_argument("--cfg-scale", type=float, default=1.0, help="guidance scale (a guidance-distilled model is told it)")
    g.add_argument("--cfg-channels", type=int, help="guide only the first k latent channels (DiT's sample_ddp.py: 3)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM's stochasticity")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resolution", help="pixels: 256 or HxW (default: the model's native size)")
    g.add_argument("--bucket", help="aspect-ratio bucket key (e.g. 0.57) at the base --resolution")
    g.add_argument("--objective", help="weights file only: gaussian | flow, when the output fits both")
    g.add_argument("--flow-shift", type=float, default=1.0, help="weights file, flow: SD3's fixed time shift")
    g.add_argument("--dynamic-shift", action="store_true", help="weights file, flow: FLUX's resolution-dependent shift")
    g = p.add_argument_group("execution")
    g.add_argument("--chunk", type=int, default=32, help="samples per chunk (the unit of work and of resume; keep it "
                   "fixed to reproduce bytes)")
    g.add_argument("--threads", type=int, default=1, help="CPU threads per rank (part of what fixes the bytes)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--dtype", default="fp32", help="fp32 | bf16 (autocast)")
    g.add_argument("--timeout-hours", type=float, default=72.0, help="how long ranks wait for the slowest one at the end")
    g.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("decoding and text")
    g.add_argument("--vae", help="local diffusers AutoencoderKL directory (latent models); none: pixel-space model")
    g.add_argument("--latent-scale", type=float, help="default: the VAE config's scaling_factor")
    g.add_argument("--latent-shift", type=float, help="default: the VAE config's shift_factor (or 0)")
    g.add_argument("--text-encoder", help="local T5 directory (default: the one the run's shard manifest names)")
    g.add_argument("--clip-encoder", help="local CLIP text directory (pooled vector, FLUX)")
    g.add_argument("--max-length", type=int, help="T5 tokens (default: the run's shards', else 300)")
    g.add_argument("--no-text-mask", dest="text_mask", action="store_const", const=False, default=None,
                   help="run T5 without its attention mask (FLUX's convention)")
    g.add_argument("--text-batch", type=int, default=16, help="prompts encoded per call (launch.precompute's batch)")
    g.add_argument("--prompt-embeddings", help="precompute output directory: prompts.jsonl + prompts.safetensors")
    g.add_argument("--null-text", help="directory with null_text.safetensors (the null caption of guidance)")
    g = p.add_argument_group("outputs")
    g.add_argument("--png", action="store_true", help="also png/000000.png, … one file per sample")
    g.add_argument("--to-shards", help="also write the samples as training shards here")
    g.add_argument("--shard-format", default="wds", help="wds | mds")
    g.add_argument("--samples-per-shard", type=int, default=1000)
    a = p.parse_args(argv)
    keys = set(SampleSettings.__dataclass_fields__)
    values = {k: v for k, v in vars(a).items() if k in keys}
    values["progress"] = not a.no_progress
    return SampleSettings(**values)


def main(argv: list[str] | None = None) -> int:
    settings = parse(argv)
    from trainer.sample_job import SampleError, plan, run

    try:
        job = plan(settings)
    except (SampleError, FileNotFoundError) as e:
        print(f"launch.sample: error: {e}", file=sys.stderr)
        return 2
    report = run(job)
    if report:
        f = report["flops"]
        print(f"[sample] {report['samples']} samples → {report['npz']}; GFLOPs per sample {f['per_sample_mean'] / 1e9:.3f}"
              f" ({f['ratio_to_static']:.3f} of static)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
