"""`python -m launch.evaluate SAMPLES [--ref REF] [--teacher TEACHER] [options]`: FID, sFID, Inception
Score, precision/recall, CLIP score and teacher-relative fidelity of a sample set.

SAMPLES, REF and TEACHER are each an ADM `.npz` (`arr_0` uint8 N×H×W×3), a DiTill shard directory or
an image folder. An ADM reference batch's stored statistics (`mu`/`sigma`, `mu_s`/`sigma_s`) are
used as they are. Examples:
  python -m launch.evaluate samples.npz --ref VIRTUAL_imagenet256_labeled.npz --device cuda --out metrics.json
  python -m launch.evaluate student.npz --teacher teacher.npz --metrics teacher_mse        # no weights needed
  python -m launch.evaluate student.npz --teacher teacher.npz --prompts prompts.txt --images-per-prompt 4 \\
         --clip-model ViT-L-14 --clip-weights open_clip_vit_l14.bin
The Inception weights (pt_inception-2015-12-05-6726825d.pth) are read from --inception,
$DITILL_INCEPTION_WEIGHTS or torch hub's checkpoint folder; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import sys

from trainer.metrics.evaluator import METRICS, EvalSettings


def parse(argv: list[str] | None) -> tuple[EvalSettings, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m launch.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("samples", help="the samples: ADM .npz, shard directory or image folder")
    p.add_argument("--ref", help="reference: ADM reference batch .npz (statistics used when stored), images or shards")
    p.add_argument("--teacher", help="the teacher's samples on the same prompts/labels and seeds (sample i ↔ sample i)")
    p.add_argument("--metrics", help=f"comma-separated subset of {','.join(METRICS)} (default: all the inputs allow)")
    p.add_argument("--inception", help="FID Inception weights file (pt_inception-2015-12-05-6726825d.pth)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--batch-size", type=int, default=50, help="images per chunk (memory is bounded by it)")
    p.add_argument("--resolution", type=int, help="centre-crop folder/shard images to this side (default: the samples')")
    p.add_argument("--is-splits", type=int, default=10)
    p.add_argument("--pr-k", type=int, default=3, help="precision/recall neighbourhood size")
    p.add_argument("--pr-batch", type=int, default=10000, help="rows of the distance matrix held at once")
    p.add_argument("--prompts", help="captions in sample order: .txt (one per line) or .jsonl ({\"prompt\": ...})")
    p.add_argument("--images-per-prompt", type=int, default=1, help="k: sample i is prompt i // k")
    p.add_argument("--clip-model", help="open_clip architecture name (with --clip-weights) or a local open_clip directory")
    p.add_argument("--clip-weights", help="local open_clip weights file for --clip-model NAME")
    p.add_argument("--save-ref-stats", metavar="NPZ", help="write the reference statistics (ADM layout + pool_3 features)")
    p.add_argument("--out", help="write the JSON result here")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    a = p.parse_args(argv)
    metrics = [m.strip() for m in a.metrics.split(",") if m.strip()] if a.metrics else None
    s = EvalSettings(samples=a.samples, ref=a.ref, teacher=a.teacher, metrics=metrics, inception=a.inception,
                     device=a.device, batch_size=a.batch_size, resolution=a.resolution, is_splits=a.is_splits,
                     pr_k=a.pr_k, pr_batch=a.pr_batch, prompts=a.prompts, images_per_prompt=a.images_per_prompt,
                     clip_model=a.clip_model, clip_weights=a.clip_weights, save_ref_stats=a.save_ref_stats)
    return s, a


def main(argv: list[str] | None = None) -> int:
    settings, args = parse(argv)
    from trainer.metrics.evaluator import json_safe, evaluate, format_table, write_json

    try:
        result = evaluate(settings)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"launch.evaluate: error: {e}", file=sys.stderr)
        return 2
    if args.out:
        write_json(result, args.out)
    print(json.dumps(json_safe(result), indent=1, sort_keys=True) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
