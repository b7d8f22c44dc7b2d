"""mim: masked image modeling (MAE, BEiT family) on timm Vision Transformers."""

from mim.config import ConfigError, load_config
from mim.inference import load_model
from mim.methods import build_pretrainer

__version__ = "0.1.0"
__all__ = ["ConfigError", "__version__", "build_pretrainer", "load_config", "load_model"]
