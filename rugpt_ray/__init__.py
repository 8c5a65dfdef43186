"""rugpt-ray: train, tune and serve the ruGPT3 family (dense and block-sparse) on Ray.

The public names load on first use, so `import rugpt_ray.data` (in every Ray worker) does not pay for torch.
"""

from importlib import import_module

_EXPORTS = {
    "GPT": "rugpt_ray.model",
    "PRESETS": "rugpt_ray.config",
    "ModelConfig": "rugpt_ray.config",
    "preset": "rugpt_ray.config",
    "GenerationConfig": "rugpt_ray.generation",
    "generate": "rugpt_ray.generation",
    "stream": "rugpt_ray.generation",
    "export_hf": "rugpt_ray.checkpoints",
    "load_model": "rugpt_ray.checkpoints",
    "save_native": "rugpt_ray.checkpoints",
    "make_layout": "rugpt_ray.sparsity",
    "load_tokenizer": "rugpt_ray.tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rugpt_ray' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
