"""The FID Inception as `launch.evaluate` loads it: local weights only, torch-fidelity's network,
the sFID tap, and the clear errors when the weights are missing or wrong.

The real pt_inception-2015-12-05 weights cannot be here, so a random-weight network of the same
layout is saved to a file and loaded through the same path. pytorch-fid's own FID Inception (its
independent port of the same TF graph) is the reference: fed the same weights, it must give the
same pool_3 features and the same Mixed_6d.branch1x1 maps.
"""
import numpy as np
import pytest
import torch

from tests.metrics_helpers import random_inception_state
from trainer.metrics.inception import (
    ENV,
    SPATIAL_DIM,
    WEIGHTS_FILE,
    InceptionFeatures,
    InceptionWeightsError,
    find_weights,
)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    state = random_inception_state(seed=0)
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def net(weights):
    return InceptionFeatures(weights[0])


def _pytorch_fid_model(state, monkeypatch):
    import pytorch_fid.inception as pfi

    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: state)
    return pfi.InceptionV3([3], resize_input=False, normalize_input=True, use_fid_inception=True).eval()


def test_features_match_pytorch_fids_fid_inception_with_the_same_weights(weights, net, monkeypatch):
    _, state = weights
    assert not net.standard and len(net.digest) == 64
    images = np.random.default_rng(0).integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
    ours = net(images)
    assert ours["pool"].shape == (2, 2048) and ours["logits"].shape == (2, 1008) and ours["spatial"].shape == (2, SPATIAL_DIM)

    ref = _pytorch_fid_model(state, monkeypatch)
    # 299² needs no resize; pytorch-fid maps [0, 1] by 2x − 1, torch-fidelity maps uint8 u by (u − 128)/128,
    # so feeding u / 256 gives both networks the same input exactly
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double().div(256).float().contiguous()
    with torch.no_grad():
        pool = ref(x)[0].flatten(1).numpy()
        h = 2 * x - 1
        for block in ref.blocks[:2]:
            h = block(h)
        for mixed in ref.blocks[2][:6]:  # Mixed_5b … Mixed_6c
            h = mixed(h)
        branch = ref.blocks[2][6].branch1x1(h)  # Mixed_6d.branch1x1 = TF mixed_6/conv
    spatial = branch[:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy()
    # the same float32 ops on contiguous NCHW input: measured max |Δ| = 0 here. 1e-4 of the largest value
    # is headroom for other conv kernels (a channels-last input moved it by 4.3e-5), far below what a
    # wrong layer, channel subset or flattening order gives (O(1))
    scale = np.abs(pool).max()
    np.testing.assert_allclose(ours["pool"], pool, atol=1e-4 * scale, rtol=0)
    np.testing.assert_allclose(ours["spatial"], spatial, atol=1e-4 * np.abs(spatial).max(), rtol=0)
    logits = pool @ state["fc.weight"].numpy().T  # bias-free, as ADM's softmax input
    np.testing.assert_allclose(ours["logits"], logits, atol=1e-4 * np.abs(logits).max(), rtol=0)
    assert np.abs(ours["spatial"]).max() > 0 and np.abs(ours["pool"]).std() > 0


def test_images_of_any_size_are_resized_and_chunks_are_independent(net):
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    whole = net(images)
    parts = [net(images[:1]), net(images[1:])]
    for key in ("pool", "logits", "spatial"):
        joined = np.concatenate([p[key] for p in parts])
        np.testing.assert_allclose(whole[key], joined, rtol=1e-4, atol=1e-4 * np.abs(whole[key]).max())
    assert not np.allclose(whole["pool"][0], whole["pool"][1])


def test_missing_weights_name_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(InceptionWeightsError) as e:
        find_weights(None)
    msg = str(e.value)
    assert WEIGHTS_FILE in msg and str(tmp_path / "torch" / "hub" / "checkpoints") in msg and "--inception" in msg
    assert "Nothing is downloaded" in msg
    with pytest.raises(InceptionWeightsError, match="do not exist"):
        find_weights(tmp_path / "nope.pth")


def test_weights_are_found_through_the_environment_and_torch_hub(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / WEIGHTS_FILE).write_bytes(b"x")
    assert find_weights(None) == hub / WEIGHTS_FILE
    other = tmp_path / "mine.pth"
    other.write_bytes(b"x")
    monkeypatch.setenv(ENV, str(other))
    assert find_weights(None) == other


def test_a_file_that_is_not_the_fid_inception_is_refused(tmp_path):
    from torchvision.models import inception_v3

    wrong = tmp_path / "imagenet_inception.pth"
    torch.save(inception_v3(weights=None, aux_logits=False, init_weights=False).state_dict(), wrong)
    with pytest.raises(InceptionWeightsError, match="1000 classes"):
        InceptionFeatures(wrong)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InceptionWeightsError, match="not a readable PyTorch state dict"):
        InceptionFeatures(junk)
