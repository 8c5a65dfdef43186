"""LoRA: adapters on a frozen base through real DeepSpeed and real Ray Train on CPU, adapter-only checkpoints that
refuse another base, and merged export."""

import json
import os
from pathlib import Path

import pytest
import torch
from ports import free_port

from rugpt_ray.checkpoints import load_model, save_native
from rugpt_ray.cli import main
from rugpt_ray.config import LoraConfig, TrainConfig, preset
from rugpt_ray.errors import UserError
from rugpt_ray.lora import add_lora, base_fingerprint, base_reference, load_adapter, merged_model, save_adapter

REPO = Path(__file__).resolve().parents[1]
LORA = LoraConfig(r=4, alpha=8, dropout=0.0)


def adapted(make_adapted, sparse_mode: str = "alternating"):
    """A random tiny base, and the same weights with a random (nonzero) adapter added."""
    cfg = preset("tiny") if sparse_mode != "none" else preset("tiny", sparse_mode="none", sparse_attention=None)
    return make_adapted(cfg, 0, 1, LORA)


def write_run(tmp_path, base, model) -> Path:
    """A LoRA run folder as training leaves it: the base saved natively, the adapter in step_0000003/adapter."""
    save_native(base, tmp_path / "base")
    run = tmp_path / "run"
    save_adapter(model, LORA, base_reference(base, str(tmp_path / "base"), {}), run / "step_0000003" / "adapter")
    return run


# --------------------------------------------------------------------------------------------- without Ray

@pytest.mark.parametrize("overrides, message", [
    (["lora.r=0"], "train config: lora: r must be >= 1, got 0"),
    (["lora.targets=[c_attn, wte]"], "targets must be a non-empty list of c_attn, c_proj, c_fc"),
    (["lora.alhpa=8"], "unknown keys ['alhpa'] (did you mean 'alpha'?)"),
    (["init_from=null"], "lora needs init_from"),
    (["checkpoint_upload=later"], "checkpoint_upload 'later' is not one of sync, async"),
])
def test_bad_lora_config_is_one_clear_error_before_ray(overrides, message, tmp_path, capsys):
    assert main(["train", "--config", str(REPO / "jobs" / "configs" / "lora-tiny-cpu.yaml"), f"init_from={tmp_path}",
                 "storage_path=/tmp/never", *overrides]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err[-2000:]


def test_a_new_adapter_changes_nothing_and_only_it_trains(make_model):
    base = make_model(preset("tiny"), seed=3)
    model = make_model(preset("tiny"), seed=3)
    fingerprint = base_fingerprint(model)
    add_lora(model, LORA)
    assert base_fingerprint(model) == fingerprint  # the base is the same model with or without adapters
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert len(trainable) == 2 * 4 * 2  # A and B on c_attn, attn.c_proj, c_fc, mlp.c_proj of 2 layers
    ids = torch.randint(5, 50257, (2, 100))
    with torch.no_grad():
        assert torch.equal(model(ids)[0], base(ids)[0])  # B starts at zero
        next(p for name, p in base.named_parameters() if name.endswith("c_fc.weight")).view(-1)[0] += 1e-6
    assert base_fingerprint(base) != fingerprint


@pytest.mark.parametrize("sparse_mode, to", [("alternating", "native"), ("none", "hf")])
def test_merged_export_equals_base_plus_adapter(make_adapted, tmp_path, sparse_mode, to):
    base, model = adapted(make_adapted, sparse_mode)
    run = write_run(tmp_path, base, model)
    assert main(["export", str(run), str(tmp_path / "merged"), "--merge", "--to", to]) == 0
    ids = torch.randint(5, 50257, (2, 120))  # past the sparse layers' first 64-token local window
    with torch.no_grad():
        want = model.eval()(ids)[0]
        if to == "native":
            got = load_model(tmp_path / "merged")(ids)[0]
        else:
            from transformers import GPT2LMHeadModel

            got = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()(ids).logits
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()  # fp32 rounding, relative to the scale
    assert (want - base(ids)[0]).abs().max().item() > 1e-2  # the adapter does change the logits


def test_the_chat_template_is_saved_with_the_adapter_and_kept_by_merged_exports(make_adapted, tmp_path, data_dir):
    from transformers import AutoTokenizer

    from rugpt_ray.chat import chat_template_source
    from rugpt_ray.checkpoints import read_chat_template

    template = chat_template_source("rugpt3-chat")
    base, model = adapted(make_adapted, "none")
    save_native(base, tmp_path / "base")
    folder = save_adapter(model, LORA, base_reference(base, str(tmp_path / "base"), {}),
                          tmp_path / "run" / "step_0000003" / "adapter", chat_template=template)
    assert (folder / "chat_template.jinja").read_text(encoding="utf-8") == template
    assert load_adapter(tmp_path / "run").chat_template == template
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "native"), "--merge"]) == 0
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf"), "--merge", "--to", "hf", "--tokenizer",
                 str(data_dir / "tokenizer")]) == 0
    assert read_chat_template(tmp_path / "native") == read_chat_template(tmp_path / "hf") == template
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").chat_template == template
    assert main(["export", str(tmp_path / "native"), str(tmp_path / "again"), "--to", "hf"]) == 0
    assert read_chat_template(tmp_path / "again") == template  # a plain export keeps it too


