"""DiTill models: model families (teacher and students), diffusion objectives, losses, FLOPs.

The trainer speaks to `models.family` (the protocol) and `models.registry` (names → configs and
modules); each family's own classes stay behind them.
"""
from models.convert import load_pretrained
from models.family import ModelFamily, family_of, get_family, register_family
from models.registry import build_model, model_config, model_names, student_kind

__all__ = ["ModelFamily", "build_model", "family_of", "get_family", "load_pretrained", "model_config", "model_names",
           "register_family", "student_kind"]
