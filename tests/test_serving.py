"""Serving over real Ray Serve on 127.0.0.1, spoken to with plain HTTP (httpx), as a client app would."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from app_client import app_client
from polling import poll
from ports import free_port
from reference_decoding import reference_decode

from rugpt_ray.checkpoints import load_model, save_native
from rugpt_ray.config import ModelConfig, preset
from rugpt_ray.evaluation import perplexity
from rugpt_ray.generation import GenerationConfig, generate
from rugpt_ray.lora import apply_adapter, load_adapter
from rugpt_ray.quantization import with_dtype
from rugpt_ray.serving import ServeConfig
from rugpt_ray.serving.engine import STEP_PAUSE_ENV

# the tests here start Ray Serve (the serve config check rides along); one xdist worker runs them all, on one app
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("serving")]

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Мороз и солнце; день чудесный!", "Все счастливые семьи"]
DENSE = ModelConfig(n_layer=2, n_embd=64, n_head=4, n_positions=1024, vocab_size=50257)


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 150.0, **kwargs) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            if httpx.get(url, timeout=2, **kwargs).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not ready after {timeout} s")


def sse(response: httpx.Response) -> list:
    """The `data:` payloads of a server-sent event stream, JSON-decoded ([DONE] kept as a string)."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line.removeprefix("data: ")
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def stop_server(proc: subprocess.Popen, sig: signal.Signals = signal.SIGTERM) -> str:
    proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, make_model) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serving")
    return {
        "tiny": save_native(make_model(preset("tiny"), seed=1), root / "tiny"),
        "dense": save_native(make_model(DENSE, seed=2), root / "dense"),
        "tiny2": save_native(make_model(preset("tiny"), seed=3), root / "tiny2"),
    }


@pytest.fixture(scope="module")
def server(ray_local, checkpoints, data_dir):
    """One app with three models (two kept per replica) and small limits so that each one can be hit."""
    cfg = ServeConfig(models={name: str(path) for name, path in checkpoints.items()},
                      tokenizer=str(data_dir / "tokenizer"), max_new_tokens=1000, max_prompt_tokens=200, max_n=3,
                      max_batch_size=16, max_models_per_replica=2, max_ongoing_requests=4, max_queued_requests=4,
                      max_body_bytes=64 * 1024)
    with app_client(cfg, "main") as client:
        yield client


@pytest.fixture(scope="module")
def local_models(checkpoints):
    """The same checkpoints in this process: what the server should answer."""
    return {name: load_model(path) for name, path in checkpoints.items()}


@pytest.fixture(scope="module")
def direct(local_models, tokenizer):
    return lambda name, prompts, cfg: [c.text for c in generate(local_models[name], tokenizer, prompts, cfg)]


