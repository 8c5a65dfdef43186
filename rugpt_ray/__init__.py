"""rugpt-ray: train, tune and serve the ruGPT3 family (dense and block-sparse) on Ray."""

from rugpt_ray.checkpoints import export_hf, load_model, save_native
from rugpt_ray.config import PRESETS, ModelConfig, preset
from rugpt_ray.generation import GenerationConfig, generate, stream
from rugpt_ray.model import GPT
from rugpt_ray.sparsity import make_layout
from rugpt_ray.tokenizer import load_tokenizer

__all__ = [
    "GPT", "PRESETS", "GenerationConfig", "ModelConfig", "export_hf", "generate", "load_model", "load_tokenizer",
    "make_layout", "preset", "save_native", "stream",
]
