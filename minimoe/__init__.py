"""minimoe: sparse Mixture-of-Experts and dense Transformers, small enough to train and measure on a laptop CPU."""
from .config import ModelConfig
from .model import MiniLM, ModelOutput

__version__ = "0.1.0"
__all__ = ["ModelConfig", "MiniLM", "ModelOutput", "__version__"]