def log_softmax(model, ids: list[int]) -> torch.Tensor:
    """The checkpoint's own (len(ids), V) next-token log-probabilities over a text, in fp32."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0].float().log_softmax(-1)


def stats(client: httpx.Client, model: str) -> dict:
    return client.get("/stats").json()["models"][model]


def good_request(client: httpx.Client) -> None:
    r = client.post("/generate", json={"prompt": "Привет", "max_new_tokens": 4, "seed": 0})
    assert r.status_code == 200, r.text
    assert r.json()["completions"][0]["completion_tokens"] == 4


def test_health_models_and_stats(server):
    assert server.get("/healthz").json() == {"status": "ok"}
    models = server.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["tiny", "dense", "tiny2"]
    assert all(m["object"] == "model" and isinstance(m["created"], int) for m in models["data"])
    stats = server.get("/stats").json()
    assert "tiny" in stats["models"]  # the default model is loaded before traffic
    assert stats["torch_threads"] == 1  # its replica reserves one CPU (app_client's default)


def test_generate_equals_direct_generation(server, direct, local_models, tokenizer):
    body = {"prompt": PROMPTS, "max_new_tokens": 20, "temperature": 0.8, "top_k": 40, "top_p": 0.9,
            "repetition_penalty": 1.2, "num_return_sequences": 2, "seed": 7, "stop": ["ие"]}
    r = server.post("/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    cfg = GenerationConfig(max_new_tokens=20, temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.2,
                           num_return_sequences=2, seed=7, stop=["ие"])
    assert [c["text"] for c in out["completions"]] == direct("tiny", PROMPTS, cfg)
    # and not only the same decoder agreeing with itself: the textbook computation on each sequence's own draws
    # (reference_decoding), its stop string included
    want = [reference_decode(local_models["tiny"], tokenizer, tokenizer.encode(PROMPTS[row // 2]), cfg, row)
            for row in range(4)]
    assert [(c["text"], c["finish_reason"], c["completion_tokens"]) for c in out["completions"]] == \
        [(w.text, w.finish_reason, len(w.token_ids)) for w in want]
    assert [c["prompt_index"] for c in out["completions"]] == [0, 0, 1, 1]
    assert out["model"] == "tiny"
    prompt_tokens = sum(len(tokenizer.encode(p)) for p in PROMPTS)
    completion_tokens = sum(c["completion_tokens"] for c in out["completions"])
    assert out["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens}
    assert all(c["finish_reason"] in ("stop", "length") for c in out["completions"])


def test_streamed_text_equals_non_streamed(server):
    body = {"prompt": PROMPTS, "max_new_tokens": 24, "num_return_sequences": 2, "seed": 11, "model": "dense"}
    plain = server.post("/generate", json=body).json()
    with server.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r)
    final = events[-1]
    assert final.pop("done") is True and final == plain
    texts = ["", "", "", ""]
    for e in events[:-1]:
        texts[e["index"]] += e["text"]
    assert texts == [c["text"] for c in plain["completions"]]
    for c in plain["completions"]:  # tokens ready together go together (test_engine's scripted clock checks how)
        mine = [e for e in events[:-1] if e["index"] == c["index"]]
        assert 1 <= len(mine) <= c["completion_tokens"] and all(e["text"] or e["finish_reason"] for e in mine)
        assert [e["finish_reason"] for e in mine] == [None] * (len(mine) - 1) + [c["finish_reason"]]

    openai = {"model": "dense", "prompt": PROMPTS[0], "max_tokens": 16, "seed": 3, "temperature": 0.7}
    plain = server.post("/v1/completions", json=openai).json()
    with server.stream("POST", "/v1/completions",
                       json={**openai, "stream": True, "stream_options": {"include_usage": True}}) as r:
        chunks = sse(r)
    assert chunks[-1] == "[DONE]"
    assert chunks[-2]["usage"] == plain["usage"] and chunks[-2]["choices"] == []
    assert "".join(c["choices"][0]["text"] for c in chunks[:-2]) == plain["choices"][0]["text"]
    assert chunks[-3]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert {c["id"] for c in chunks[:-1]} == {chunks[0]["id"]} and chunks[0]["object"] == "text_completion"


def test_openai_completions_shape(server, direct):
    r = server.post("/v1/completions", json={"model": "tiny", "prompt": PROMPTS, "max_tokens": 12, "n": 2,
                                             "temperature": 0, "stop": "\n", "user": "test"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"].startswith("cmpl-") and out["object"] == "text_completion"
    assert isinstance(out["created"], int) and out["model"] == "tiny"
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert all(set(c) == {"index", "text", "logprobs", "finish_reason"} for c in out["choices"])
    greedy = direct("tiny", PROMPTS, GenerationConfig(max_new_tokens=12, greedy=True, num_return_sequences=2,
                                                      stop=["\n"]))
    assert [c["text"] for c in out["choices"]] == greedy  # temperature 0 = greedy
    assert set(out["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]


SCORED = "Мороз и солнце; день чудесный! Ещё ты дремлешь, друг прелестный"


def test_echo_logprobs_score_a_text_as_the_checkpoint_does(server, local_models, tokenizer):
    ids = tokenizer.encode(SCORED)
    want = log_softmax(local_models["dense"], ids)
    body = {"model": "dense", "echo": True, "logprobs": 3, "max_tokens": 0}
    r = server.post("/v1/completions", json={**body, "prompt": SCORED})
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    assert choice["text"] == SCORED and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == SCORED and len(lp["tokens"]) == len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(want[torch.arange(len(ids) - 1), ids[1:]].tolist(), abs=1e-4)
    assert lp["text_offset"] == [len(tokenizer.decode(ids[:i])) for i in range(len(ids))]
    for i, top in enumerate(lp["top_logprobs"][1:]):  # the 3 likeliest, plus the actual token when it is not one
        best = want[i].topk(3)
        assert len(top) in (3, 4) and max(top.values()) == pytest.approx(best.values[0].item(), abs=1e-4)
        assert top[tokenizer.decode([ids[i + 1]])] == lp["token_logprobs"][i + 1]
    loss = perplexity(local_models["dense"], ids, seq_len=len(ids) - 1).loss  # `rugpt-ray evaluate`'s number
    assert -sum(lp["token_logprobs"][1:]) / (len(ids) - 1) == pytest.approx(loss, abs=1e-4)
    assert r.json()["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}

    as_ids = server.post("/v1/completions", json={**body, "prompt": ids}).json()["choices"]
    assert as_ids == [choice]  # a token-id prompt is the same prompt
    batch = server.post("/v1/completions", json={**body, "prompt": [ids[:5], ids]}).json()["choices"]
    assert batch[1] == {**choice, "index": 1}
    assert batch[0]["logprobs"]["token_logprobs"] == pytest.approx(lp["token_logprobs"][:5], abs=1e-5)


def test_loglikelihood_request_as_lm_eval_sends_it(server, local_models, tokenizer):
    """lm-eval's local-completions: token ids, echo, logprobs 1, max_tokens 1, temperature 0; it sums
    token_logprobs[ctxlen:-1] and calls a continuation greedy when each equals max(top_logprobs[i])."""
    context, continuation = tokenizer.encode("Мороз и солнце;"), tokenizer.encode(" день чудесный!")
    ids = context + continuation
    want = log_softmax(local_models["dense"], ids)
    r = server.post("/v1/completions", json={"model": "dense", "prompt": [ids, context], "echo": True,
                                             "logprobs": 1, "max_tokens": 1, "temperature": 0, "seed": 1234})
    assert r.status_code == 200, r.text
    first, second = r.json()["choices"]
    lp = first["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt, then the one generated token
    ctxlen = len(context)
    got = sum(lp["token_logprobs"][ctxlen:-1])
    assert got == pytest.approx(sum(want[i - 1, ids[i]].item() for i in range(ctxlen, len(ids))), abs=1e-4)
    greedy = all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][ctxlen:-1],
                                                           lp["top_logprobs"][ctxlen:-1], strict=True))
    assert greedy == all(want[i - 1].argmax().item() == ids[i] for i in range(ctxlen, len(ids)))
    # the generated token is the greedy one: its logprob is the top one, and it is the checkpoint's argmax
    generated = second["logprobs"]
    assert generated["token_logprobs"][-1] == max(generated["top_logprobs"][-1].values())
    assert generated["tokens"][-1] == tokenizer.decode([log_softmax(local_models["dense"], context)[-1].argmax()])


def reference_greedy(model, tokenizer, ids: list[int], steps: int, presence: float, frequency: float,
                     bias: dict[int, float]) -> tuple[list[int], list[float]]:
    """Greedy decoding with OpenAI's formulas written out (reference_decoding): logit + bias - frequency * count -
    presence * (count > 0); also the raw log-probability of each chosen token."""
    ref = reference_decode(model, tokenizer, ids, GenerationConfig(max_new_tokens=steps, greedy=True,
                                                                   presence_penalty=presence,
                                                                   frequency_penalty=frequency, logit_bias=bias))
    return ref.token_ids, ref.logprobs


def test_penalties_and_logit_bias_follow_the_formulas_and_logprobs_stay_raw(server, local_models, tokenizer):
    ids = tokenizer.encode(PROMPTS[1])
    model = local_models["dense"]
    plain, _ = reference_greedy(model, tokenizer, ids, 1, 0, 0, {})
    bias = {plain[0]: -100.0, 1234: 3.0}
    want, raw = reference_greedy(model, tokenizer, ids, 24, 0.5, 1.5, bias)
    r = server.post("/v1/completions", json={"model": "dense", "prompt": PROMPTS[1], "max_tokens": 24,
                                             "temperature": 0, "presence_penalty": 0.5, "frequency_penalty": 1.5,
                                             "logit_bias": {str(k): v for k, v in bias.items()}, "logprobs": 2})
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    assert choice["text"] == tokenizer.decode(want) and want[0] != plain[0]
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(raw, abs=1e-4)  # before penalties and bias
    unpenalized = server.post("/v1/completions", json={"model": "dense", "prompt": PROMPTS[1], "max_tokens": 24,
                                                       "temperature": 0}).json()["choices"][0]["text"]
    assert unpenalized != choice["text"]


SAMPLED = {  # each sampling path of the decoder, with every penalty and a bias; (prompts, n) decide the row indices
    "top-k then top-p": (PROMPTS, 2, dict(temperature=0.9, top_k=30, top_p=0.85, repetition_penalty=1.3,
                                          presence_penalty=0.4, frequency_penalty=0.6, logit_bias={1234: 4.0})),
    "top-p alone (rejection draws)": (PROMPTS[1:], 2, dict(temperature=1.1, top_p=0.8, repetition_penalty=0.9,
                                                            frequency_penalty=1.0, logit_bias={1234: 2.0, 2: -100.0})),
    "all tokens": (PROMPTS[:1], 2, dict(temperature=0.7, presence_penalty=-0.5, frequency_penalty=0.3,
                                        logit_bias={1234: 3.0})),
}


@pytest.mark.parametrize("name", list(SAMPLED))
def test_sampled_penalized_requests_follow_the_formulas_and_the_rows_draws(server, local_models, tokenizer, name):
    """Seeded, n=2: each choice is what the textbook computation (reference_decoding: a full forward per token,
    the formulas, `test_generation.reference_token`'s draw) gives on that sequence's own stream of draws."""
    prompts, n, settings = SAMPLED[name]
    body = {"model": "dense", "prompt": prompts, "max_tokens": 12, "n": n, "seed": 21, "logprobs": 0,
            **settings, "logit_bias": {str(k): v for k, v in settings["logit_bias"].items()}}
    r = server.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    cfg = GenerationConfig(max_new_tokens=12, num_return_sequences=n, seed=21, **settings)
    want = [reference_decode(local_models["dense"], tokenizer, tokenizer.encode(prompts[row // n]), cfg, row)
            for row in range(len(prompts) * n)]
    assert [c["text"] for c in choices] == [w.text for w in want]
    assert [c["finish_reason"] for c in choices] == [w.finish_reason for w in want]
    for choice, w in zip(choices, want, strict=True):  # raw log-probabilities, before every adjustment
        assert choice["logprobs"]["token_logprobs"] == pytest.approx(w.logprobs, abs=1e-4)
    assert r.json()["usage"]["completion_tokens"] == sum(len(w.token_ids) for w in want)
    assert len({w.text for w in want}) == len(want)  # each sequence has its own stream of draws


def test_top_k_minus_one_means_all_tokens(server, local_models, tokenizer):
    """vLLM's `top_k: -1` samples from every token: the same text as top_k 0 (and as no top_k) for the seed, and
    what the reference draws over the whole vocabulary give; a small top_k gives another text."""
    body = {"model": "dense", "prompt": PROMPTS[0], "max_tokens": 16, "seed": 8, "ignore_eos": True}

    def text(**extra) -> str:
        r = server.post("/v1/completions", json={**body, **extra})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    every = text(top_k=-1)
    assert every == text(top_k=0) == text()
    want = reference_decode(local_models["dense"], tokenizer, tokenizer.encode(PROMPTS[0]),
                            GenerationConfig(max_new_tokens=16, seed=8, ignore_eos=True))
    assert every == want.text
    assert text(top_k=2) != every


def test_openai_defaults_nulls_best_of_and_stop_tokens(server, local_models, tokenizer):
    langchain = {"model": "dense", "prompt": [PROMPTS[0]], "temperature": 0.7, "top_p": 1, "frequency_penalty": 0,
                 "presence_penalty": 0, "n": 1, "seed": None, "logprobs": None, "max_tokens": 12, "best_of": None,
                 "logit_bias": None, "echo": None, "stop": None, "suffix": None, "user": None, "stream": False,
                 "stream_options": None, "top_k": None, "min_tokens": None, "stop_token_ids": None}
    r = server.post("/v1/completions", json=langchain)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["logprobs"] is None and r.json()["usage"]["completion_tokens"] <= 12

    sampled = {"model": "dense", "prompt": PROMPTS[0], "max_tokens": 8, "seed": 5, "ignore_eos": True}
    every = server.post("/v1/completions", json={**sampled, "n": 3, "logprobs": 0}).json()
    means = [sum(c["logprobs"]["token_logprobs"]) / 8 for c in every["choices"]]
    best = server.post("/v1/completions", json={**sampled, "n": 1, "best_of": 3}).json()
    assert [c["text"] for c in best["choices"]] == [every["choices"][means.index(max(means))]["text"]]
    assert best["choices"][0]["logprobs"] is None and best["usage"] == every["usage"]  # all 3 were generated

    greedy = server.post("/v1/completions", json={"model": "dense", "prompt": PROMPTS[0], "max_tokens": 6,
                                                  "temperature": 0, "logprobs": 0}).json()["choices"][0]
    ids = generate(local_models["dense"], tokenizer, PROMPTS[0], GenerationConfig(max_new_tokens=6, greedy=True))
    ids = ids[0].token_ids
    assert tokenizer.decode(ids) == greedy["text"]
    stopped = server.post("/v1/completions", json={"model": "dense", "prompt": PROMPTS[0], "max_tokens": 6,
                                                   "temperature": 0, "stop_token_ids": [ids[2]],
                                                   "include_stop_str_in_output": True}).json()["choices"][0]
    assert stopped["finish_reason"] == "stop"
    assert stopped["text"] == tokenizer.decode(ids[:ids.index(ids[2]) + 1])
    echoed = server.post("/generate", json={"model": "dense", "prompt": PROMPTS[0], "max_new_tokens": 6,
                                            "temperature": 0, "echo": True, "logprobs": 0}).json()["completions"][0]
    assert echoed["text"] == PROMPTS[0] + greedy["text"]
    n_prompt = len(tokenizer.encode(PROMPTS[0]))
    assert echoed["logprobs"]["token_logprobs"][n_prompt:] == pytest.approx(greedy["logprobs"]["token_logprobs"],
                                                                            abs=1e-5)


def test_streamed_logprobs_equal_the_whole_answer(server):
    body = {"model": "dense", "prompt": [PROMPTS[0], PROMPTS[1]], "max_tokens": 10, "echo": True, "logprobs": 2,
            "seed": 3, "temperature": 0.9}
    whole = server.post("/v1/completions", json=body).json()["choices"]
    with server.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        chunks = [c for c in sse(r) if c != "[DONE]"]
    for choice in whole:
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == choice["index"]]
        assert all(c["text"] or c["finish_reason"] for c in mine)  # no empty chunk, however they were merged
        assert "".join(c["text"] for c in mine) == choice["text"]
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert [v for c in mine for v in c["logprobs"][key]] == choice["logprobs"][key], key
        assert mine[-1]["finish_reason"] == choice["finish_reason"]


def test_tokenizer_endpoints(server, tokenizer):
    ids = tokenizer.encode(SCORED)
    r = server.post("/tokenize", json={"prompt": SCORED, "add_special_tokens": False})
    assert r.status_code == 200, r.text
    assert r.json() == {"tokens": ids, "count": len(ids), "max_model_len": 256}  # the default model: tiny
    assert server.post("/tokenize", json={"prompt": SCORED, "model": "dense"}).json()["max_model_len"] == 1024
    assert server.post("/detokenize", json={"tokens": ids}).json() == {"prompt": SCORED}
    info = server.get("/tokenizer_info").json()
    assert (info["eos_token"], info["bos_token"], info["pad_token"]) == ("</s>", "<s>", "<pad>")
    assert server.post("/tokenize", json={"prompt": info["eos_token"]}).json()["tokens"] == [tokenizer.eos_id]
    assert info["model_max_length"] == 256 and info["vocab_size"] == len(tokenizer)
    assert server.get("/tokenizer_info", params={"model": "dense"}).json()["model_max_length"] == 1024
    assert server.get("/tokenizer_info", params={"model": "nope"}).status_code == 404


def test_models_are_multiplexed_with_lru_eviction(server, direct):
    cfg = GenerationConfig(max_new_tokens=10, greedy=True)
    texts = {}
    for name in ("tiny", "dense", "tiny2"):  # tiny2 is the third model: the least recently used leaves
        r = server.post("/v1/completions", json={"model": name, "prompt": PROMPTS[0], "max_tokens": 10,
                                                 "temperature": 0})
        assert r.status_code == 200 and r.json()["model"] == name
        texts[name] = r.json()["choices"][0]["text"]
        assert texts[name] == direct(name, PROMPTS[0], cfg)[0]
    assert len(set(texts.values())) == 3  # three different checkpoints answered
    assert set(server.get("/stats").json()["models"]) == {"dense", "tiny2"}
    again = server.post("/v1/completions", json={"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 10,
                                                 "temperature": 0}).json()
    assert again["choices"][0]["text"] == texts["tiny"]  # reloaded on demand
    assert set(server.get("/stats").json()["models"]) == {"tiny2", "tiny"}


LONG_PROMPT = "слово " * 300
BAD_INPUTS = [
    ("/generate", b'{"prompt": "x",', 400, "body"),
    ("/generate", {"prompt": "x", "max_new_tokens": "5"}, 422, "max_new_tokens"),
    ("/generate", {"prompt": ""}, 422, "prompt"),
    ("/generate", {"prompt": []}, 422, "prompt"),
    ("/generate", {"prompt": ["a", ""]}, 422, "prompt"),
    ("/generate", {"max_new_tokens": 4}, 422, "prompt"),
    ("/generate", {"prompt": "x", "max_new_tokens": 1001}, 400, "max_new_tokens"),
    ("/generate", {"prompt": "x", "max_new_tokens": 300}, 400, "max_new_tokens"),  # tiny has 256 positions
    ("/generate", {"prompt": LONG_PROMPT, "max_new_tokens": 4}, 400, "prompt"),
    ("/generate", {"prompt": "x", "temperature": -0.5}, 422, "temperature"),
    ("/generate", {"prompt": "x", "top_p": 0}, 422, "top_p"),
    ("/generate", {"prompt": "x", "top_p": 1.5}, 422, "top_p"),
    ("/generate", {"prompt": "x", "num_return_sequences": 4}, 400, "num_return_sequences"),
    ("/generate", {"prompt": ["x"] * 9, "num_return_sequences": 2}, 400, "num_return_sequences"),
    ("/generate", {"prompt": "x", "stop": [""]}, 422, "stop"),
    ("/generate", {"prompt": "x", "temprature": 1}, 400, "temprature"),
    ("/generate", {"prompt": "x", "model": "nope"}, 404, "model"),
    ("/generate", {"prompt": "x" * (65 * 1024)}, 413, "body"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1001}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 4}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 422, "temperature"),
    ("/v1/completions", {"prompt": "x", "stream": True, "top_p": 2}, 422, "top_p"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 422, "logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": -1}, 422, "logprobs"),
    ("/v1/completions", {"prompt": "x", "echo": "yes"}, 422, "echo"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 422, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, 422, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": -3}, 422, "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, 422, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"five": 1}}, 422, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"-5": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"60000": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "best_of": 0}, 422, "best_of"),
    ("/v1/completions", {"prompt": "x", "n": 2, "best_of": 1}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "best_of": 4}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "best_of": 2, "stream": True}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "suffix": "end"}, 400, "suffix"),
    ("/v1/completions", {"prompt": [5, 60000, 7]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[5], [-1]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[5], []]}, 422, "prompt"),
    ("/v1/completions", {"prompt": [5, "x"]}, 422, "prompt"),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, 422, "top_k"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, 422, "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 422, "n"),
    ("/v1/completions", {"prompt": "x", "seed": "x"}, 422, "seed"),
    ("/v1/completions", {"prompt": "x", "user": 5}, 422, "user"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": "yes"}}, 422, "stream_options"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"continuous_usage_stats": True}}, 400, "stream_options"),
    ("/v1/completions", {"prompt": "x", "min_tokens": 20}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [60000]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": 5}, 422, "stop_token_ids"),
    ("/v1/completions", {"prompt": "x", "ignore_eos": 1}, 422, "ignore_eos"),
    ("/v1/completions", {"prompt": "x", "include_stop_str_in_output": "no"}, 422, "include_stop_str_in_output"),
    ("/v1/completions", {"prompt": "x", "max_new_tokens": 5}, 400, "max_new_tokens"),
    ("/generate", {"prompt": "x", "max_tokens": 5}, 400, "max_tokens"),
    ("/generate", {"prompt": "x", "min_new_tokens": 100}, 400, "min_new_tokens"),
    ("/generate", {"prompt": "x", "best_of": 5}, 400, "best_of"),
    ("/tokenize", {"prompt": 5}, 422, "prompt"),
    ("/tokenize", {"prompt": "x", "messages": []}, 400, "messages"),
    ("/detokenize", {"tokens": [1, 50257]}, 400, "tokens"),
    ("/detokenize", {"tokens": "1 2"}, 422, "tokens"),
]


@pytest.mark.parametrize("path, body, status, param", BAD_INPUTS,
                         ids=[f"{p}-{s}-{f}-{i}" for i, (p, _, s, f) in enumerate(BAD_INPUTS)])
def test_bad_input_is_refused_naming_the_field_then_a_good_request_works(server, path, body, status, param):
    r = server.post(path, content=body) if isinstance(body, bytes) else server.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param
    if status == 404:
        assert "'nope'" in error["message"] and "known: tiny, dense, tiny2" in error["message"]
    else:
        assert error["message"].startswith(f"{param}:")
    good_request(server)


def test_client_disconnect_stops_generation_and_frees_the_slot(server):
    server.post("/generate", json={"prompt": "x", "model": "dense", "max_new_tokens": 1})  # dense is loaded
    before = stats(server, "dense")
    with server.stream("POST", "/generate", json={"prompt": "Привет", "model": "dense", "max_new_tokens": 1000,
                                                  "stream": True}) as r:
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data:")
            if events == 3:
                break  # leaving the block closes the connection mid-stream

    def settled() -> dict | None:
        now = stats(server, "dense")
        return now if now["active_requests"] == 0 else None

    now = poll(settled, 20, "the cancelled request to leave the batch", interval=0.1)
    assert now["active_requests"] == 0 and now["active_rows"] == 0
    assert now["cancelled_requests"] == before["cancelled_requests"] + 1
    assert now["tokens"] - before["tokens"] < 1000
    good_request(server)


# ------------------------------------------------------------------ real clients (the `clients` test extra)

def test_openai_client(server, direct):
    import openai

    client = openai.OpenAI(base_url=f"{str(server.base_url).rstrip('/')}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny", "dense", "tiny2"]
    greedy = direct("dense", PROMPTS[0], GenerationConfig(max_new_tokens=8, greedy=True))[0]
    out = client.completions.create(model="dense", prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=2,
                                    echo=True, extra_body={"top_k": 5, "repetition_penalty": 1.0})
    (choice,) = out.choices
    assert choice.text == PROMPTS[0] + greedy and out.usage.completion_tokens <= 8
    logprobs = choice.logprobs
    assert logprobs.token_logprobs[0] is None and len(logprobs.tokens) == len(logprobs.top_logprobs)
    chunks = list(client.completions.create(model="dense", prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == greedy
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="dense", prompt="x", suffix="y")
    assert e.value.status_code == 400 and e.value.body["param"] == "suffix"
    good_request(server)


def test_langchain_openai_llm_invokes_streams_and_batches(server, direct):
    from langchain_openai import OpenAI

    llm = OpenAI(model="dense", base_url=f"{str(server.base_url).rstrip('/')}/v1", api_key="unused", max_tokens=10,
                 temperature=0, max_retries=0)
    greedy = direct("dense", PROMPTS, GenerationConfig(max_new_tokens=10, greedy=True))
    assert llm.invoke(PROMPTS[0]) == greedy[0]
    assert "".join(llm.stream(PROMPTS[1])) == greedy[1]
    assert llm.batch(PROMPTS) == greedy


LM_EVAL_TASKS = {
    "choice": {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
               "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]},
    "continue": {"output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{target}}",
                 "generation_kwargs": {"until": ["\n", "."], "max_gen_toks": 12, "do_sample": False},
                 "metric_list": [{"metric": "exact_match"}]},
}
LM_EVAL_DOCS = {
    "choice": [{"question": "Мороз и солнце;", "choices": [" день чудесный!", " ночь темна.", " дождь идёт."],
                "answer": 0},
               {"question": "Все счастливые семьи", "choices": [" похожи друг на друга", " несчастливы"],
                "answer": 0},
               {"question": "Я помню чудное", "choices": [" мгновенье", " утро", " окно"], "answer": 0}],
    "continue": [{"prompt": "Мой дядя самых честных правил,", "target": " когда"},
                 {"prompt": "Буря мглою небо кроет,", "target": " вихри"}],
}


def lm_eval_tasks(folder: Path) -> list[str]:
    """Task YAMLs over small local JSON files: no hub access."""
    names = []
    for kind, spec in LM_EVAL_TASKS.items():
        data = folder / f"{kind}.jsonl"
        data.write_text("".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in LM_EVAL_DOCS[kind]))
        task = {"task": f"rugpt_{kind}", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test", **spec}
        (folder / f"rugpt_{kind}.yaml").write_text(yaml.safe_dump(task, allow_unicode=True))
        names.append(f"rugpt_{kind}")
    return names


def test_lm_eval_through_the_server_equals_its_hf_backend(server, local_models, data_dir, tmp_path):
    """lm-evaluation-harness's local-completions (with our tokenizer endpoints) against its own `hf` backend
    on the same checkpoint exported to HF: the same per-item log-likelihoods, greedy flags and generations."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from rugpt_ray.checkpoints import export_hf

    tasks = lm_eval_tasks(tmp_path)
    manager = TaskManager(include_path=str(tmp_path))
    hf = export_hf(local_models["dense"], tmp_path / "hf", tokenizer_folder=data_dir / "tokenizer")
    runs = {}
    for backend, args in [
        ("local-completions", {"model": "dense", "base_url": f"{str(server.base_url).rstrip('/')}/v1/completions",
                               "tokenizer_backend": "remote", "max_length": 1024, "max_retries": 1}),
        ("hf", {"pretrained": str(hf), "dtype": "float32", "device": "cpu"}),
    ]:
        out = lm_eval.simple_evaluate(model=backend, model_args=args, tasks=tasks, task_manager=manager,
                                      batch_size=1, log_samples=True, bootstrap_iters=0)
        runs[backend] = {task: sorted(out["samples"][task], key=lambda s: s["doc_id"]) for task in tasks}
    served, reference = runs["local-completions"], runs["hf"]
    for ours, theirs in zip(served["rugpt_choice"], reference["rugpt_choice"], strict=True):
        assert len(ours["filtered_resps"]) == len(theirs["filtered_resps"]) > 1
        for (ll, greedy), (want_ll, want_greedy) in zip(ours["filtered_resps"], theirs["filtered_resps"], strict=True):
            assert ll == pytest.approx(want_ll, abs=1e-4) and greedy == want_greedy
        assert ours["acc"] == theirs["acc"]
    texts = [s["filtered_resps"] for s in served["rugpt_continue"]]
    assert texts == [s["filtered_resps"] for s in reference["rugpt_continue"]]
    assert any(t[0] for t in texts)  # something was generated


def scrape(port: int, name: str, model: str, application: str = "main") -> dict[str, float]:
    """One metric family's samples for one model of one Serve app on Ray's Prometheus endpoint, summed over the
    other labels: "_count", "_bucket2.5", "_bucketinf", "_total", "" (a gauge) -> value."""
    samples = {}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        if (line.startswith(f"ray_{name}") and f'model="{model}"' in line
                and f'application="{application}"' in line):
            key, value = line.rsplit(" ", 1)
            suffix = key[len(f"ray_{name}"):].split("{")[0]
            le = str(float(key.split('le="')[1].split('"')[0])) if 'le="' in key else ""  # "16" -> "16.0"
            samples[suffix + le] = samples.get(suffix + le, 0.0) + float(value)
    return samples


def test_metrics_reach_rays_prometheus_endpoint(server, ray_metrics_port, tokenizer):
    prompt_tokens = len(tokenizer.encode(PROMPTS[1]))
    for seed in range(3):
        r = server.post("/v1/completions", json={"model": "tiny2", "prompt": PROMPTS[1], "max_tokens": 20,
                                                 "seed": seed, "ignore_eos": True})
        assert r.json()["usage"]["completion_tokens"] == 20

    def exported() -> dict[str, float] | None:
        samples = scrape(ray_metrics_port, "rugpt_generation_tokens", "tiny2")
        return samples if samples.get("_total", 0) >= 60 else None

    generated = poll(exported, 60, "tiny2's 60 tokens on Ray's metrics endpoint (exported every 10 s)", interval=1)
    assert generated["_total"] >= 60, generated
    assert scrape(ray_metrics_port, "rugpt_prompt_tokens", "tiny2")["_total"] >= 3 * prompt_tokens
    ttft = scrape(ray_metrics_port, "rugpt_time_to_first_token_seconds", "tiny2")
    itl = scrape(ray_metrics_port, "rugpt_inter_token_latency_seconds", "tiny2")
    e2e = scrape(ray_metrics_port, "rugpt_request_latency_seconds", "tiny2")
    assert ttft["_count"] >= 3 and itl["_count"] >= 3 * 19 and e2e["_count"] >= 3
    for latency in (ttft, itl, e2e):  # every value lands in a finite bucket: none is negative or over 2 min
        assert latency["_bucketinf"] == latency["_bucket120.0"] == latency["_count"]
    assert e2e["_count"] <= ttft["_count"]  # every finished request had a first token
    rows = scrape(ray_metrics_port, "rugpt_decode_step_rows", "tiny2")
    assert rows["_count"] >= 19 and rows["_bucket16.0"] == rows["_count"]  # never more rows than max_batch_size
    running = scrape(ray_metrics_port, "rugpt_running_requests", "tiny2")
    waiting = scrape(ray_metrics_port, "rugpt_waiting_requests", "tiny2")
    assert running == {"": 0.0} and waiting == {"": 0.0}  # all done


# ------------------------------------------------------------------ LoRA adapters, routing by the body's model

@pytest.fixture(scope="module")
def adapters(checkpoints, make_adapter, tmp_path_factory) -> dict[str, Path]:
    """Two adapters trained (here: drawn) on the `tiny` checkpoint, one on the `tiny2` checkpoint."""
    root, tiny = tmp_path_factory.mktemp("adapters"), preset("tiny")
    return {"a1": make_adapter(tiny, 1, 11, root / "a1", base_source=str(checkpoints["tiny"])),
            "a2": make_adapter(tiny, 1, 12, root / "a2", targets=("c_fc",), base_source=str(checkpoints["tiny"])),
            "wrong": make_adapter(tiny, 3, 13, root / "wrong", base_source=str(checkpoints["tiny2"]))}


@pytest.fixture(scope="module")
def routed(server, checkpoints, adapters, data_dir):
    """A second app beside `server`'s: two server replicas, two models and three adapters on `tiny` (one of them
    made for `tiny2`), room for every name in each replica."""
    from ray import serve

    from rugpt_ray.serving.app import serve_app

    cfg = ServeConfig(models={"tiny": str(checkpoints["tiny"]), "tiny2": str(checkpoints["tiny2"])},
                      adapters={name: {"path": str(path), "base": "tiny"} for name, path in adapters.items()},
                      tokenizer=str(data_dir / "tokenizer"), max_models_per_replica=5)
    serve.run(serve_app(cfg, num_replicas=2, ray_actor_options={"num_cpus": 0.5}), name="routed",
              route_prefix="/routed")
    with httpx.Client(base_url=f"{str(server.base_url).rstrip('/')}/routed", timeout=120) as client:
        yield client
    serve.delete("routed")


def test_requests_go_to_a_replica_that_has_their_model_with_no_header(routed, ray_metrics_port):
    """First on the app: nothing but the default model is loaded yet (concurrent first requests for one model may
    load it on both replicas, as the next test's do)."""
    names = ["tiny2", "a1", "a2", "tiny"]

    def picked_holds(name: str) -> bool:
        """Whether the replica Serve's router picks for `name` has it: a GET /stats naming it is routed as a request
        for it is, and loads nothing."""
        loaded = routed.get("/stats", params={"model": name}).json()["models"]
        return name in loaded or any(name in model["adapters"] for model in loaded.values())

    def routers_know() -> bool:
        """A router that does not know yet picks one of the replicas holding the fewest models: ten right picks
        in a row for each name."""
        return all(picked_holds(name) for name in names[:3] for _ in range(10))

    generated = 0
    for rounds in range(3):
        for name in names:
            r = routed.post("/v1/completions", json={"model": name, "prompt": PROMPTS[1], "max_tokens": 2})
            assert r.status_code == 200 and r.json()["model"] == name, r.text
            generated += r.json()["usage"]["completion_tokens"]
        if rounds == 0:  # replicas tell Serve's routers what they hold through the controller (< 1 s when idle)
            poll(routers_know, 60, "Serve's routers to send each model's requests to the replica holding it")

    def scraped(family: str, model: str) -> float:
        return scrape(ray_metrics_port, family, model, "routed").get("_total", 0.0)

    # Ray exports each replica's metrics every 10 s, all of a process's at once: once every generated token shows
    # (counted when a request ends, after any load it caused), so does every load
    poll(lambda: sum(scraped("rugpt_generation_tokens", base) for base in ("tiny", "tiny2")) >= generated, 60,
         f"the app's {generated} generated tokens on Ray's metrics endpoint")
    assert sum(scraped("rugpt_generation_tokens", base) for base in ("tiny", "tiny2")) == generated
    # each name loaded once over both replicas; tiny twice: each replica starts with its default model loaded
    assert {name: scraped("rugpt_model_loads", name) for name in names} == {"tiny2": 1, "a1": 1, "a2": 1, "tiny": 2}


def test_adapters_and_their_base_answer_side_by_side_as_generate_does(routed, checkpoints, adapters, tokenizer):
    listed = {m["id"]: m["parent"] for m in routed.get("/v1/models").json()["data"]}
    assert listed == {"tiny": None, "tiny2": None, "a1": "tiny", "a2": "tiny", "wrong": "tiny"}
    cfg = GenerationConfig(max_new_tokens=16, greedy=True)
    expected = {"tiny": generate(load_model(checkpoints["tiny"]), tokenizer, PROMPTS[0], cfg)[0].text}
    for name in ("a1", "a2"):  # `generate` on the base with that adapter
        model = apply_adapter(load_model(checkpoints["tiny"]), load_adapter(adapters[name]))
        expected[name] = generate(model, tokenizer, PROMPTS[0], cfg)[0].text
    assert len(set(expected.values())) == 3

    async def together():
        async with httpx.AsyncClient(base_url=str(routed.base_url), timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json={
                "model": name, "prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0}) for name in [*expected] * 2))

    answers = asyncio.run(together())
    assert [r.json()["choices"][0]["text"] for r in answers] == [*expected.values()] * 2
    assert [r.json()["model"] for r in answers] == [*expected] * 2

    wrong = routed.post("/v1/completions", json={"model": "wrong", "prompt": "x", "max_tokens": 2})
    message = wrong.json()["error"]["message"]
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "model", wrong.text
    assert message.startswith("model 'wrong': ") and str(checkpoints["tiny2"]) in message, message
    assert "model 'tiny' has other weights" in message, message


def test_serve_configs_are_valid_serve_configs():
    from ray.serve.schema import ServeDeploySchema

    for name in ("local.yaml", "gpu.yaml"):
        config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "serve_configs" / name).read_text()))
        (app,) = config.applications
        assert app.import_path == "rugpt_ray.serving.app:build_app"
        assert [d.name for d in app.deployments] == ["RuGPTServer"]
        ServeConfig.model_validate(app.args)  # every builder arg is known and well-typed
    local = yaml.safe_load((REPO / "serve_configs" / "local.yaml").read_text())
    assert local["http_options"]["host"] == "127.0.0.1"