def test_a_damaged_adapter_file_is_named_with_what_safetensors_said(make_adapter, tmp_path):
    folder = make_adapter(preset("tiny"), 1, 2, tmp_path / "adapter")
    weights = folder / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match=r"adapter\.safetensors: cannot be read as safetensors \(SafetensorError: "):
        load_adapter(folder)


def test_an_adapter_refuses_another_base(make_model, make_adapted, tmp_path, capsys):
    base, model = adapted(make_adapted)
    run = write_run(tmp_path, base, model)
    save_native(make_model(preset("tiny"), seed=9), tmp_path / "other")
    assert main(["export", str(run), str(tmp_path / "merged"), "--merge", "--base", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "adapter was trained on" in err and "refusing to apply it" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "merged").exists()
    with pytest.raises(UserError, match="a LoRA adapter checkpoint, not full weights"):
        load_model(run)
    adapter = load_adapter(run)  # the newest step's; self-describing: config, targets, base and fingerprint
    assert adapter.lora == LORA and adapter.base.fingerprint == base_fingerprint(base)
    assert adapter.chat_template is None  # trained on text
    assert adapter.base.source == str((tmp_path / "base").resolve())
    merged = merged_model(run)  # the recorded base is found and accepted
    assert isinstance(merged.transformer.h[0].attn.c_attn, torch.nn.Linear)


# --------------------------------------------------------------------------------------------- real DeepSpeed, Ray

@pytest.fixture(scope="module")
def process_group():
    """The one-rank gloo group a Ray Train worker would have, for this module's tests (DeepSpeed keeps its groups
    once made, so one group serves every engine)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def one_rank_process_group(process_group, monkeypatch):
    """The group, and the launcher's variables DeepSpeed reads, for one test (a Ray started later must not see
    them)."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage, precision, checkpointing", [(2, "fp32", False), (3, "bf16", True)])
def test_deepspeed_trains_the_adapter_and_leaves_every_base_weight_bit_equal(make_model, tokenizer, zero_stage,
                                                                            precision, checkpointing,
                                                                            one_rank_process_group):
    import contextlib

    import deepspeed

    from rugpt_ray.config import deepspeed_engine_config
    from rugpt_ray.train import build_engine, micro_step

    model = make_model(preset("tiny"), seed=4).train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    add_lora(model, LORA)
    model.activation_checkpointing = checkpointing
    cfg = TrainConfig(init_from="unused", lora=LORA.to_dict(), micro_batch=4, lr=1e-2, zero_stage=zero_stage,
                      precision=precision, weight_decay=0.1)
    engine = build_engine(model, cfg, deepspeed_engine_config(cfg), steps=15)
    text = (Path(os.environ["RUGPT_DATA"]) / "corpus" / "train").glob("*.txt")
    ids = tokenizer.encode(next(text).read_text(encoding="utf-8"))[:4 * 65]
    tokens = torch.tensor(ids).view(4, 65)
    losses = [micro_step(engine, tokens, pad_id=0).item() for _ in range(15)]
    assert losses[-1] < losses[0] - 0.5  # the adapter learns (one batch, so it can fit it)
    gathered = (deepspeed.zero.GatheredParameters(list(engine.module.parameters())) if zero_stage == 3
                else contextlib.nullcontext())
    with gathered:
        after = {name.replace(".base_layer.", "."): p.detach().clone() for name, p in engine.module.named_parameters()}
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # the engine holds the base in its precision
    assert all(torch.equal(after[name], weight.to(dtype)) for name, weight in before.items())  # bit for bit
    assert all(p.abs().max() > 0 for name, p in after.items() if "lora_B" in name)


@pytest.fixture(scope="module")
def prepared(prepare_once, data_dir) -> str:
    corpus = data_dir / "corpus"  # the same cache as test_train's
    return prepare_once("corpus-seq64", inputs=[str(corpus / "train")], valid=[str(corpus / "valid")],
                        tokenizer=str(data_dir / "tokenizer"), seq_len=64)["out"]


