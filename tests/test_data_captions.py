"""The captioned-digits test bed and the tiny text encoders: held-out templates never reach the training
shards, every digit word is seen in training, prompts.jsonl lists both splits, and the encoders are
deterministic for a seed and load offline."""
import os

import pytest
import torch

from data import DataConfig, build_loader
from data.captions import DIGIT_WORDS, HELD_OUT_TEMPLATES, TEMPLATES, TRAIN_TEMPLATES, digits_captions_source, read_prompts
from data.manifest import read_manifest
from data.sources import digits_arrays
from launch import make_shards, tiny_encoders
from tests.data_helpers import take


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("captions") / "wds")
    assert make_shards.main(["--source", "digits-captions", "--captions-per-image", "3", "--format", "wds", "--out", out,
                             "--samples-per-shard", "2000"]) == 0
    return out


def test_held_out_templates_are_absent_from_the_training_shards(captioned):
    m = read_manifest(captioned)
    assert m.source == "digits-captions" and m.samples == 3 * 1797 and "cls" in m.fields
    loader = build_loader(DataConfig(format="wds", path=captioned, cond="caption", batch_size=599, shuffle=False), 0, 1)
    samples = [(k, c, int(y), x) for b in take(loader, 9) for k, c, y, x in zip(b["key"], b["caption"], b["y"], b["x"])]
    assert len({k for k, *_ in samples}) == 3 * 1797  # every (image, template) pair once
    held_out = {t.caption(d) for t in HELD_OUT_TEMPLATES for d in range(10)}
    captions = {c for _, c, _, _ in samples}
    assert not captions & held_out
    for key, caption, label, _ in samples:  # each caption is its key's training template applied to its own digit
        template = TEMPLATES[int(key.split("-")[1])]
        assert not template.held_out and caption == template.caption(label)
    text = " ".join(captions).replace(",", " ").split()
    assert all(w in text for w in DIGIT_WORDS) and all(str(d) in text for d in range(10))  # words and numerals both seen
    assert {int(k.split("-")[1]) for k, *_ in samples} == {t.id for t in TRAIN_TEMPLATES}  # every training frame is used
    x = digits_arrays()[0]
    assert all(torch.equal(xi, torch.from_numpy(x[int(k[:5])])) for k, _, _, xi in samples[:50])  # `cls` still scores the image


def test_prompts_file_lists_every_template_and_digit_with_its_split(captioned):
    rows = read_prompts(captioned)
    assert len(rows) == len(TEMPLATES) * 10 and {(r["template"], r["digit"]) for r in rows} == {(t.id, d) for t in TEMPLATES for d in range(10)}
    assert {r["template"] for r in rows if r["held_out"]} == {t.id for t in HELD_OUT_TEMPLATES} and len(HELD_OUT_TEMPLATES) >= 2
    assert {r["prompt"] for r in rows if r["digit"] == 7 and r["template"] in (0, 1, 2)} == {
        "a handwritten seven", "the digit 7", "7, drawn with a thick pen"}
    # held-out frames still name their digit by a word or a numeral seen in training
    assert all(DIGIT_WORDS[r["digit"]] in r["prompt"] or str(r["digit"]) in r["prompt"] for r in rows)
    n = len(TRAIN_TEMPLATES)
    with pytest.raises(ValueError, match=f"captions per image {n + 1}"):
        digits_captions_source(captions_per_image=n + 1)


def test_tiny_encoders_are_deterministic_for_a_seed_and_load_offline(tmp_path, capsys):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert tiny_encoders.main(["--out", str(tmp_path / name), "--seed", str(seed), "--dim", "16", "--clip-dim", "24"]) == 0
    assert "CLIP text encoder" in capsys.readouterr().out

    def weights(name, sub):
        with open(tmp_path / name / sub / "model.safetensors", "rb") as f:
            return f.read()

    assert weights("a", "t5") == weights("b", "t5") and weights("a", "clip") == weights("b", "clip")
    assert weights("a", "t5") != weights("c", "t5") and weights("a", "clip") != weights("c", "clip")
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    t5 = T5EncoderModel.from_pretrained(str(tmp_path / "a" / "t5"), local_files_only=True)
    clip = CLIPTextModel.from_pretrained(str(tmp_path / "a" / "clip"), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "a" / "clip"), local_files_only=True)
    assert type(tok).__name__ == "ByT5Tokenizer" and sorted(os.listdir(tmp_path / "a" / "t5")).count("spiece.model") == 0
    assert t5.config.d_model == 16 and clip.config.hidden_size == 24
    assert clip.config.eos_token_id == tok.eos_token_id == 1 and clip.config.vocab_size >= len(tok) == 384
    ids = tok(["a handwritten seven"], max_length=77, padding="max_length", return_tensors="pt")["input_ids"]
    out = clip(input_ids=ids)
    assert torch.equal(out.pooler_output[0], out.last_hidden_state[0, len("a handwritten seven")])  # pooled at </s>


def test_no_template_names_a_digit_besides_its_placeholder():
    """A frame holding a digit word or numeral, even inside a word ("someone" holds "one"), names two
    digits to a byte-level encoder: the prompt would be ambiguous and its score meaningless."""
    for t in TEMPLATES:
        frame = t.text.replace("{word}", "").replace("{num}", "")
        assert not [w for w in DIGIT_WORDS if w in frame] and not any(c.isdigit() for c in frame), t.text
        for d in range(10):  # nor across the placeholder's edges ("a neat one on" must not read "eon", "one on"...)
            caption = t.caption(d)
            named = {i for i, w in enumerate(DIGIT_WORDS) if w in caption} | {int(c) for c in caption if c.isdigit()}
            assert named == {d}, caption
