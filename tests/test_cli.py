"""The `rugpt-ray` command: output on stdout, one-line errors, exit 2. Most cases call its `main` in this process, as
`python -m rugpt_ray.cli` does (a process each would cost 2-3 CPU-seconds of imports); a greedy generate and a bad
input run as real processes, for what the process adds: the entry point, its exit status, no traceback."""

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from rugpt_ray.checkpoints import load_model, save_native, write_manifest
from rugpt_ray.cli import main
from rugpt_ray.config import ModelConfig, preset
from rugpt_ray.generation import GenerationConfig, generate

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    """The command as a real process."""
    return subprocess.run([sys.executable, "-m", "rugpt_ray.cli", *args], capture_output=True, text=True,
                          env={**os.environ}, timeout=300)


@pytest.fixture
def cli(capsys) -> Callable[..., subprocess.CompletedProcess]:
    """`cli(*args)`: the command's `main` in this process, with what it printed, shaped as `run`'s result."""
    def call(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main(list(args))
        printed = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, printed.out, printed.err)

    return call


@pytest.fixture(scope="module")
def sparse_dir(tmp_path_factory, make_model):
    return save_native(make_model(preset("tiny")), tmp_path_factory.mktemp("cli") / "tiny")


@pytest.fixture(scope="module")
def reference(sparse_dir, tokenizer):
    """`rugpt_ray.generate` on the CLI's model: `reference(prompts, **GenerationConfig fields)` -> completions."""
    model = load_model(sparse_dir)
    return lambda prompts, **fields: generate(model, tokenizer, prompts, GenerationConfig(**fields))


def sequences(stdout: str, prompts: list[str], n: int) -> list[str]:
    """The continuations a several-sequence `generate` printed, in prompt x sequence order (its headers checked)."""
    parts = re.split(r"(?m)^=== prompt (\d+) · sequence (\d+) ===\n", stdout)
    assert parts[0] == "" and len(parts) == 1 + 3 * len(prompts) * n, stdout
    heads = [(int(parts[i]), int(parts[i + 1])) for i in range(1, len(parts), 3)]
    assert heads == [(p, k) for p in range(len(prompts)) for k in range(n)]
    bodies = [parts[i] for i in range(3, len(parts), 3)]
    assert all(body.startswith(prompts[p]) and body.endswith("\n") for body, (p, _) in zip(bodies, heads, strict=True))
    return [body[len(prompts[p]):-1] for body, (p, _) in zip(bodies, heads, strict=True)]


def test_generate_prints_the_continuation(sparse_dir, data_dir, reference):
    out = run("generate", "--model", str(sparse_dir), "--tokenizer", str(data_dir / "tokenizer"),
              "--prompt", "Однажды весною", "--max-new-tokens", "12", "--greedy")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Однажды весною") and len(out.stdout.strip()) > len("Однажды весною")
    greedy = reference("Однажды весною", greedy=True, max_new_tokens=12)[0]
    assert out.stdout == "Однажды весною" + greedy.text + "\n"  # the library's greedy continuation, as printed
    assert len(greedy.token_ids) == 12 and greedy.finish_reason == "length"
    again = run("generate", "--model", str(sparse_dir), "--prompt", "Однажды весною", "--max-new-tokens", "12",
                "--greedy")  # tokenizer from $RUGPT_DATA by default
    assert again.stdout == out.stdout


