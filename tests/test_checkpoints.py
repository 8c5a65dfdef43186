"""Every checkpoint format in and out: seed Megatron/DeepSpeed files, HF folders, the native format."""

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2LMHeadModel

from rugpt_ray.chat import chat_template_source
from rugpt_ray.checkpoints import (
    CONV1D_WEIGHTS,
    export_hf,
    load_model,
    read_chat_template,
    save_native,
    write_manifest,
)
from rugpt_ray.config import ModelConfig, preset
from rugpt_ray.errors import UserError

TO_MEGATRON = [
    (r"^transformer\.wte\.", "word_embeddings."),
    (r"^transformer\.wpe\.", "position_embeddings."),
    (r"^transformer\.ln_f\.", "transformer.final_layernorm."),
    (r"^transformer\.h\.(\d+)\.ln_1\.", r"transformer.layers.\1.input_layernorm."),
    (r"^transformer\.h\.(\d+)\.ln_2\.", r"transformer.layers.\1.post_attention_layernorm."),
    (r"^transformer\.h\.(\d+)\.attn\.c_attn\.", r"transformer.layers.\1.attention.query_key_value."),
    (r"^transformer\.h\.(\d+)\.attn\.c_proj\.", r"transformer.layers.\1.attention.dense."),
    (r"^transformer\.h\.(\d+)\.mlp\.c_fc\.", r"transformer.layers.\1.mlp.dense_h_to_4h."),
    (r"^transformer\.h\.(\d+)\.mlp\.c_proj\.", r"transformer.layers.\1.mlp.dense_4h_to_h."),
]


def megatron_state(model, dtype=torch.float16, rows=None):
    """The seed's key names (ru-gpts-facts.md §3), written independently of the reader."""
    sd = {}
    for key, value in model.state_dict().items():
        if key in ("lm_head.weight", "sparse_layout"):
            continue
        for pattern, repl in TO_MEGATRON:
            key = re.sub(pattern, repl, key)
        sd[key] = value.to(dtype).clone()
    if rows is not None:
        wte = sd["word_embeddings.weight"]
        sd["word_embeddings.weight"] = torch.cat([wte, torch.zeros(rows - wte.shape[0], wte.shape[1], dtype=dtype)])
    return sd


def seed_client_state():
    """What the seed's save_ds_checkpoint stores beside the weights: RNG states, numpy included."""
    return {"iteration": 200, "np_rng_state": np.random.get_state(), "random_rng_state": (3, (1, 2), None),
            "torch_rng_state": torch.get_rng_state(), "rng_tracker_states": {"model-parallel-rng": torch.zeros(4)}}


def test_seed_deepspeed_checkpoint_with_sparse_layers(tmp_path, make_model):
    model = make_model(preset("tiny"))
    save = tmp_path / "xl_run"
    (save / "200").mkdir(parents=True)
    sd = megatron_state(model)
    # newer DeepSpeed registers each sparse layer's master_layout buffer
    sd["transformer.layers.0.attention.sparse_self_attention.master_layout"] = model.sparse_layout.long()
    torch.save({"module": sd, **seed_client_state()}, save / "200" / "mp_rank_00_model_states.pt")
    (save / "latest_checkpointed_iteration.txt").write_text("200")

    loaded = load_model(save, preset="tiny")
    ids = torch.randint(0, 50257, (1, 200))
    with torch.no_grad():
        ref = model.half().float()(ids)[0]
        assert (loaded(ids)[0] - ref).abs().max().item() <= 1e-4
    assert loaded.config.sparse_mode == "alternating"


