"""`rugpt-ray`: the command line. Bad input prints one line naming what and where, and exits 2."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rugpt_ray.config import (
    CHECKPOINT_FORMATS,
    DTYPES,
    FLOAT_DTYPES,
    SPARSE_MODES,
    check_train_config,
    default_tokenizer,
    load_train_config,
    read_deepspeed_json,
)
from rugpt_ray.data.prepare import DataConfig
from rugpt_ray.errors import UserError

Command = Callable[[argparse.Namespace], int]


def read_sparse_config(path: str) -> dict[str, Any]:
    """A bare `sparse_attention` dict, or a whole DeepSpeed JSON (the seed's) that carries one."""
    _, sparse = read_deepspeed_json(path, "--sparse-config")
    if sparse is None:
        raise UserError(f"--sparse-config {path}: no sparse_attention block (nor a bare one with a mode)")
    return sparse


def add_model_args(p: argparse.ArgumentParser, *, model: str | None = "--model",
                   dtypes: tuple[str, ...] = DTYPES) -> None:
    """Where the checkpoint is (`--model`, a positional `model`, or None when the command names it itself), and
    how it is loaded; `dtypes`: the weight dtypes the command can use."""
    if model == "--model":
        p.add_argument("--model", required=True, help="checkpoint folder/file or HF hub id")
    elif model:
        p.add_argument(model, help="checkpoint folder/file or HF hub id")
    p.add_argument("--from", dest="fmt", default="auto", choices=CHECKPOINT_FORMATS,
                   help="checkpoint format (default: detect)")
    p.add_argument("--preset", help="preset for what seed weights do not store (heads, sparse layers, vocab rows)")
    p.add_argument("--n-head", type=int, help="attention heads (seed checkpoints do not store them)")
    p.add_argument("--sparse-config", help="DeepSpeed JSON (or its sparse_attention block) for sparse layers")
    p.add_argument("--sparse-mode", choices=SPARSE_MODES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=dtypes)


def load_model_from_args(args: argparse.Namespace, inference: bool = False):
    """The model the arguments name, in their dtype; for `inference` (generate, evaluate), laid out for it."""
    from rugpt_ray.checkpoints import load_model
    from rugpt_ray.quantization import prepack, with_dtype

    model = with_dtype(load_model(
        args.model, fmt=args.fmt, preset=args.preset, n_head=args.n_head, sparse_mode=args.sparse_mode,
        sparse_config=read_sparse_config(args.sparse_config) if args.sparse_config else None, device=args.device,
    ), args.dtype)
    return prepack(model) if inference else model


def add_tokenizer_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", help="tokenizer folder or hub id (default: the model folder if it has "
                   "vocab.json, else $RUGPT_DATA/tokenizer)")


def load_tokenizer_from_args(args: argparse.Namespace):
    from rugpt_ray.tokenizer import load_tokenizer

    if args.tokenizer:
        return load_tokenizer(args.tokenizer)
    model_dir = Path(args.model)
    return load_tokenizer(model_dir if (model_dir / "vocab.json").is_file() else default_tokenizer())


def cmd_generate(args: argparse.Namespace) -> int:
    from rugpt_ray.generation import GenerationConfig, stream

    cfg = GenerationConfig(
        max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, repetition_penalty=args.repetition_penalty,
        num_return_sequences=args.num_return_sequences, stop=args.stop or [], seed=args.seed,
    )
    tokenizer = load_tokenizer_from_args(args)
    model = load_model_from_args(args, inference=True)
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
    from rugpt_ray.checkpoints import export_hf, read_chat_template, save_native

    args.model = args.src
    if args.merge:
        from rugpt_ray.lora import load_adapter, merged_model

        model, template = merged_model(args.src, base=args.base), load_adapter(args.src).chat_template
    else:
        model, template = load_model_from_args(args), read_chat_template(args.src)
    if args.to == "hf":
        out = export_hf(model, args.dst, allow_dense=args.allow_dense, tokenizer_folder=args.tokenizer,
                        chat_template=template)
    else:
        out = save_native(model, args.dst, chat_template=template)
    print(f"wrote {args.to} checkpoint ({model.num_params():,} parameters) to {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rugpt_ray.data import iter_documents, resolve_inputs
    from rugpt_ray.evaluation import join_documents, perplexity

    paths = resolve_inputs(args.data)
    tokenizer = load_tokenizer_from_args(args)
    model = load_model_from_args(args, inference=True)
    seq_len = args.seq_len or model.config.n_positions
    if not 2 <= seq_len <= model.config.n_positions:
        raise UserError(f"--seq-len {seq_len}: must be between 2 and the model's {model.config.n_positions}")
    documents = tokenizer.encode_batch([doc.text for doc in iter_documents(paths)])
    result = perplexity(model, join_documents(documents, tokenizer.eos_id), seq_len, args.batch_size)
    print(f"{len(paths)} files: {result.describe()}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from rugpt_ray.checkpoints import detect_format, read_chat_template

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
    template = read_chat_template(args.model)
    print("chat_template: none" if template is None else f"chat_template:\n{template.rstrip()}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    plan = check_train_config(load_train_config(args.config, args.overrides))  # before torch and Ray are imported
    from rugpt_ray.plotting import plot_run
    from rugpt_ray.ray_start import ray_connection
    from rugpt_ray.storage import is_uri
    from rugpt_ray.train import train

    with ray_connection():
        result = train(plan)
    if result.metrics:
        print("final: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                    for k, v in result.metrics.items()))
    if not is_uri(result.run_dir):
        print(f"plot: {plot_run(result.run_dir)}")
    print(f"checkpoint: {result.checkpoint}")
    print(result.run_dir)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from rugpt_ray.plotting import plot_run

    print(plot_run(args.run, args.out))
    return 0


def lazy(target: str) -> Command:
    """A command function of another module ("module:function"), imported when the command runs: `--help` and the
    other commands do not pay for Ray, Serve or torch."""
    module, _, name = target.partition(":")

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), name)(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand, in the order `--help` lists them."""
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
    add_convert_args(p)

    p = sub.add_parser("export", help="a training run's newest checkpoint (or a step_* one) to the native or HF "
                       "format; the same as convert")
    p.add_argument("src", metavar="CHECKPOINT", help="run folder or step_* checkpoint folder")
    p.add_argument("dst", metavar="OUT")
    p.add_argument("--to", default="native", choices=("native", "hf"))
    add_convert_args(p)

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

    p = sub.add_parser("plot", help="PNG of a run's loss, perplexity and learning rate")
    p.add_argument("run", help="run folder (storage_path/name)")
    p.add_argument("--out", help="PNG path (default: RUN/metrics.png)")
    p.set_defaults(func=cmd_plot)

    add_prepare_data_args(sub.add_parser(
        "prepare-data", help="tokenize and pack text into a Parquet cache for training",
        description="Tokenize txt files with Ray Data and pack them into blocks of seq_len + 1 tokens (EOS between "
                    "documents) stored as Parquet shards plus meta.json. Training reads the cache."))

    add_serve_args(sub.add_parser(
        "serve", help="serve models over HTTP with Ray Serve (blocks until interrupted)"))

    p = sub.add_parser(
        "tune", help="sweep hyperparameters with Ray Tune (resumes a sweep of the same name)",
        description="Run a Ray Tune sweep over the trainer: every trial trains the spec's recipe with values drawn "
                    "from its space; ASHA stops trials that fall behind. Prints the trials table, the best trial "
                    "and its checkpoint, and, last, the sweep folder (trials.csv, trials.png, best.yaml).")
    p.add_argument("--config", required=True, help="sweep spec YAML, e.g. tune/lr_wd.yaml")
    p.add_argument("--out", help="sweep folder (default: the spec's storage_path/name)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override spec keys (train.max_steps=100, space.lr=..., num_samples=4)")
    p.set_defaults(func=lazy("rugpt_ray.tuning.trials:cmd_tune"))

    p = sub.add_parser("info", help="what a checkpoint holds")
    add_model_args(p, model="model", dtypes=FLOAT_DTYPES)
    p.set_defaults(func=cmd_info)
    return parser


def add_convert_args(p: argparse.ArgumentParser) -> None:
    """What convert and export share: how to read the source, and what an HF export takes."""
    add_model_args(p, model=None, dtypes=FLOAT_DTYPES)
    p.add_argument("--allow-dense", action="store_true", help="export a sparse model to HF as dense anyway")
    p.add_argument("--merge", action="store_true", help="a LoRA run or adapter: write its base with the adapter "
                   "folded in (the base it was trained on, checked by fingerprint)")
    p.add_argument("--base", help="with --merge: read the base from here instead of where training loaded it")
    p.add_argument("--tokenizer", help="tokenizer folder to copy into an HF export")
    p.set_defaults(func=cmd_convert)


def add_prepare_data_args(p: argparse.ArgumentParser) -> None:
    """Flags named after DataConfig's fields (`seq_len` -> `--seq-len`), with its defaults."""
    d = DataConfig.__dataclass_fields__
    p.add_argument("--inputs", nargs="+", required=True, metavar="PATH",
                   help="file.list, folder, glob, .txt file, .jsonl conversations or URI (s3://, gs://, file://); "
                        "several allowed")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (vocab.json + merges.txt) or hub id")
    p.add_argument("--seq-len", dest="seq_len", type=int, required=True, help="model context length")
    p.add_argument("--out", required=True, help="cache folder (local or URI)")
    p.add_argument("--valid", nargs="+", default=[], metavar="PATH", help="validation text, same forms as --inputs")
    p.add_argument("--paragraphs", action="store_true", help="one document per blank-line-separated paragraph")
    p.add_argument("--strict-utf8", dest="strict_utf8", action="store_true", help="invalid UTF-8 is an error")
    p.add_argument("--seed", type=int, default=d["seed"].default, help="seed of file and block order (default 0)")
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false", help="keep training files in sorted order")
    p.add_argument("--blocks-per-shard", dest="blocks_per_shard", type=int, default=d["blocks_per_shard"].default,
                   help="blocks per Parquet file (default 8192)")
    p.add_argument("--chat-template", dest="chat_template", metavar="NAME_OR_FILE",
                   help=".jsonl conversations: a built-in template name or a .jinja file (default rugpt3-chat)")
    p.add_argument("--overwrite", action="store_true", help="replace a cache built with other settings")
    p.set_defaults(func=lazy("rugpt_ray.data.prepare:cmd_prepare_data"))


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """`rugpt-ray serve`: ServeConfig's fields as flags (the quick case), or a Serve config file."""
    p.add_argument("--config", metavar="FILE",
                   help="a Serve config of this app with one server replica (serve_configs/local.yaml), instead of "
                        "--model/--adapter/--tokenizer and the settings below; stopped as gracefully as the flags")
    p.add_argument("--model", action="append", default=[], metavar="[NAME=]PATH",
                   help="checkpoint folder/file or hub id, optionally named (repeat for several; the first is "
                        "the default)")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                   help="LoRA adapter (folder, or LoRA run / checkpoint) served on the first --model, optionally "
                        "named (repeat for several; adapters on other bases: a Serve config's `adapters:`)")
    p.add_argument("--tokenizer", help="tokenizer folder or hub id")
    p.add_argument("--host", help="bind address (default: the config's, else 127.0.0.1: loopback only)")
    p.add_argument("--port", type=int, help="default: the config's, else 8000")
    p.add_argument("--api-key-env", metavar="VAR",
                   help="environment variable holding an API key; requests then need 'Authorization: Bearer <key>'")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--max-batch-size", type=int, default=32, help="sequences decoded together per model")
    p.add_argument("--num-cpus", type=float, metavar="N", help="CPUs the model server reserves, and so its torch "
                   "threads (default: every CPU of this machine)")
    p.add_argument("--ingress", choices=("router", "direct"), default="router",
                   help="what takes HTTP requests: a router in front of the model server (default), or the server "
                        "itself: faster, but a lost replica cuts its streams without an error event")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most new tokens one request may ask for")
    p.add_argument("--request-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="stop a generation after this long (504, or an error event when streaming)")
    p.add_argument("--shutdown-grace", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C, let requests in flight finish for this long (new ones get 503)")
    p.set_defaults(func=lazy("rugpt_ray.serving.command:cmd_serve"))


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
