"""`python -m launch.train CONFIG.yaml [key.sub=value ...]`

The same command runs as one process, under `torchrun --nproc_per_node N`, under SLURM's `srun`
and under `deepspeed --module launch.train`: rank and world come from the environment. The order:
the config (and the teacher/student pairing, read from the teacher file's header) is validated
before any process group starts; then the process group; then each rank builds its models and reads
only its own share of the teacher's weights.
"""
from __future__ import annotations

import argparse
import sys

from trainer.config import ConfigError, load_config


def parse(argv: list[str] | None) -> tuple[str, list[str]]:
    p = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="YAML experiment, e.g. configs/quickstart/lit.yaml")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    # the deepspeed launcher appends --local_rank=N; the environment already carries it
    args, unknown = p.parse_known_args(argv)
    rest = [u for u in unknown if not u.startswith("--local_rank")]
    return args.config, list(args.overrides) + rest


def main(argv: list[str] | None = None) -> int:
    path, overrides = parse(argv)
    try:
        cfg = load_config(path, overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from models.weights_io import CheckpointError as WeightsError
    from trainer.checkpoint import CheckpointError
    from trainer.loop import NonFiniteError, train

    try:
        return train(cfg).exit_code
    except (CheckpointError, WeightsError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
