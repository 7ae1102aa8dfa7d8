"""DiTill models: the DiT family (teacher and students), diffusion objectives, losses, FLOPs."""
from models.config import DiTConfig
from models.convert import load_pretrained
from models.dit import DiT
from models.registry import build_model, family_of, model_config, model_names

__all__ = ["DiT", "DiTConfig", "build_model", "family_of", "load_pretrained", "model_config", "model_names"]