def test_megatron_iter_layout_and_vocab_padding(tmp_path, make_model):
    model = make_model(ModelConfig(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=50257))
    path = tmp_path / "run" / "iter_0001000" / "mp_rank_00"
    path.mkdir(parents=True)
    torch.save({"model": megatron_state(model, torch.float32), "iteration": 1000}, path / "model_optim_rng.pt")
    (tmp_path / "run" / "latest_checkpointed_iteration.txt").write_text("1000")
    padded = load_model(tmp_path / "run", n_head=4, vocab_size=50264)
    assert padded.config.vocab_size == 50264
    ids = torch.randint(0, 50257, (1, 30))
    with torch.no_grad():
        assert (padded(ids)[0][..., :50257] - model(ids)[0]).abs().max().item() <= 1e-5
    # and back: 50264 rows (seed XL) trimmed to 50257 (HF configs)
    torch.save({"module": megatron_state(model, rows=50264)}, tmp_path / "single.pt")
    trimmed = load_model(tmp_path / "single.pt", n_head=4, vocab_size=50257)
    assert trimmed.transformer.wte.weight.shape[0] == 50257


def test_megatron_needs_heads_and_checks_them(tmp_path, make_model):
    model = make_model(ModelConfig(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=50257))
    torch.save({"module": megatron_state(model)}, tmp_path / "mp_rank_00_model_states.pt")
    with pytest.raises(UserError, match="head count"):
        load_model(tmp_path)
    with pytest.raises(UserError, match="checkpoint has n_layer=2, preset small has 12"):
        load_model(tmp_path, preset="small")
    with pytest.raises(UserError, match="not divisible by n_head"):
        load_model(tmp_path, n_head=5)


def test_pickle_that_needs_code_is_refused(tmp_path):
    torch.save({"module": {}, "args": argparse_namespace()}, tmp_path / "mp_rank_00_model_states.pt")
    with pytest.raises(UserError, match="refused.*weights_only=True"):
        load_model(tmp_path, preset="tiny")


def argparse_namespace():
    import argparse

    return argparse.Namespace(lr=1e-4)


def test_native_round_trip_keeps_random_layout(tmp_path, make_model):
    cfg = preset("tiny", sparse_mode="all", sparse_attention={"mode": "bigbird", "block": 16, "seed": 7,
                                                                "attention": "unidirectional"})
    model = make_model(cfg)
    save_native(model, tmp_path / "native")
    meta = json.loads((tmp_path / "native" / "config.json").read_text())
    assert meta["format"] == "rugpt-ray" and meta["model"]["sparse_attention"]["mode"] == "bigbird"
    # tamper with the layout stored in memory: the reload must take the saved one, not regenerate
    with torch.no_grad():
        model.sparse_layout[:, 3, 0] = ~model.sparse_layout[:, 3, 0]
    save_native(model, tmp_path / "tampered")
    back = load_model(tmp_path / "tampered")
    assert torch.equal(back.sparse_layout, model.sparse_layout)
    ids = torch.randint(0, 50257, (1, 120))
    with torch.no_grad():
        assert torch.equal(back(ids)[0], model(ids)[0])


def test_sparse_export_to_hf_refused_unless_allowed(tmp_path, make_model):
    model = make_model(preset("tiny"))
    with pytest.raises(UserError, match="--allow-dense"):
        export_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    export_hf(model, tmp_path / "hf", allow_dense=True)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    assert hf.config.n_layer == 2
    check_dense_export_logits(model, hf)


def first_window(model) -> int:
    """Tokens of the layout's first window, checked on the layout itself: within it every query block sees every
    block up to its own (with j <= i per token, attention's rule), so the sparse layers attend as dense causal ones;
    the first block past it does not see them all."""
    sparse = model.config.sparse_attention
    assert sparse["mode"] == "fixed" and sparse["num_global_blocks"] == 1  # what the claim is made for
    blocks, layout = sparse["num_local_blocks"], model.sparse_layout.bool()
    assert torch.equal(layout[:, :blocks, :blocks], torch.ones(blocks, blocks, dtype=torch.bool).tril().expand(
        layout.shape[0], -1, -1))
    assert not layout[:, blocks, :blocks].all(dim=-1).any()  # no head of the next row sees the whole first window
    return blocks * sparse["block"]