def valid_loss(model, tokenizer, data_dir) -> float:
    from rugpt_ray.data import iter_documents, resolve_inputs
    from rugpt_ray.evaluation import join_documents, perplexity

    docs = tokenizer.encode_batch([d.text for d in iter_documents(resolve_inputs(str(data_dir / "corpus" / "valid")))])
    return perplexity(model.eval(), join_documents(docs, tokenizer.eos_id)[:64 * 64], 64).loss


@pytest.mark.slow
@pytest.mark.long
def test_lora_run_trains_resumes_exports_and_refuses_another_base(tmp_path, prepared, make_model, tokenizer,
                                                                  data_dir, ray_local):
    from rugpt_ray.train import lr_at, train

    base = make_model(preset("tiny"), seed=2)
    save_native(base, tmp_path / "base")
    values = dict(name="lora", storage_path=str(tmp_path / "runs"), init_from=str(tmp_path / "base"),
                  lora={"r": 8, "alpha": 16, "dropout": 0.0}, train_data=prepared, seq_len=64, micro_batch=16,
                  lr=1e-2, min_lr=1e-3, warmup=2, weight_decay=0.0, log_interval=5, eval_interval=10, eval_iters=4,
                  save_interval=10, max_steps=20, num_workers=1, zero_stage=0)  # as lora-large/xl.yaml
    first = train(TrainConfig.from_dict(values))
    step20 = Path(first.checkpoint)
    assert step20.name == "step_0000020"
    assert sorted(p.name for p in (step20 / "adapter").iterdir()) == ["adapter.json", "adapter.safetensors"]
    assert not (step20 / "model").exists()
    # adapter-only DeepSpeed states too: a full tiny model is 13 MB in fp32, its rank-8 adapters 130 kB
    assert (step20 / "deepspeed" / "mp_rank_00_model_states.pt").stat().st_size < 1_000_000

    resumed = train(TrainConfig.from_dict({**values, "max_steps": 30}))
    rows = [json.loads(line) for line in (Path(resumed.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    loss = {r["step"]: r["loss"] for r in rows}
    assert abs(loss[25] - loss[20]) < 0.15 < loss[5] - loss[25]  # went on from the step-20 adapter, not from zero

    base_loss = valid_loss(base, tokenizer, data_dir)
    merged_20, merged_30 = (valid_loss(merged_model(step), tokenizer, data_dir)
                            for step in (step20, resumed.checkpoint))
    assert max(merged_20, merged_30) < base_loss - 0.3

    # what a PBT exploit in a LoRA sweep does: another run starts from the step-20 checkpoint with its own lr
    taker_cfg = TrainConfig.from_dict({**values, "name": "taker", "lr": 5e-3, "max_steps": 25})
    taker = train(taker_cfg, start_from=str(step20))
    took = [json.loads(line) for line in (Path(taker.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in took] == [25] and took[0]["lr"] == pytest.approx(lr_at(25, taker_cfg, 25))
    assert abs(took[0]["loss"] - loss[25]) < 0.15 < loss[5] - took[0]["loss"]  # the step-20 adapters, not new ones
    assert not (Path(taker.checkpoint) / "model").exists() and (Path(taker.checkpoint) / "adapter").is_dir()

    save_native(make_model(preset("tiny"), seed=7), tmp_path / "other")
    with pytest.raises(Exception, match="refusing to apply it"):
        train(TrainConfig.from_dict({**values, "max_steps": 40, "init_from": str(tmp_path / "other")}))


def test_the_lora_sweep_spec_varies_lr_and_rank(tmp_path):
    from rugpt_ray.tuning.plan import load_sweep_config, plan_sweep, trial_values

    plan = plan_sweep(load_sweep_config(str(REPO / "tune" / "lora_lr_rank.yaml"), [f"train.init_from={tmp_path}"]))
    assert plan.space == {"lr": ("loguniform", [1e-3, 3e-2]), "lora.r": ("grid", [4, 8, 16])}
    assert plan.num_trials == 6
    trial = TrainConfig.from_dict(trial_values(plan.base.to_dict(), {"lr": 5e-3, "lora.r": 16}))
    assert trial.lora == {"r": 16, "alpha": 16, "dropout": 0.05, "targets": ["c_attn", "c_proj", "c_fc"]}
    assert trial.lr == 5e-3
    with pytest.raises(UserError, match=r"space.lora.rank value 4: train config: lora: unknown keys \['rank'\]"):
        plan_sweep(load_sweep_config(str(REPO / "tune" / "lora_lr_rank.yaml"),
                                     [f"train.init_from={tmp_path}", "space.lora.rank={grid: [4]}"]))
