"""CLIP score with local open_clip weights: a tiny random open_clip model saved in open_clip's hub
layout stands in for ViT-L/14. The reference is open_clip's own forward (`model(image, text)`, which
normalises both towers' features itself) on the model's own preprocessing."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from launch.evaluate import main
from tests.metrics_helpers import save_tiny_clip
from trainer.metrics.clip import ClipScorer, ClipWeightsError, clip_score, read_prompts

PROMPTS = ["a red square", "a photo of a cat", "two dogs on grass"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(str(tmp_path_factory.mktemp("clip") / "tiny-clip"))


def _reference_cosines(directory: str, images: np.ndarray, texts: list[str]) -> np.ndarray:
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{directory}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{directory}")
    with torch.no_grad():
        x = torch.stack([preprocess(Image.fromarray(im)) for im in images])
        img, txt, _ = model.eval()(x, tokenizer(texts))
    return (img * txt).sum(-1).numpy()


def test_clip_score_is_open_clips_cosine_paired_by_prompt(tmp_path, clip_dir):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 40, 48, 3), dtype=np.uint8)  # not square, not the model's size
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    captions = read_prompts(str(tmp_path / "prompts.txt"), images_per_prompt=2)
    assert captions == [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1], PROMPTS[2], PROMPTS[2]]

    scorer = ClipScorer(clip_dir)
    got = clip_score(iter([images[:4], images[4:]]), captions, scorer)
    cos = _reference_cosines(clip_dir, images, captions).astype(np.float64)
    assert got["clip_cosine"] == pytest.approx(cos.mean(), abs=1e-6)  # float32 embeddings of unit norm
    assert got["clip_score"] == pytest.approx(100 * np.clip(cos, 0, None).mean(), abs=1e-4)
    shuffled = clip_score(iter([images]), captions[::-1], scorer)
    assert shuffled["clip_cosine"] != pytest.approx(got["clip_cosine"], abs=1e-6)  # the pairing matters

    np.savez(tmp_path / "samples.npz", arr_0=images)
    out = tmp_path / "clip.json"
    assert main([str(tmp_path / "samples.npz"), "--metrics", "clip", "--clip-model", clip_dir, "--prompts",
                 str(tmp_path / "prompts.txt"), "--images-per-prompt", "2", "--batch-size", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["metrics"]["clip_score"] == pytest.approx(got["clip_score"], abs=1e-5)
    assert result["clip"]["model"] == f"local-dir:{clip_dir}"


def test_captions_stored_with_the_samples_are_used(tmp_path, clip_dir):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=images, captions=np.array(PROMPTS))
    out = tmp_path / "clip.json"
    assert main([str(tmp_path / "samples.npz"), "--metrics", "clip", "--clip-model", clip_dir, "--out", str(out)]) == 0
    cos = _reference_cosines(clip_dir, images, PROMPTS)
    assert json.loads(out.read_text())["metrics"]["clip_cosine"] == pytest.approx(float(cos.mean()), abs=1e-6)


def test_missing_clip_weights_are_clear_errors(tmp_path, capsys):
    with pytest.raises(ClipWeightsError, match="Nothing is downloaded"):
        ClipScorer("ViT-B-32", None)
    with pytest.raises(ClipWeightsError, match="does not exist"):
        ClipScorer("ViT-B-32", str(tmp_path / "nope.bin"))
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "open_clip_config.json").write_text("{}")
    with pytest.raises(ClipWeightsError, match="no weights file"):
        ClipScorer(str(empty))
    with pytest.raises(ClipWeightsError, match="neither a local directory nor an open_clip architecture"):
        ClipScorer("not-a-clip")
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    assert main([str(tmp_path / "s.npz"), "--metrics", "clip", "--clip-model", str(empty)]) == 2
    assert "no weights file" in capsys.readouterr().err
