"""`make demo`: train the tiny sparse preset on the shared corpus with Ray Train + DeepSpeed (2 CPU workers),
print validation perplexity before and after, generate a Russian continuation, and draw the loss plot.

    python -m rugpt_ray.demo [RECIPE] [key=value ...]      (default recipe: jobs/configs/tiny-cpu.yaml)
"""

from __future__ import annotations

import glob
import os
import sys
import time
from pathlib import Path

import torch
import yaml

from rugpt_ray.checkpoints import load_model
from rugpt_ray.config import ModelConfig, check_train_config, default_tokenizer, load_train_config
from rugpt_ray.data import iter_documents, resolve_inputs
from rugpt_ray.evaluation import join_documents, perplexity
from rugpt_ray.generation import GenerationConfig, generate
from rugpt_ray.model import GPT
from rugpt_ray.plotting import plot_run
from rugpt_ray.ray_start import ray_connection
from rugpt_ray.tokenizer import load_tokenizer
from rugpt_ray.train import train

PROMPT = "Александр Сергеевич Пушкин родился в"
SERVE_CONFIG = Path("serve_configs/local.yaml")


def main(argv: list[str]) -> int:
    recipe = argv[0] if argv and "=" not in argv[0] else "jobs/configs/tiny-cpu.yaml"
    overrides = [a for a in argv if "=" in a]
    cfg = load_train_config(recipe, [f"name=demo-{time.strftime('%Y%m%d-%H%M%S')}", *overrides])
    plan = check_train_config(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer or default_tokenizer())
    valid = join_documents(tokenizer.encode_batch([d.text for d in iter_documents(resolve_inputs(cfg.valid_data))]),
                           tokenizer.eos_id)

    torch.manual_seed(cfg.seed)  # the trainer's initial weights
    before = perplexity(GPT(ModelConfig.from_dict(plan.model)), valid, cfg.seq_len)
    print(f"before training, corpus/valid {before.describe()}", flush=True)

    started = time.perf_counter()
    with ray_connection():  # Ray's last worker lines land before ours, not after the run folder
        result = train(plan)
    model = load_model(result.run_dir)
    after = perplexity(model, valid, cfg.seq_len)
    print(f"\ntrained {cfg.max_steps} steps on {cfg.num_workers} workers in {time.perf_counter() - started:.0f} s")
    print(f"after training, corpus/valid {after.describe()}")
    print(f"validation perplexity {before.ppl:.0f} -> {after.ppl:.0f} ({before.ppl / after.ppl:.0f}x lower)")
    out = generate(model, tokenizer, PROMPT, GenerationConfig(max_new_tokens=40, temperature=0.8, top_k=40, seed=1))
    print(f"generate: {PROMPT}{out[0].text}")
    print(f"loss plot: {plot_run(result.run_dir)}")
    print(f"\nnext: rugpt-ray generate --model {result.run_dir} --prompt '{PROMPT}'\n"
          f"      rugpt-ray export {result.run_dir} exported --to native")
    print(playground_hint(result.run_dir))
    print(result.run_dir)
    return 0


def playground_hint(run_dir: str) -> str:
    """How to try the trained model in the browser: serve it with the local Serve config (which serves the newest
    runs/demo-* unless RUGPT_SERVE_MODEL names another checkpoint), then open the playground."""
    http = yaml.safe_load(SERVE_CONFIG.read_text())["http_options"]
    newest = max(glob.glob("runs/demo-*"), key=os.path.getmtime, default=None)
    served = "" if newest and Path(newest).resolve() == Path(run_dir).resolve() else f"RUGPT_SERVE_MODEL={run_dir} "
    return (f"play:  {served}serve run {SERVE_CONFIG}      (Ctrl-C stops it)\n"
            f"       then open http://{http['host']}:{http['port']}/ : generate, and hover the tokens")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
