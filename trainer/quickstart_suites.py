"""What each quickstart family trains: its stages, their teachers, its configs, its text test bed.

The quickstart's machinery (`trainer.quickstart`: stage keys, reuse, DDP launch, export, scoring,
timing, the report) is the same for every family; a `Suite` says what differs:

- `dit`    (the default) class-conditional digits: a DiT teacher, LiT / DyDiT / DyLiT students.
- `pixart` captioned digits (`data.captions`): a PixArt-style teacher (learned-σ Gaussian, T5
           cross-attention), LiT / DyDiT / DyLiT students of it.
- `flux`   captioned digits: a FLUX-style teacher (rectified flow, T5 tokens in joint attention, CLIP
           pooled vector) trained with caption dropout, then guidance-distilled into a model with a
           guidance input (`guided`, as FLUX-dev was made), DyFLUX and LiT-FLUX students of that one.

Every stage is `configs/quickstart[/<family>]/<recipe>.yaml`, runnable by hand with `launch.train`.
A T2I family's data always goes through the cluster path: `launch.make_shards --source
digits-captions` → `launch.precompute` with tiny random T5 (and CLIP) encoders → text-embedding shards.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import configs

QUICKSTART_CONFIGS = Path(configs.__file__).parent / "quickstart"


@dataclass(frozen=True)
class TextBed:
    """The captioned-digits shards and the tiny random text encoders that embed them."""

    t5_dim: int  # T5 width = the model's caption / context channels
    t5_layers: int
    t5_heads: int
    t5_head_dim: int
    t5_ff_dim: int
    max_length: int  # T5 tokens (ByT5 bytes: the longest caption is 34 with its end token)
    mask: bool  # PixArt runs T5 with its mask and keeps it; FLUX encodes the pads and attends to them
    clip_dim: int | None = None  # FLUX's pooled vector (CLIPTextModel), None: no CLIP
    local_bias: float | None = None  # T5 attends locally (data.tiny_encoders): word-like byte features
    output_gain: float = 1.0  # T5's final RMSNorm gain: the embeddings' scale (data.tiny_encoders)
    captions_per_image: int = 4  # distinct training templates per digit image (each pair one sample)
    seed: int = 0


@dataclass(frozen=True)
class Ablation:
    """A stage that is another stage's recipe with a few overrides (run with --ablations)."""

    base: str  # the recipe it varies
    overrides: tuple[str, ...]
    why: str


@dataclass(frozen=True)
class Suite:
    family: str
    config_dir: Path
    stages: tuple[str, ...]  # training stages, in order (each a config `<recipe>.yaml`)
    teacher_of: dict[str, str]  # stage → the stage whose exported EMA is its teacher (none: from scratch)
    reference: str  # the teacher the students' bars compare with
    students: tuple[str, ...]
    quick: tuple[str, ...]  # --quick overrides of every stage
    quick_dynamic: tuple[str, ...] = ("dynamic.warmup_steps=4", "dynamic.hold_steps=0")
    ablations: dict[str, Ablation] = field(default_factory=dict)  # --ablations: stage → what it varies
    text: TextBed | None = None
    guided: bool = False  # the students' teacher was guidance-distilled from a base teacher (FLUX-dev's way)

    @property
    def t2i(self) -> bool:
        return self.text is not None

    def base(self, stage: str) -> str:
        """The recipe (config file) of a stage: its own, or the one an ablation varies."""
        return self.ablations[stage].base if stage in self.ablations else stage

    def config_path(self, stage: str) -> Path:
        return self.config_dir / f"{self.base(stage)}.yaml"

    def extra_overrides(self, stage: str) -> list[str]:
        return list(self.ablations[stage].overrides) if stage in self.ablations else []

    def teacher(self, stage: str) -> str | None:
        return self.teacher_of.get(self.base(stage))

    def is_dynamic(self, stage: str) -> bool:
        return self.base(stage).startswith("dy")


