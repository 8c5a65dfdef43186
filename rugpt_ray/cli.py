"""`rugpt-ray`: the command line. Bad input prints one line naming what and where, and exits 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rugpt_ray.config import data_root
from rugpt_ray.data import add_prepare_data_command
from rugpt_ray.errors import UserError
from rugpt_ray.serving import add_serve_command
from rugpt_ray.tuning import add_tune_command

DTYPES = ("float32", "bfloat16", "float16")


def read_sparse_config(path: str) -> dict[str, Any]:
    """A bare `sparse_attention` dict, or a whole DeepSpeed JSON (the seed's) that carries one."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--sparse-config {path}: {e}") from e
    if not isinstance(data, dict):
        raise UserError(f"--sparse-config {path}: expected a JSON object")
    return data.get("sparse_attention", data)


def add_model_args(p: argparse.ArgumentParser, *, model: str | None = "--model") -> None:
    """Where the checkpoint is (`--model`, a positional `model`, or None when the command names it itself)."""
    if model == "--model":
        p.add_argument("--model", required=True, help="checkpoint folder/file or HF hub id")
    elif model:
        p.add_argument(model, help="checkpoint folder/file or HF hub id")
    p.add_argument("--from", dest="fmt", default="auto", choices=("auto", "hf", "megatron", "native"),
                   help="checkpoint format (default: detect)")
    p.add_argument("--preset", help="preset for what seed weights do not store (heads, sparse layers, vocab rows)")
    p.add_argument("--n-head", type=int, help="attention heads (seed checkpoints do not store them)")
    p.add_argument("--sparse-config", help="DeepSpeed JSON (or its sparse_attention block) for sparse layers")
    p.add_argument("--sparse-mode", choices=("none", "all", "alternating", "top_bottom"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=DTYPES)


def load_model_from_args(args: argparse.Namespace):
    import torch

    from rugpt_ray.checkpoints import load_model

    return load_model(
        args.model, fmt=args.fmt, preset=args.preset, n_head=args.n_head, sparse_mode=args.sparse_mode,
        sparse_config=read_sparse_config(args.sparse_config) if args.sparse_config else None,
        device=args.device, dtype=getattr(torch, args.dtype),
    )


def add_tokenizer_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", help="tokenizer folder or hub id (default: the model folder if it has "
                   "vocab.json, else $RUGPT_DATA/tokenizer)")


def load_tokenizer_from_args(args: argparse.Namespace):
    from rugpt_ray.tokenizer import load_tokenizer

    if args.tokenizer:
        return load_tokenizer(args.tokenizer)
    model_dir = Path(args.model)
    return load_tokenizer(model_dir if (model_dir / "vocab.json").is_file() else data_root() / "tokenizer")


def cmd_generate(args: argparse.Namespace) -> int:
    from rugpt_ray.generation import GenerationConfig, stream

    cfg = GenerationConfig(
        max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, repetition_penalty=args.repetition_penalty,
        num_return_sequences=args.num_return_sequences, stop=args.stop or [], seed=args.seed,
    )
    cfg.validate()
    tokenizer = load_tokenizer_from_args(args)
    model = load_model_from_args(args)
    n = cfg.num_return_sequences
    texts: dict[int, str] = {}
    single = len(args.prompt) * n == 1
    if single:
        print(args.prompt[0], end="", flush=True)
    for event in stream(model, tokenizer, args.prompt, cfg):
        texts[event.index] = texts.get(event.index, "") + event.text
        if single:
            print(event.text, end="", flush=True)
    if single:
        print()
        return 0
    for index in sorted(texts):
        print(f"=== prompt {index // n} · sequence {index % n} ===")
        print(args.prompt[index // n] + texts[index])
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from rugpt_ray.checkpoints import export_hf, save_native

    args.model = args.src
    model = load_model_from_args(args)
    if args.to == "hf":
        out = export_hf(model, args.dst, allow_dense=args.allow_dense, tokenizer_folder=args.tokenizer)
    else:
        out = save_native(model, args.dst)
    print(f"wrote {args.to} checkpoint ({model.num_params():,} parameters) to {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rugpt_ray.data import iter_documents, resolve_inputs
    from rugpt_ray.evaluation import join_documents, perplexity

    paths = resolve_inputs(args.data)
    tokenizer = load_tokenizer_from_args(args)
    model = load_model_from_args(args)
    seq_len = args.seq_len or model.config.n_positions
    if not 2 <= seq_len <= model.config.n_positions:
        raise UserError(f"--seq-len {seq_len}: must be between 2 and the model's {model.config.n_positions}")
    documents = tokenizer.encode_batch([doc.text for doc in iter_documents(paths)])
    result = perplexity(model, join_documents(documents, tokenizer.eos_id), seq_len, args.batch_size)
    print(f"{len(paths)} files: {result.describe()}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from rugpt_ray.checkpoints import detect_format

    model = load_model_from_args(args)
    cfg = model.config
    print(f"checkpoint: {args.model} ({detect_format(Path(args.model))})")
    print(f"parameters: {model.num_params():,}")
    for key, value in cfg.to_dict().items():
        if key != "sparse_attention":
            print(f"{key}: {value}")
    if cfg.is_sparse:
        sparse = [i for i in range(cfg.n_layer) if cfg.is_sparse_layer(i)]
        layout = model.sparse_layout
        causal = layout.shape[-1] * (layout.shape[-1] + 1) / 2
        density = layout.float().tril().sum().item() / (layout.shape[0] * causal)
        print(f"sparse_attention: {json.dumps(cfg.sparse_attention)}")
        print(f"sparse layers: {sparse}")
        print(f"layout: {tuple(layout.shape)} blocks, {density:.1%} of causal blocks at {cfg.n_positions} tokens")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from rugpt_ray.config import load_train_config
    from rugpt_ray.plotting import plot_run
    from rugpt_ray.train import ray_connection, train

    cfg = load_train_config(args.config, args.overrides)
    with ray_connection():
        result = train(cfg)
    if result.metrics:
        print("final: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                    for k, v in result.metrics.items()))
    if "://" not in result.run_dir:
        print(f"plot: {plot_run(result.run_dir)}")
    print(f"checkpoint: {result.checkpoint}")
    print(result.run_dir)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from rugpt_ray.plotting import plot_run

    print(plot_run(args.run, args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rugpt-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="continue one or more prompts")
    add_model_args(p)
    add_tokenizer_arg(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--num-return-sequences", type=int, default=1)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--seed", type=int)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("convert", help="convert a checkpoint to the native or HF GPT-2 format")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", required=True, choices=("native", "hf"))
    add_model_args(p, model=None)
    p.add_argument("--allow-dense", action="store_true", help="export a sparse model to HF as dense anyway")
    p.add_argument("--tokenizer", help="tokenizer folder to copy into an HF export")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("evaluate", help="perplexity on text files")
    add_model_args(p)
    add_tokenizer_arg(p)
    p.add_argument("--data", required=True, nargs="+", help="txt file, folder, glob or file.list")
    p.add_argument("--seq-len", type=int, help="window length (default: the model's positions)")
    p.add_argument("--batch-size", type=int, default=4)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("train", help="train with Ray Train + DeepSpeed (resumes a run of the same name)")
    p.add_argument("--config", help="YAML recipe, e.g. jobs/configs/tiny-cpu.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys (model.x=... too)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="a training run's newest checkpoint (or a step_* one) to the native or HF "
                       "format; the same as convert")
    p.add_argument("src", metavar="CHECKPOINT", help="run folder or step_* checkpoint folder")
    p.add_argument("dst", metavar="OUT")
    p.add_argument("--to", default="native", choices=("native", "hf"))
    add_model_args(p, model=None)
    p.add_argument("--allow-dense", action="store_true", help="export a sparse model to HF as dense anyway")
    p.add_argument("--tokenizer", help="tokenizer folder to copy into an HF export")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("plot", help="PNG of a run's loss, perplexity and learning rate")
    p.add_argument("run", help="run folder (storage_path/name)")
    p.add_argument("--out", help="PNG path (default: RUN/metrics.png)")
    p.set_defaults(func=cmd_plot)

    add_prepare_data_command(sub)
    add_serve_command(sub)
    add_tune_command(sub)

    p = sub.add_parser("info", help="what a checkpoint holds")
    add_model_args(p, model="model")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"rugpt-ray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
