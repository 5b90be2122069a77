"""SparseVLM Explorer engine: text-guided visual token pruning inside Hugging Face LLaVA models."""

from .config import PruneConfig
from .errors import ConfigError, InputError, ModelLoadError, SparseVLMError
from .trace import PruneTrace

__all__ = ["PruneConfig", "PruneTrace", "ConfigError", "InputError", "ModelLoadError", "SparseVLMError"]