def check_dense_export_logits(sparse_model, hf, length: int = 200) -> None:
    """An --allow-dense export (stock GPT2LMHeadModel) gives the sparse model's logits over the first window, to fp32
    rounding, and other logits at every position past it."""
    window = first_window(sparse_model)
    assert window < length <= sparse_model.config.n_positions
    ids = torch.randint(5, 50257, (2, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf.eval()(ids).logits - sparse_model.eval()(ids)[0]).abs().amax(dim=(0, 2))
    assert diff[:window].max().item() <= 1e-4, diff[:window].max().item()
    assert diff[window:].min().item() > 1e-2, diff[window:].min().item()


def test_export_refuses_to_overwrite(tmp_path, make_model):
    model = make_model(ModelConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=50257))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        save_native(model, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_hf_bin_and_wrong_heads(tmp_path, make_model):
    model = make_model(ModelConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=50257))
    export_hf(model, tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    (tmp_path / "bin").mkdir()
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    back = load_model(tmp_path / "bin")
    ids = torch.randint(0, 50257, (1, 20))
    with torch.no_grad():
        assert (back(ids)[0] - model(ids)[0]).abs().max().item() <= 1e-5
    with pytest.raises(UserError, match="checkpoint has n_layer=1, preset small has 12"):
        load_model(tmp_path / "bin", preset="small")


def test_unknown_inputs_name_the_path(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: no config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "weird.txt").write_text("x")
    with pytest.raises(UserError, match="unknown checkpoint file type"):
        load_model(tmp_path / "weird.txt")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text(json.dumps({"format": "rugpt-ray", "model": {"n_layer": 1}}))
    save_file({"x": torch.zeros(1)}, tmp_path / "broken" / "model.safetensors")
    with pytest.raises(UserError, match="missing"):
        load_model(tmp_path / "broken")


def test_conv1d_names_are_hf_gpt2_conv1d_modules():
    from transformers.pytorch_utils import Conv1D

    hf = GPT2LMHeadModel(GPT2LMHeadModel.config_class(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    conv = {name + ".weight" for name, m in hf.named_modules() if isinstance(m, Conv1D)}
    assert {".".join(n.split(".")[-3:]) for n in conv} == set(CONV1D_WEIGHTS)


def test_the_chat_template_travels_with_every_format(tmp_path, make_model, data_dir):
    from transformers import AutoTokenizer

    template = chat_template_source("rugpt3-chat")
    model = make_model(ModelConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=50257))
    run = tmp_path / "run"
    save_native(model, run / "step_0000002" / "model")  # an older checkpoint, trained without one
    save_native(model, run / "step_0000004" / "model", chat_template=template)
    for step in ("step_0000002", "step_0000004"):  # what training's commit marker would say (checkpoints.MANIFEST_FILE)
        write_manifest(run / step)
    assert (run / "step_0000004" / "model" / "chat_template.jinja").read_text(encoding="utf-8") == template
    assert read_chat_template(run) == template  # the newest checkpoint's
    assert read_chat_template(run / "step_0000004") == read_chat_template(run / "step_0000004" / "model") == template
    assert read_chat_template(run / "step_0000002") is None
    export_hf(model, tmp_path / "hf", tokenizer_folder=data_dir / "tokenizer", chat_template=template)
    assert read_chat_template(tmp_path / "hf") == template
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["n_ctx"] == 64  # llama.cpp's converter reads it
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").chat_template == template  # what transformers reads
    export_hf(model, tmp_path / "plain")
    assert read_chat_template(tmp_path / "plain") is None
    (tmp_path / "plain" / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert read_chat_template(tmp_path / "plain") == "{{ messages }}"  # where transformers 4 kept it
    torch.save({"module": megatron_state(model)}, tmp_path / "mp_rank_00_model_states.pt")
    assert read_chat_template(tmp_path / "mp_rank_00_model_states.pt") is None  # the seed's files have none


# --------------------------------------------------------------------------------------------- damaged files

def cut_in_half(path, at=None):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2 if at is None else at])
    return path


def load_error(path, **kwargs) -> UserError:
    with pytest.raises(UserError) as info:
        load_model(path, **kwargs)
    assert "\n" not in str(info.value), str(info.value)
    return info.value


def test_a_truncated_file_is_reported_with_what_its_reader_said(tmp_path, make_model):
    """A cut file is not "refused for needing arbitrary objects": the message names the file and says what torch or
    safetensors said about it, in one line."""
    model = make_model(ModelConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=50257))
    seed = tmp_path / "seed.pt"  # the seed's DeepSpeed file (torch's zip format)
    torch.save({"module": megatron_state(model), **seed_client_state()}, seed)
    error = load_error(cut_in_half(seed), n_head=2)
    assert str(error).startswith(f"{seed}: cannot be read as a torch checkpoint (RuntimeError: PytorchStreamReader "
                                 "failed reading zip archive: failed finding central directory.")

    export_hf(model, tmp_path / "hf")  # an HF folder's pytorch_model.bin
    (tmp_path / "bin").mkdir()
    torch.save(GPT2LMHeadModel.from_pretrained(tmp_path / "hf").state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    cut_in_half(tmp_path / "bin" / "pytorch_model.bin")
    error = load_error(tmp_path / "bin")
    assert str(error).startswith(f"{tmp_path / 'bin' / 'pytorch_model.bin'}: cannot be read as a torch checkpoint "
                                 "(RuntimeError: PytorchStreamReader failed reading zip archive")

    for folder in (save_native(model, tmp_path / "native"), tmp_path / "hf"):  # safetensors, native and HF
        file = cut_in_half(folder / "model.safetensors")
        assert str(load_error(folder)) == (f"{file}: cannot be read as safetensors (SafetensorError: Error while "
                                           "deserializing header: incomplete metadata, file not fully covered)")


def test_a_legacy_torch_file_cut_anywhere_is_corrupt_not_refused(tmp_path, make_model):
    """torch's legacy (pre-zip) format is one pickle stream: cut inside a global's name, torch's weights_only unpickler
    says "Unsupported global: GLOBAL colle." in its weights_only advice; that is a damaged file, not a refusal."""
    model = make_model(ModelConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=50257))
    whole = tmp_path / "whole.pt"
    torch.save({"module": megatron_state(model)}, whole, _use_new_zipfile_serialization=False)
    data = whole.read_bytes()
    cut = tmp_path / "mp_rank_00_model_states.pt"
    said_weights_only = 0
    for at in [*range(1, 1200, 3), len(data) // 2, len(data) - 1]:  # the header and pickle, then into the storages
        cut.write_bytes(data[:at])
        error = load_error(cut, n_head=2)
        assert str(error).startswith(f"{cut}: cannot be read as a torch checkpoint ("), (at, str(error))
        assert "refused" not in str(error) and "arbitrary" not in str(error), (at, str(error))
        said_weights_only += "weights_only" in str(error.__cause__)
    assert said_weights_only > 0  # some cuts did hit the case that used to be misreported

    torch.save({"module": {}, "args": argparse_namespace()}, cut, _use_new_zipfile_serialization=False)
    with pytest.raises(UserError, match=r"refused: it needs arbitrary Python objects to load \(argparse.Namespace\)"):
        load_model(cut, n_head=2)  # a real refusal still reads as one, in either format


@pytest.mark.slow  # the hub client retries a refused connection for about 20 s before it gives up
def test_an_unreachable_hub_is_reported_with_its_cause(tmp_path):
    """A refused connection, a gated repo and a full disk must not read the same: the CLI's line keeps the cause."""
    import os
    import subprocess
    import sys

    from ports import free_port

    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
           "HF_HOME": str(tmp_path)}  # nothing listens there
    out = subprocess.run([sys.executable, "-m", "rugpt_ray.cli", "info", "org/name"], env=env, capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    line = out.stderr.strip()
    assert line.startswith("rugpt-ray info: error: org/name: no such local path, and the HF hub download failed: "), \
        line
    assert "ConnectError: [Errno 111] Connection refused" in line, line
    assert "\n" not in line and "Traceback" not in line
