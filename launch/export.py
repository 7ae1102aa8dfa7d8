"""`python -m launch.export RUN_DIR [--step N] [--out DIR]`

Turns a run's checkpoint (the newest valid one, or step N) into `student.safetensors` and
`ema.safetensors` — consolidated, unsharded, with the model config in the metadata — whatever
engine (single, DDP, FSDP2, DeepSpeed ZeRO 1/2/3) and number of ranks wrote it. No process group
is needed. `--out` defaults to the checkpoint directory itself.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.export", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a DiTill run directory (holds config.yaml and checkpoints/)")
    p.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the newest valid one)")
    p.add_argument("--out", default=None, help="output directory (default: the checkpoint directory)")
    args = p.parse_args(argv)
    from trainer.checkpoint import CheckpointError
    from trainer.export import export_run

    try:
        paths = export_run(args.run_dir, args.out, args.step)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
