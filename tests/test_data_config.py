"""DataConfig: a structured config the trainer can embed, and clear errors for bad values."""
import pytest
from omegaconf import OmegaConf

from data import DataConfig, build_loader


def test_defaults_validate_and_work_as_structured_config():
    DataConfig().validate()
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.from_dotlist(["batch_size=32", "format=wds", "path=/x"]))
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, DataConfig) and obj.batch_size == 32 and obj.path == "/x"
    obj.validate()
    aug = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.from_dotlist(["flip=true", "sample_latent=null"])))
    assert aug.flip is True and aug.sample_latent is None
    with pytest.raises(Exception):  # typed: OmegaConf refuses a string for an int field
        OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.from_dotlist(["batch_size=many"]))


@pytest.mark.parametrize("overrides, key, value", [
    ({"format": "tfrecord"}, "format", "tfrecord"),
    ({"input": "video"}, "input", "video"),
    ({"cond": "audio"}, "cond", "audio"),
    ({"format": "wds"}, "path", None),
    ({"path": "/data/x"}, "path", "/data/x"),
    ({"input": "latent"}, "input", "latent"),
    ({"cond": "text_emb"}, "cond", "text_emb"),
    ({"buckets": True}, "buckets", True),
    ({"batch_size": 0}, "batch_size", 0),
    ({"num_workers": -1}, "num_workers", -1),
    ({"shuffle_window": 0}, "shuffle_window", 0),
    ({"image_size": 0}, "image_size", 0),
    ({"max_skipped_fraction": 1.5}, "max_skipped_fraction", 1.5),
    ({"seed": -3}, "seed", -3),
    ({"format": "mds", "path": "/x", "buckets": True, "image_size": 100}, "image_size", 100),
    ({"flip": "yes"}, "flip", "yes"),
    ({"format": "mds", "path": "/x", "sample_latent": True}, "sample_latent", True),
    ({"sample_latent": True}, "sample_latent", True),
])
def test_validate_names_key_value_and_what_is_allowed(overrides, key, value):
    with pytest.raises(ValueError) as e:
        DataConfig(**overrides).validate()
    msg = str(e.value)
    assert f"data.{key}" in msg and (repr(value) in msg or value is None)
    assert "allowed" in msg or "required" in msg or "remove" in msg


def test_build_loader_validates_first():
    with pytest.raises(ValueError, match="data.batch_size"):
        build_loader(DataConfig(batch_size=0), 0, 1)
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        build_loader(DataConfig(), 2, 2)