DIT = Suite(
    family="dit", config_dir=QUICKSTART_CONFIGS, stages=("teacher", "lit", "dydit", "dylit"),
    teacher_of={"lit": "teacher", "dydit": "teacher", "dylit": "teacher"}, reference="teacher",
    students=("lit", "dydit", "dylit"),
    quick=("student.args.depth=2", "student.args.hidden_size=32", "train.steps=6", "train.global_batch=32",
           "train.log_every=3", "checkpoint.every=3", "optim.warmup_steps=0"),
)

# feature KD taps (fnmatch over module names; `?` = one digit, so a block and not its sub-layers)
PIXART_FEATURES = "[blocks.?]"
FLUX_FEATURES = "[double_blocks.?,single_blocks.?]"
_T2I_QUICK = ("train.steps=6", "train.global_batch=16", "train.log_every=3", "checkpoint.every=3",
              "optim.warmup_steps=0")

PIXART = Suite(
    family="pixart", config_dir=QUICKSTART_CONFIGS / "pixart", stages=("teacher", "lit", "dydit", "dylit"),
    teacher_of={"lit": "teacher", "dydit": "teacher", "dylit": "teacher"},
    reference="teacher", students=("lit", "dydit", "dylit"),
    quick=("student.args.depth=2", "student.args.hidden_size=32", "student.args.num_heads=2", *_T2I_QUICK),
    ablations={
        "dydit-xattn": Ablation("dydit", ("student.args.cross_attn_routing=true",),
                                "DyDiT with its cross-attention heads routed too (cross_attn_routing=true)"),
        **{f"{st}-fkd": Ablation(st, (f"distill.features={PIXART_FEATURES}", "distill.feature_weight=0.5"),
                                 "feature KD: every block's output regresses the teacher's") for st in ("lit", "dydit", "dylit")},
    },
    # T5 attends locally (word-like byte features): PixArt has no text-side layers of its own, so with
    # T5's random global bias every byte's feature is its byte plus the sentence's mean, and the
    # cross-attention can only memorise whole sentences (held-out 0.50 at best, see README)
    text=TextBed(t5_dim=256, t5_layers=3, t5_heads=2, t5_head_dim=16, t5_ff_dim=64, max_length=40, mask=True,
                 local_bias=1.0),
)

FLUX = Suite(
    family="flux", config_dir=QUICKSTART_CONFIGS / "flux", stages=("teacher", "guided", "dyflux", "lit-flux"),
    teacher_of={"guided": "teacher", "dyflux": "guided", "lit-flux": "guided"},
    reference="guided", students=("dyflux", "lit-flux"),
    quick=("student.args.depth=1", "student.args.depth_single=1", "student.args.hidden_size=32",
           "student.args.num_heads=2", "student.args.axes_dim=[4,6,6]", *_T2I_QUICK),
    ablations={
        "lit-flux-norope": Ablation("lit-flux", ("student.args.linear_rope=false",),
                                    "LiT-FLUX without RoPE in its linear attention (linear_rope=false)"),
        "dyflux-mlpskip": Ablation("dyflux", ("student.args.single_token_skip=mlp",),
                                   "DyFLUX single blocks skip only the MLP share for unrouted image tokens "
                                   "(single_token_skip=mlp; default: the whole fused output, as released)"),
        **{f"{st}-fkd": Ablation(st, (f"distill.features={FLUX_FEATURES}", "distill.feature_weight=0.5"),
                                 "feature KD: every block's output regresses the teacher's") for st in ("dyflux", "lit-flux")},
        "dyflux-tdlora": Ablation("dyflux", ("peft.method=tdlora", "peft.rank=8", "peft.alpha=16", "peft.experts=4"),
                                  "DyFLUX with TD-LoRA adapters on its frozen inherited base (rank 8, 4 experts; "
                                  "routers train fully), against its full fine-tune"),
    },
    text=TextBed(t5_dim=256, t5_layers=3, t5_heads=2, t5_head_dim=16, t5_ff_dim=64, max_length=36, mask=False,
                 clip_dim=256, local_bias=1.0),
    guided=True,
)

SUITES = {s.family: s for s in (DIT, PIXART, FLUX)}


def suite(family: str) -> Suite:
    if family not in SUITES:
        raise ValueError(f"family={family!r} is not one of {tuple(SUITES)}")
    return SUITES[family]