def test_generate_several_sequences(sparse_dir, cli):
    out = cli("generate", "--model", str(sparse_dir), "--prompt", "Раз", "--prompt", "Два", "--seed", "3",
              "--num-return-sequences", "2", "--max-new-tokens", "5", "--top-k", "20", "--top-p", "0.9",
              "--temperature", "0.8", "--repetition-penalty", "1.2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("=== prompt") == 4


def test_generate_flags_do_what_they_say(sparse_dir, reference, cli):
    """Every sampling flag reaches the generation: the CLI prints what `rugpt_ray.generate` gives with the same
    GenerationConfig, and each flag, left at its default, would have given something else."""
    prompt = "Однажды весною"
    twelve = reference(prompt, greedy=True, max_new_tokens=12)[0]

    out = cli("generate", "--model", str(sparse_dir), "--prompt", prompt, "--greedy", "--max-new-tokens", "5")
    five = reference(prompt, greedy=True, max_new_tokens=5)[0]
    assert out.stdout == prompt + five.text + "\n"
    assert len(five.token_ids) == 5 and five.token_ids == twelve.token_ids[:5] and len(five.text) < len(twelve.text)

    # a stop string taken from the middle of the greedy continuation: the text is cut just before its first place
    at = next(k for k in range(len(twelve.text) // 2, len(twelve.text) - 1)
              if twelve.text.find(twelve.text[k:k + 2]) > 0 and twelve.text[k:k + 2].strip())
    stop = twelve.text[at:at + 2]
    out = cli("generate", "--model", str(sparse_dir), "--prompt", prompt, "--greedy", "--max-new-tokens", "12",
              "--stop", stop)
    cut = twelve.text[:twelve.text.find(stop)]
    assert out.stdout == prompt + cut + "\n" and cut
    assert reference(prompt, greedy=True, max_new_tokens=12, stop=[stop])[0].text == cut

    prompts = ["Раз", "Мороз и солнце"]
    sampling = dict(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3)
    flags = ["--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--repetition-penalty", "1.3"]
    args = ["generate", "--model", str(sparse_dir), "--prompt", prompts[0], "--prompt", prompts[1],
            "--num-return-sequences", "3", "--max-new-tokens", "8", *flags]
    seeded = cli(*args, "--seed", "3")
    assert seeded.returncode == 0, seeded.stderr
    texts = sequences(seeded.stdout, prompts, 3)  # 3 per prompt
    want = [c.text for c in reference(prompts, num_return_sequences=3, max_new_tokens=8, seed=3, **sampling)]
    assert texts == want
    for name, default in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0), ("repetition_penalty", 1.0)):
        without = [c.text for c in reference(prompts, num_return_sequences=3, max_new_tokens=8, seed=3,
                                             **{**sampling, name: default})]
        assert without != texts, name  # so a CLI that dropped this flag would fail the comparison above
    assert cli(*args, "--seed", "3").stdout == seeded.stdout  # the same seed reproduces
    other = sequences(cli(*args, "--seed", "4").stdout, prompts, 3)
    assert other != texts
    assert other == [c.text for c in reference(prompts, num_return_sequences=3, max_new_tokens=8, seed=4,
                                               **sampling)]


def test_convert_info_and_evaluate(tmp_path, make_model, data_dir, cli):
    dense = save_native(make_model(ModelConfig(n_layer=2, n_embd=64, n_head=4, n_positions=128,
                                               vocab_size=50257)), tmp_path / "dense")
    out = cli("convert", str(dense), str(tmp_path / "hf"), "--to", "hf", "--tokenizer", str(data_dir / "tokenizer"))
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["n_head"] == 4
    assert (tmp_path / "hf" / "vocab.json").is_file()
    info = cli("info", str(tmp_path / "hf"))
    assert info.returncode == 0 and "(hf)" in info.stdout and "n_layer: 2" in info.stdout
    text = str(data_dir / "corpus" / "valid" / "chekhov_dama_s_sobachkoy.txt")  # one story: a quarter of the CPU
    ev = cli("evaluate", "--model", str(tmp_path / "hf"), "--data", text, "--seq-len", "128")
    assert ev.returncode == 0, ev.stderr
    assert "token mean over" in ev.stdout and "non-overlapping windows of 128" in ev.stdout
    int8 = cli("evaluate", "--model", str(tmp_path / "hf"), "--data", text, "--seq-len", "128", "--dtype", "int8")
    assert int8.returncode == 0, int8.stderr
    fp32_ppl, int8_ppl = (float(re.search(r"perplexity ([\d.]+)", out.stdout)[1]) for out in (ev, int8))
    assert fp32_ppl != int8_ppl and int8_ppl == pytest.approx(fp32_ppl, rel=0.01)


