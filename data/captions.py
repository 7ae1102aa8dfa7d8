"""The text-to-image test bed: the bundled digits captioned from sentence templates.

Each digit image gets a caption from one of several templates ("a handwritten seven", "the digit 7",
"7, drawn with a thick pen", …). Some templates are held out of training: the shards only ever
hold the training templates, and `prompts.jsonl` beside the shards lists every (template, digit)
prompt with its split, so an evaluation can score prompt accuracy on seen and on held-out sentence
frames. Every digit word and every numeral appears in the training templates, so a held-out prompt
asks for a known digit in an unseen sentence: the task tests the conditioning path's generalisation,
not vocabulary it never saw.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from data.sources import Source, SourceItem, digits_pixels, png_bytes

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPTS = "prompts.jsonl"  # beside the shards: every (template, digit) prompt, held-out ones marked


@dataclass(frozen=True)
class Template:
    id: int
    text: str  # `{word}` → "seven", `{num}` → "7"
    held_out: bool

    def caption(self, digit: int) -> str:
        return self.text.format(word=DIGIT_WORDS[digit], num=digit)


# Training frames use both the word and the numeral; held-out frames use both as well, so neither
# form of a digit is new at scoring time, only the sentence around it. No frame contains a digit word
# or numeral of its own (even inside a word: a byte-level encoder sees "someone" as "some" + "one").
TEMPLATES = tuple(Template(i, text, held) for i, (text, held) in enumerate((
    ("a handwritten {word}", False),
    ("the digit {num}", False),
    ("{num}, drawn with a thick pen", False),
    ("a picture of the number {word}", False),
    ("the number {word}, written by hand", False),
    ("a scan of the digit {num}", False),
    ("{word}", False),
    ("{num} on a grey background", False),
    ("a small sketch of the number {num}", True),
    ("somebody wrote {word} here", True),  # not "someone": its bytes hold "one", a second digit word
    ("{word}, in pencil", True),
    # more training frames (appended: the held-out ids stay 8-10): each form of a digit also at the start
    # and in the middle of a sentence, before a space, so no held-out position is new, only its words
    ("{word} written in black ink", False),
    ("i can see a {num} in this image", False),
    ("a neat {word} on white paper", False),
    ("my lucky number is {num}", False),
    ("there is a {word} at the top", False),
    ("{num} again, but larger", False),
)))
TRAIN_TEMPLATES = tuple(t for t in TEMPLATES if not t.held_out)
HELD_OUT_TEMPLATES = tuple(t for t in TEMPLATES if t.held_out)


def digits_captions_source(captions_per_image: int = 1, seed: int = 0) -> Source:
    """Every digit image with `captions_per_image` distinct training templates (a seeded choice).

    Keys are `{index:05d}-{template:02d}`, so each (image, caption) pair is its own sample; `cls`
    stays the digit (for scoring), `json` records the template id and the image index.
    """
    if not 1 <= captions_per_image <= len(TRAIN_TEMPLATES):
        raise ValueError(f"captions per image {captions_per_image} is not allowed: between 1 and the "
                         f"{len(TRAIN_TEMPLATES)} training templates")
    pixels, labels = digits_pixels()
    rng = np.random.default_rng(seed)
    items = []
    for i, label in enumerate(labels.tolist()):
        for t in rng.choice(len(TRAIN_TEMPLATES), size=captions_per_image, replace=False).tolist():
            template = TRAIN_TEMPLATES[t]

            def load(i: int = i, label: int = label, template: Template = template) -> dict[str, Any]:
                return {"image": png_bytes(pixels[i]), "cls": label, "caption": template.caption(label),
                        "json": {"source": "sklearn-digits", "index": i, "template": template.id,
                                 "original_size": [8, 8], "aspect_ratio": 1.0}}

            items.append(SourceItem(f"{i:05d}-{template.id:02d}", load, f"digits[{i}] template {template.id}"))
    return Source("digits-captions", items, channels=1, classes=[str(d) for d in range(10)])


def prompt_rows() -> list[dict[str, Any]]:
    """Every (template, digit) prompt, in template then digit order."""
    return [{"prompt": t.caption(d), "digit": d, "template": t.id, "held_out": t.held_out}
            for t in TEMPLATES for d in range(10)]


def write_prompts(directory: str, rows: Optional[list[dict[str, Any]]] = None) -> str:
    """`prompts.jsonl` (one JSON object a line: prompt, digit, template, held_out), written atomically."""
    path = os.path.join(directory, PROMPTS)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        for row in prompt_rows() if rows is None else rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_prompts(directory: str) -> Optional[list[dict[str, Any]]]:
    """The rows of `prompts.jsonl` in `directory`, or None when there is none."""
    path = os.path.join(directory, PROMPTS)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
