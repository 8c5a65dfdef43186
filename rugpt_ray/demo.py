"""`make demo`: build the tiny sparse preset, save it, generate Russian text and measure perplexity.

Training arrives with the trainer; until then the model is freshly initialised, so the text is noise and
the perplexity is about the vocabulary size — the point is that every piece runs end to end on a CPU.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from rugpt_ray.checkpoints import load_model, save_native
from rugpt_ray.cli import default_data_dir
from rugpt_ray.config import preset
from rugpt_ray.evaluation import join_documents, perplexity
from rugpt_ray.generation import GenerationConfig, generate
from rugpt_ray.model import GPT
from rugpt_ray.tokenizer import load_tokenizer

PROMPT = "Александр Сергеевич Пушкин родился в"


def main() -> int:
    data = default_data_dir()
    run = Path(os.environ.get("RUGPT_RUNS", "runs")) / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    tokenizer = load_tokenizer(data / "tokenizer")
    torch.manual_seed(0)
    model_dir = save_native(GPT(preset("tiny")), run / "model")
    model = load_model(model_dir)
    cfg = model.config
    print(f"model: preset tiny, {model.num_params():,} parameters, layers {cfg.n_layer} "
          f"(sparse: {[i for i in range(cfg.n_layer) if cfg.is_sparse_layer(i)]}), saved to {model_dir}")

    out = generate(model, tokenizer, PROMPT, GenerationConfig(max_new_tokens=24, temperature=0.9, top_k=50, seed=1))
    print(f"generate: {PROMPT}{out[0].text}")

    valid = sorted((data / "corpus" / "valid").glob("*.txt"))
    documents = tokenizer.encode_batch([p.read_text(encoding="utf-8") for p in valid])
    result = perplexity(model, join_documents(documents, tokenizer.eos_id), seq_len=256)
    print(f"evaluate on corpus/valid: {result.describe()}")
    print(f"\nthe same from the CLI:\n  rugpt-ray generate --model {model_dir} --prompt '{PROMPT}'\n"
          f"  rugpt-ray evaluate --model {model_dir} --data {data / 'corpus' / 'valid'} --seq-len 256\n"
          f"  rugpt-ray info {model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
