"""`python -m launch.quickstart [--family dit|pixart|flux] [--out DIR] [--quick] [--data digits|wds|mds] [--peft lora,tdlora] [--ablations] [key=value ...]`

On scikit-learn's bundled digits: train a small DiT teacher from scratch, distil a LiT, a DyDiT and a
DyLiT student from it, sample class-conditional digits from each, score them with a classifier
trained on the real digits, measure GFLOPs and sampling time, and write `report.json`, `report.md`
and one PNG grid per model into DIR (default runs/quickstart). Running it again into the same DIR
reuses the finished stages. `key=value` overrides go to every training stage (e.g. train.steps=100).
`--peft lora,tdlora` also distils each student with LoRA / TD-LoRA adapters on its frozen inherited
base (stages `<student>-<method>`) and compares them with the full fine-tunes.

`--family pixart` / `--family flux`: the same on captioned digits (text-to-image), through shards,
random T5 (+ CLIP) text embeddings and the real trainer: a PixArt-style teacher and its LiT / DyDiT /
DyLiT students, or a FLUX-style teacher, its guidance distillation and DyFLUX / LiT-FLUX students;
prompt accuracy on seen and held-out sentence templates (default DIR runs/quickstart-<family>).
`--ablations` adds the family's ablation stages to the same report.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace


def parse(argv: list[str] | None):
    from trainer.quickstart import DATA_FORMATS, FAMILIES, Options

    p = argparse.ArgumentParser(prog="python -m launch.quickstart", description=__doc__.split("\n\n")[1])
    p.add_argument("--family", choices=FAMILIES, default="dit",
                   help="dit: class-conditional (default); pixart / flux: text-to-image on captioned digits")
    p.add_argument("--out", default=None, help="output directory, reused if it exists (default runs/quickstart, "
                                               "runs/quickstart-<family> for pixart / flux)")
    p.add_argument("--quick", action="store_true", help="a tiny smoke version of the whole pipeline (seconds, not minutes)")
    p.add_argument("--data", choices=DATA_FORMATS, default=None,
                   help="digits: in memory (dit's default); wds / mds: write the digits as shards first and train from "
                        "them (pixart / flux: always, wds by default)")
    p.add_argument("--samples", type=int, help="samples per model for the scores (pixart / flux: per prompt)")
    p.add_argument("--sample-steps", type=int, help="sampler steps")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale")
    p.add_argument("--nproc", type=int, default=0,
                   help="training processes (DDP ranks); default one per CPU core up to 2, or 1 with a GPU")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (training ranks, sampling, timing); default 1")
    p.add_argument("--peft", default="", metavar="lora,tdlora",
                   help="also distil each student with LoRA and/or TD-LoRA adapters on its frozen base (compared "
                        "with its full fine-tune: trainable parameters, accuracy)")
    p.add_argument("--ablations", action="store_true",
                   help="pixart / flux: also the ablation stages (cross-attention routing, RoPE in linear attention, "
                        "DyFLUX's single-block skip, feature KD), in the same report")
    p.add_argument("--strict", action="store_true", help="exit 1 when a quality bar is not met")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides for every training stage")
    a = p.parse_args(argv)
    try:
        opts = Options(out=a.out, quick=a.quick, data=a.data, overrides=list(a.overrides), nproc=a.nproc,
                       threads=a.threads, peft=tuple(m for m in a.peft.split(",") if m), family=a.family,
                       ablations=a.ablations)
    except ValueError as e:
        p.error(str(e))
    samples = "samples" if opts.family == "dit" else "per_prompt"
    for field, value in ((samples, a.samples), ("steps", a.sample_steps), ("cfg_scale", a.cfg_scale)):
        if value is not None:
            opts.eval = replace(opts.eval, **{field: value})
    return opts, a.strict


def main(argv: list[str] | None = None) -> int:
    import time

    t0 = time.perf_counter()
    opts, strict = parse(argv)
    from trainer.config import ConfigError
    from trainer.quickstart import QuickstartError, run
    from trainer.quickstart_report import table
    from trainer.quickstart_t2i_report import table as t2i_table

    try:
        report = run(opts)
    except (ConfigError, QuickstartError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(t2i_table(report) if opts.suite.t2i else table(report))
    failed = [k for k, ok in report["bars"].items() if not ok]
    print(f"\nbars: {'all met' if not failed else 'NOT met: ' + ', '.join(failed)}"
          f"{' (a --quick run is too small to meet them)' if opts.quick and failed else ''}")
    print(f"report: {opts.out / 'report.md'}; total {time.perf_counter() - t0:.0f}s")
    return 1 if strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