def test_convert_sparse_to_hf_needs_allow_dense(sparse_dir, tmp_path, cli):
    out = cli("convert", str(sparse_dir), str(tmp_path / "hf"), "--to", "hf")
    assert out.returncode == 2 and "--allow-dense" in out.stderr
    ok = cli("convert", str(sparse_dir), str(tmp_path / "hf"), "--to", "hf", "--allow-dense")
    assert ok.returncode == 0, ok.stderr
    from test_checkpoints import check_dense_export_logits
    from transformers import GPT2LMHeadModel

    # stock transformers on the export: the sparse model's logits over the first window, others past it
    check_dense_export_logits(load_model(sparse_dir), GPT2LMHeadModel.from_pretrained(tmp_path / "hf"))


def write_seed_checkpoint(model, folder):
    """The seed's DeepSpeed file: Megatron key names under 'module', fp16."""
    folder.mkdir(exist_ok=True)
    sd = {k.replace("transformer.wte.", "word_embeddings.").replace("transformer.wpe.", "position_embeddings.")
          .replace("transformer.ln_f.", "transformer.final_layernorm.").replace(".h.", ".layers.")
          .replace("ln_1", "input_layernorm").replace("ln_2", "post_attention_layernorm")
          .replace("attn.c_attn", "attention.query_key_value").replace("attn.c_proj", "attention.dense")
          .replace("mlp.c_fc", "mlp.dense_h_to_4h").replace("mlp.c_proj", "mlp.dense_4h_to_h"): v.half()
          for k, v in model.state_dict().items() if k != "lm_head.weight"}
    torch.save({"module": sd}, folder / "mp_rank_00_model_states.pt")


def test_convert_seed_checkpoint_with_deepspeed_json(tmp_path, make_model, cli):
    model = make_model(ModelConfig(n_layer=2, n_embd=64, n_head=4, n_positions=256, vocab_size=50264))
    write_seed_checkpoint(model, tmp_path)
    ds_json = {"train_micro_batch_size_per_gpu": 2, "fp16": {"enabled": True},
               "sparse_attention": {"mode": "fixed", "block": 16, "different_layout_per_head": True,
                                    "num_local_blocks": 4, "num_global_blocks": 1, "attention": "unidirectional",
                                    "horizontal_global_attention": False, "num_different_global_patterns": 4}}
    (tmp_path / "ds.json").write_text(json.dumps(ds_json))
    out = cli("convert", str(tmp_path), str(tmp_path / "native"), "--to", "native", "--n-head", "4",
              "--sparse-config", str(tmp_path / "ds.json"), "--sparse-mode", "alternating")
    assert out.returncode == 0, out.stderr
    info = cli("info", str(tmp_path / "native"))
    assert "sparse layers: [0]" in info.stdout and "(native)" in info.stdout
    assert info.stdout.endswith("chat_template: none\n")  # the seed's files carry none


