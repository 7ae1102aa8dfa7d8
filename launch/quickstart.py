"""`python -m launch.quickstart [--out DIR] [--quick] [--data digits|wds|mds] [--peft lora,tdlora] [key=value ...]`

On scikit-learn's bundled digits: train a small DiT teacher from scratch, distil a LiT, a DyDiT and a
DyLiT student from it, sample class-conditional digits from each, score them with a classifier
trained on the real digits, measure GFLOPs and sampling time, and write `report.json`, `report.md`
and one PNG grid per model into DIR (default runs/quickstart). Running it again into the same DIR
reuses the finished stages. `key=value` overrides go to every training stage (e.g. train.steps=100).
`--peft lora,tdlora` also distils each student with LoRA / TD-LoRA adapters on its frozen inherited
base (stages `<student>-<method>`) and compares them with the full fine-tunes.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace


def parse(argv: list[str] | None):
    from trainer.quickstart import DATA_FORMATS, EvalSettings, Options

    p = argparse.ArgumentParser(prog="python -m launch.quickstart", description=__doc__.split("\n\n")[1])
    p.add_argument("--out", default="runs/quickstart", help="output directory (reused if it exists)")
    p.add_argument("--quick", action="store_true", help="a tiny smoke version of the whole pipeline (seconds, not minutes)")
    p.add_argument("--data", choices=DATA_FORMATS, default="digits",
                   help="digits: in memory; wds / mds: write the digits as shards first and train from them")
    p.add_argument("--samples", type=int, help="samples per model for the scores")
    p.add_argument("--sample-steps", type=int, help="sampler steps")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale")
    p.add_argument("--nproc", type=int, default=0,
                   help="training processes (DDP ranks); default one per CPU core up to 2, or 1 with a GPU")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (training ranks, sampling, timing); default 1")
    p.add_argument("--peft", default="", metavar="lora,tdlora",
                   help="also distil each student with LoRA and/or TD-LoRA adapters on its frozen base (compared "
                        "with its full fine-tune: trainable parameters, accuracy)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a quality bar is not met")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides for every training stage")
    a = p.parse_args(argv)
    ev = EvalSettings.quick() if a.quick else EvalSettings()
    for field, value in (("samples", a.samples), ("steps", a.sample_steps), ("cfg_scale", a.cfg_scale)):
        if value is not None:
            ev = replace(ev, **{field: value})
    opts = Options(out=a.out, quick=a.quick, data=a.data, eval=ev, overrides=list(a.overrides), nproc=a.nproc,
                   threads=a.threads, peft=tuple(m for m in a.peft.split(",") if m))
    return opts, a.strict


def main(argv: list[str] | None = None) -> int:
    import time

    t0 = time.perf_counter()
    opts, strict = parse(argv)
    from trainer.config import ConfigError
    from trainer.quickstart import QuickstartError, run
    from trainer.quickstart_report import table

    try:
        report = run(opts)
    except (ConfigError, QuickstartError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(table(report))
    failed = [k for k, ok in report["bars"].items() if not ok]
    print(f"\nbars: {'all met' if not failed else 'NOT met: ' + ', '.join(failed)}"
          f"{' (a --quick run is too small to meet them)' if opts.quick and failed else ''}")
    print(f"report: {opts.out / 'report.md'}; total {time.perf_counter() - t0:.0f}s")
    return 1 if strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
