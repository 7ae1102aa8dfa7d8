"""`python -m launch.export RUN_DIR [--step N] [--out DIR]`

Turns a run's checkpoint (the newest valid one, or step N) into `student.safetensors` and
`ema.safetensors` — consolidated, unsharded, with the model config in the metadata — whatever
engine (single, DDP, FSDP2, DeepSpeed ZeRO 1/2/3) and number of ranks wrote it. No process group
is needed. `--out` defaults to the checkpoint directory itself.

A PEFT run's checkpoint holds only its trainable tensors: the base is rebuilt from the teacher (or
init) file its config names, checked against the checkpoint's base digest, and the adapters are kept
(`models.load_pretrained` reads them back), or with `--merge-lora` folded into the weights (plain
LoRA; TD-LoRA's timestep-dependent update stays a runtime module). `--diffusers-lora` also writes the
plain LoRA adapters for diffusers' `load_lora_weights` (`<out>/{student,ema}_lora/`).
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.export", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a DiTill run directory (holds config.yaml and checkpoints/)")
    p.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the newest valid one)")
    p.add_argument("--out", default=None, help="output directory (default: the checkpoint directory)")
    p.add_argument("--merge-lora", action="store_true", help="PEFT runs: fold plain LoRA into the weights")
    p.add_argument("--diffusers-lora", action="store_true",
                   help="PEFT runs: also write the LoRA adapters in diffusers' load_lora_weights layout")
    args = p.parse_args(argv)
    from trainer.checkpoint import CheckpointError
    from trainer.export import export_run

    try:
        paths = export_run(args.run_dir, args.out, args.step, merge_lora=args.merge_lora,
                           diffusers_lora=args.diffusers_lora)
    except (CheckpointError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