@pytest.mark.parametrize("args,message", [
    (["info", "/no/such/model"], "/no/such/model: no such file or folder"),
    (["info", "{tmp}/empty"], "no config.json"),
    (["generate", "--model", "{tiny}", "--prompt", "x", "--top-p", "2"], "top_p must be in (0, 1], got 2.0"),
    (["generate", "--model", "{tiny}", "--prompt", "x", "--tokenizer", "/nope"], "tokenizer /nope: no such folder"),
    (["generate", "--model", "{tiny}", "--prompt", "x", "--max-new-tokens", "1000"], "exceeds the model's 256"),
    (["evaluate", "--model", "{tiny}", "--data", "{tmp}/missing.txt"], "missing.txt"),
    (["convert", "{seed}", "{tmp}/out", "--to", "native"], "head count cannot be read"),
    (["convert", "{seed}", "{tmp}/out", "--to", "native", "--n-head", "4", "--preset", "xl"], "preset xl has"),
    (["info", "{seed}", "--n-head", "4", "--sparse-config", "{tmp}/bad.json"], "num_local_blocks"),
    (["serve", "--model", "{tiny}"], "serve: give --model and --tokenizer, or --config FILE"),
    (["serve", "--model", "{tiny}", "--tokenizer", "{tiny}", "--num-cpus", "0"], "serve: --num-cpus 0: must be "
                                                                                   "positive"),
    (["serve", "--config", "{tmp}/missing.yaml"], "--config {tmp}/missing.yaml: [Errno 2] No such file"),
    (["serve", "--config", "{repo}/serve_configs/gpu.yaml"], "RuGPTServer runs one replica here (num_replicas 1, "
                                                             "no autoscaling_config); a config with more is for a "
                                                             "cluster: serve deploy"),
    (["serve", "--config", "{repo}/serve_configs/local.yaml", "--model", "{tiny}"], "drop --model, --adapter and"),
    (["serve", "--config", "{repo}/serve_configs/local.yaml", "--num-cpus", "1"], "drop --num-cpus"),
])
def test_bad_input_is_one_line_exit_2(args, message, tmp_path, sparse_dir, make_model, cli):
    """In this process (`cli`): test_a_bad_input_ends_the_process_with_exit_2_and_one_line checks what the real
    process adds."""
    seed = tmp_path / "seed"
    write_seed_checkpoint(make_model(ModelConfig(n_layer=1, n_embd=32, n_head=4, n_positions=64)), seed)
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.json").write_text(json.dumps({"sparse_attention": {"mode": "fixed", "num_local_blocks": "8"}}))
    args = [a.format(tmp=tmp_path, tiny=sparse_dir, seed=seed, repo=REPO) for a in args]
    out = cli(*args)
    assert out.returncode == 2
    assert message.format(tmp=tmp_path) in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_serve_refuses_a_port_in_use_before_ray_starts(sparse_dir, data_dir, cli):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = cli("serve", "--model", str(sparse_dir), "--tokenizer", str(data_dir / "tokenizer"), "--port", str(port))
    assert out.returncode == 2
    assert out.stderr.strip().endswith(f"serve: cannot listen on 127.0.0.1:{port}: Address already in use"), out.stderr


def test_a_bad_input_ends_the_process_with_exit_2_and_one_line(sparse_dir):
    out = run("generate", "--model", str(sparse_dir), "--prompt", "x", "--max-new-tokens", "1000")
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stderr.startswith("rugpt-ray generate: error: ") and "exceeds the model's 256" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_export_takes_a_run_folders_newest_checkpoint(tmp_path, make_model, cli):
    from rugpt_ray.chat import chat_template_source

    template = chat_template_source("rugpt3-chat")
    for step, seed in ((10, 1), (20, 2)):
        save_native(make_model(ModelConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=50257),
                               seed=seed), tmp_path / "run" / f"step_{step:07d}" / "model", chat_template=template)
        write_manifest(tmp_path / "run" / f"step_{step:07d}")  # the commit marker training writes last
    out = cli("export", str(tmp_path / "run"), str(tmp_path / "hf"), "--to", "hf")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "hf" / "chat_template.jinja").read_text(encoding="utf-8") == template
    info = cli("info", str(tmp_path / "hf")).stdout
    assert f"chat_template:\n{template.rstrip()}" in info and info.count("{% generation %}") == 1
    newest = save_native(make_model(ModelConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=50257),
                                    seed=2), tmp_path / "again")
    from safetensors.torch import load_file

    key = "transformer.wpe.weight"
    exported = load_file(tmp_path / "hf" / "model.safetensors")[key]
    assert torch.equal(exported, load_file(newest / "model.safetensors")[key])