def test_serve_run_local_yaml(tmp_path, checkpoints, data_dir):
    """`serve run serve_configs/local.yaml` with the model from $RUGPT_SERVE_MODEL (on a free port)."""
    config = yaml.safe_load((REPO / "serve_configs" / "local.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "RUGPT_SERVE_MODEL": str(checkpoints["tiny"]), "RUGPT_DATA": str(data_dir)}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "serve"), "run", str(tmp_path / "local.yaml")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}/healthz", proc)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                       json={"model": "demo", "prompt": "Пушкин родился в", "max_tokens": 5}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "demo" and r.json()["usage"]["completion_tokens"] == 5
        body = {"model": "demo", "prompt": "Пушкин родился в", "max_tokens": 48, "seed": 5, "logprobs": 0}
        plain = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60).json()
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json={**body, "stream": True},
                          timeout=60) as r:
            chunks = [c["choices"][0] for c in sse(r)[:-1]]
        (whole,) = plain["choices"]
        assert "".join(c["text"] for c in chunks) == whole["text"]
        # stream_interval_s (0.05 in local.yaml) merges tokens into chunks; how many depends on the machine's
        # speed (test_engine tests the rule on a scripted clock), what holds on any machine: every token is in
        # exactly one chunk, in order; a chunk has text or the end (held-back text waits); only the last ends
        assert [t for c in chunks for t in c["logprobs"]["tokens"]] == whole["logprobs"]["tokens"]
        assert [v for c in chunks for v in c["logprobs"]["token_logprobs"]] == whole["logprobs"]["token_logprobs"]
        assert 1 <= len(chunks) <= plain["usage"]["completion_tokens"] + 1  # + an EOS-only end
        assert all(c["text"] or c["finish_reason"] for c in chunks)
        assert [c["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [whole["finish_reason"]]
        chat = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
            "model": "demo", "messages": [{"role": "user", "content": "Привет"}], "max_tokens": 5})
        assert chat.status_code == 200 and chat.json()["object"] == "chat.completion", chat.text  # its template
        # the config reserves no CPUs: the replica takes every CPU of the machine, and decodes on as many threads
        stats = httpx.get(f"http://127.0.0.1:{port}/stats", timeout=60).json()
        assert stats["torch_threads"] == len(os.sched_getaffinity(0)), stats
    finally:
        stop_server(proc)


def test_cli_serve_int8_with_api_key_timeout_and_clean_shutdown(checkpoints, adapters, data_dir, tokenizer):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    code = "import sys; from rugpt_ray.cli import main; sys.exit(main(sys.argv[1:]))"
    # every decode step of the server's engines is followed by a 20 ms pause (the engine's test seam, inherited by
    # the replicas): the 1000-token requests below take 1000 steps, so at least 20 s, and cannot end before their
    # 5 s timeout however fast the machine is; the 4-token requests take 80 ms more, which leaves them the rest of
    # the 5 s on a loaded machine
    env = {**os.environ, "RUGPT_TEST_API_KEY": "s3cret", STEP_PAUSE_ENV: "0.02"}
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--model", str(checkpoints["tiny"]),
                             "--model", f"dense={checkpoints['dense']}", "--adapter", str(adapters["a1"]),
                             "--tokenizer", str(data_dir / "tokenizer"),
                             "--port", str(port), "--api-key-env", "RUGPT_TEST_API_KEY", "--request-timeout", "5",
                             "--max-new-tokens", "1000", "--dtype", "int8"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    auth = {"Authorization": "Bearer s3cret"}
    try:
        wait_ready(f"{base}/healthz", proc)  # health needs no key
        missing = httpx.get(f"{base}/v1/models")
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.post(f"{base}/generate", json={"prompt": "x"}).status_code == 401
        assert httpx.post(f"{base}/v1/chat/completions", json={"messages": []}).status_code == 401
        assert httpx.post(f"{base}/tokenize", json={"prompt": "x"}).status_code == 401
        assert httpx.get(f"{base}/tokenizer_info").status_code == 401
        assert httpx.post(f"{base}/tokenize", json={"prompt": "x"}, headers=auth).json()["count"] == 1
        models = httpx.get(f"{base}/v1/models", headers=auth).json()
        # a bare path is named after its folder; adapters run on the first model
        assert [(m["id"], m["parent"]) for m in models["data"]] == [("tiny", None), ("dense", None), ("a1", "tiny")]

        slow = {"prompt": "Привет", "model": "dense", "max_tokens": 1000, "n": 3, "ignore_eos": True}  # 1000 steps

        def streamed() -> tuple[int, list[dict]]:
            with httpx.stream("POST", f"{base}/v1/completions", json={**slow, "stream": True}, headers=auth,
                              timeout=60) as r:
                return r.status_code, sse(r)

        with ThreadPoolExecutor(1) as pool:  # both time out together
            stream = pool.submit(streamed)
            r = httpx.post(f"{base}/v1/completions", json=slow, headers=auth, timeout=60)
            status, chunks = stream.result()
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        assert status == 200 and chunks[-1]["error"]["code"] == "request_timeout"
        # int8 weights, and the adapter on the int8 base: what the same models make here
        greedy = GenerationConfig(max_new_tokens=4, greedy=True)
        int8 = with_dtype(load_model(checkpoints["tiny"]), "int8")
        want = {"tiny": generate(int8, tokenizer, "Привет", greedy)[0].text,
                "a1": generate(apply_adapter(int8, load_adapter(adapters["a1"])), tokenizer, "Привет", greedy)[0].text}
        for name, text in want.items():
            r = httpx.post(f"{base}/v1/completions", json={"prompt": "Привет", "max_tokens": 4, "model": name,
                                                           "temperature": 0}, headers=auth, timeout=60)
            assert r.status_code == 200 and r.json()["model"] == name
            assert r.json()["choices"][0]["text"] == text, name
    finally:
        out = stop_server(proc, signal.SIGINT)  # Ctrl-C (test_graceful_stop stops a server with SIGTERM)
    assert proc.returncode == 0, out[-3000:]
    assert "stopping" in out and "stopped\n" in out and "Traceback" not in out, out[-3000:]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base}/healthz", timeout=2)
