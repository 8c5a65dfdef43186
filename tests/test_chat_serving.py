"""`POST /v1/chat/completions` over real Ray Serve on 127.0.0.1: a chat answers as `generate` does on the conversation
its template renders, whichever way the template comes (the checkpoint's, the Serve config's, the request's, an
adapter's), streamed or not; bad requests are 400s naming the field; real chat clients work against it."""

import json
import subprocess
import sys

import pytest
import torch
from app_client import app_client
from test_serving import DENSE, sse

from rugpt_ray.chat import CHAT_TEMPLATE_FILE, DEFAULT_CHAT_TEMPLATE, chat_template_source, render_chat
from rugpt_ray.checkpoints import load_model, save_native
from rugpt_ray.config import preset
from rugpt_ray.generation import GenerationConfig, generate
from rugpt_ray.lora import apply_adapter, load_adapter
from rugpt_ray.serving import ServeConfig

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("serving")]

BUILTIN = chat_template_source(DEFAULT_CHAT_TEMPLATE)
CONFIGURED = ("{%- for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor -%}"
              "{%- if add_generation_prompt %}assistant:{% endif %}")
ADAPTERS_OWN = "{%- for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
CHAT = [{"role": "system", "content": "Ты поэт."}, {"role": "user", "content": "Мороз и солнце;"}]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, make_model, make_adapter) -> dict:
    """`chat` has its own template; `configured` gets one from the Serve config (a file); `plain` has none. The
    adapter `tuned` (on plain) has its own; `inherits` (on configured) has none."""
    root = tmp_path_factory.mktemp("chat")
    (root / "configured.jinja").write_text(CONFIGURED)
    tiny = preset("tiny")
    paths = {"chat": save_native(make_model(DENSE, seed=2), root / "chat", chat_template=BUILTIN),
             "configured": save_native(make_model(tiny, seed=1), root / "configured"),
             "plain": save_native(make_model(tiny, seed=3), root / "plain"),
             "tuned": make_adapter(tiny, 3, 21, root / "tuned", base_source=str(root / "plain")),
             "inherits": make_adapter(tiny, 1, 22, root / "inherits", base_source=str(root / "configured")),
             "template": root / "configured.jinja"}
    (paths["tuned"] / CHAT_TEMPLATE_FILE).write_text(ADAPTERS_OWN)
    return paths


@pytest.fixture(scope="module")
def server(ray_local, checkpoints, data_dir):
    cfg = ServeConfig.from_dict({
        "models": {"chat": str(checkpoints["chat"]), "plain": str(checkpoints["plain"]),
                   "configured": {"path": str(checkpoints["configured"]),
                                  "chat_template": str(checkpoints["template"])}},
        "adapters": {"tuned": {"path": str(checkpoints["tuned"]), "base": "plain"},
                     "inherits": {"path": str(checkpoints["inherits"]), "base": "configured"}},
        "tokenizer": str(data_dir / "tokenizer"), "max_new_tokens": 200, "max_n": 3, "max_models_per_replica": 5})
    with app_client(cfg, "chat") as client:
        yield client


@pytest.fixture(scope="module")
def models(checkpoints) -> dict:
    """What each served name runs, in this process."""
    out = {name: load_model(checkpoints[name]) for name in ("chat", "configured", "plain")}
    for name, base in (("tuned", "plain"), ("inherits", "configured")):
        out[name] = apply_adapter(load_model(checkpoints[base]), load_adapter(checkpoints[name]))
    return out


def greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    return generate(model, tokenizer, prompt, GenerationConfig(max_new_tokens=max_new_tokens, greedy=True))[0].text


def chat(server, **body) -> dict:
    r = server.post("/v1/chat/completions", json={"messages": CHAT, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_greedy_chat_answers_as_generate_does_on_the_rendered_conversation(server, models, tokenizer):
    prompt = render_chat(BUILTIN, CHAT, add_generation_prompt=True)
    assert prompt.endswith("<s>assistant\n")
    out = chat(server, model="chat", temperature=0, max_completion_tokens=12)
    assert out["id"].startswith("chatcmpl-") and out["object"] == "chat.completion" and out["model"] == "chat"
    (choice,) = out["choices"]
    assert choice["message"] == {"role": "assistant", "content": greedy(models["chat"], tokenizer, prompt, 12)}
    assert choice["message"]["content"] and choice["finish_reason"] in ("stop", "length") and choice["logprobs"] is None
    n_prompt = len(tokenizer.encode(prompt))
    assert out["usage"]["prompt_tokens"] == n_prompt
    assert out["usage"]["total_tokens"] == n_prompt + out["usage"]["completion_tokens"]
    parts = [{**m, "content": [{"type": "text", "text": m["content"][:4]}, {"type": "text", "text": m["content"][4:]}]}
             for m in CHAT]  # text parts are joined by newlines
    joined = [{**m, "content": m["content"][:4] + "\n" + m["content"][4:]} for m in CHAT]
    want = greedy(models["chat"], tokenizer, render_chat(BUILTIN, joined, add_generation_prompt=True), 12)
    assert chat(server, model="chat", messages=parts, temperature=0, max_tokens=12)["choices"][0]["message"][
        "content"] == want


def test_the_answer_is_a_completion_of_the_rendered_prompt(server, tokenizer):
    """n=2, seeded: the same sequences (and usage) as /v1/completions gives for the rendered conversation."""
    prompt = render_chat(BUILTIN, CHAT, add_generation_prompt=True)
    sampled = {"model": "chat", "n": 2, "seed": 4, "temperature": 0.9, "top_k": 50}
    out = chat(server, **sampled, max_completion_tokens=10, max_tokens=3)  # max_completion_tokens wins
    completions = server.post("/v1/completions", json={**sampled, "prompt": prompt, "max_tokens": 10}).json()
    assert [c["message"]["content"] for c in out["choices"]] == [c["text"] for c in completions["choices"]]
    assert [c["index"] for c in out["choices"]] == [0, 1] and out["usage"] == completions["usage"]
    assert out["choices"][0]["message"]["content"] != out["choices"][1]["message"]["content"]
    assert chat(server, **sampled, max_tokens=10)["choices"] == out["choices"]  # the seed decides


def test_streamed_chat_equals_the_whole_answer_in_vllms_chunk_order(server):
    body = {"model": "chat", "n": 2, "seed": 9, "temperature": 0.8, "max_completion_tokens": 16, "logprobs": True,
            "top_logprobs": 2}
    whole = chat(server, **body)
    with server.stream("POST", "/v1/chat/completions", json={"messages": CHAT, **body, "stream": True,
                                                             "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and {c["object"] for c in chunks} == {"chat.completion.chunk"}
    *deltas, usage = chunks
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    for choice in whole["choices"]:
        mine = [c["choices"][0] for c in deltas if c["choices"][0]["index"] == choice["index"]]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}  # role first
        assert all(set(c["delta"]) == {"content"} for c in mine[1:])
        assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + [choice["finish_reason"]]
        assert "".join(c["delta"]["content"] for c in mine) == choice["message"]["content"]
        assert [t for c in mine[1:] for t in c["logprobs"]["content"]] == choice["logprobs"]["content"]
        assert all(c["delta"]["content"] or c["finish_reason"] for c in mine[1:])  # no empty chunk after the role
    first_content = min(i for i, c in enumerate(deltas) if c["choices"][0]["delta"].get("content"))
    assert all("role" in c["choices"][0]["delta"] for c in deltas[:2]) and first_content >= 2  # both roles lead


def test_chat_logprobs_are_the_completions_logprobs_in_chats_format(server, tokenizer):
    prompt = render_chat(BUILTIN, CHAT, add_generation_prompt=True)
    out = chat(server, model="chat", max_completion_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    (choice,) = out["choices"]
    completion = server.post("/v1/completions", json={"model": "chat", "prompt": prompt, "max_tokens": 8,
                                                      "temperature": 0, "logprobs": 3}).json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert [t["token"] for t in content] == completion["logprobs"]["tokens"]
    assert [t["logprob"] for t in content] == completion["logprobs"]["token_logprobs"]
    assert b"".join(bytes(t["bytes"]) for t in content).decode() == choice["message"]["content"]
    for token, top in zip(content, completion["logprobs"]["top_logprobs"], strict=True):
        assert len(token["top_logprobs"]) == 3  # the 3 likeliest only (completions add the chosen one)
        assert {t["token"]: t["logprob"] for t in token["top_logprobs"]}.items() <= top.items()
        assert token["logprob"] == token["top_logprobs"][0]["logprob"]  # greedy: the chosen one is the likeliest
        assert all(bytes(t["bytes"]).decode(errors="replace") == t["token"] for t in token["top_logprobs"])
    zero = chat(server, model="chat", max_completion_tokens=2, logprobs=True)["choices"][0]["logprobs"]["content"]
    assert [t["top_logprobs"] for t in zero] == [[], []]


def test_templates_come_from_the_checkpoint_the_config_the_request_or_the_adapter(server, models, tokenizer):
    def answer(name: str, **body) -> str:
        return chat(server, model=name, temperature=0, max_completion_tokens=10, **body)["choices"][0]["message"][
            "content"]

    def expected(name: str, template: str) -> str:
        return greedy(models[name], tokenizer, render_chat(template, CHAT, add_generation_prompt=True), 10)

    assert answer("configured") == expected("configured", CONFIGURED)  # the Serve config's file
    assert answer("configured", chat_template=BUILTIN) == expected("configured", BUILTIN)  # the request's wins
    assert answer("tuned") == expected("tuned", ADAPTERS_OWN)  # the adapter's own; its base has none
    assert answer("inherits") == expected("inherits", CONFIGURED)  # none of its own: its base's
    assert answer("plain", chat_template=BUILTIN) == expected("plain", BUILTIN)
    assert len({expected("configured", CONFIGURED), expected("configured", BUILTIN)}) == 2

    r = server.post("/v1/chat/completions", json={"model": "plain", "messages": CHAT})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "chat_template", r.text
    assert error["message"].startswith("chat_template: model 'plain' has none. As of transformers v4.44, default "
                                       "chat template is no longer allowed, so you must provide a chat template if "
                                       "the tokenizer does not define one.")
    assert "`models:`" in error["message"] and "rugpt3-chat" in error["message"]


@pytest.mark.parametrize("flags, sampling", [
    (["--greedy"], {"temperature": 0}), (["--temperature", "0.8", "--seed", "5"], {"temperature": 0.8, "seed": 5})])
def test_an_adapter_answers_as_the_command_line_does_on_its_merged_export(server, checkpoints, data_dir, tmp_path,
                                                                         flags, sampling):
    """The served adapter (unmerged: its rows go through the per-row LoRA layers) against `rugpt-ray generate` on
    `rugpt-ray export --merge`, for the conversation the adapter's own template renders."""
    cli = [sys.executable, "-m", "rugpt_ray.cli"]
    merged = tmp_path / "merged"
    subprocess.run([*cli, "export", str(checkpoints["tuned"]), str(merged), "--merge"], check=True, timeout=300)
    assert (merged / CHAT_TEMPLATE_FILE).read_text() == ADAPTERS_OWN  # the merge keeps the adapter's template
    prompt = render_chat(ADAPTERS_OWN, CHAT, add_generation_prompt=True)
    served = chat(server, model="tuned", max_completion_tokens=12, **sampling)["choices"][0]["message"]["content"]
    out = subprocess.run([*cli, "generate", "--model", str(merged), "--tokenizer", str(data_dir / "tokenizer"),
                          "--prompt", prompt, "--max-new-tokens", "12", *flags],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert served and out.stdout == prompt + served + "\n"


def test_continue_final_message_and_echo(server, models, tokenizer):
    started = [*CHAT, {"role": "assistant", "content": "День"}]
    prompt = render_chat(BUILTIN, started, continue_final_message=True)
    assert prompt.endswith("День")  # inside the last message: no end of turn
    out = chat(server, model="chat", messages=started, add_generation_prompt=False, continue_final_message=True,
               temperature=0, max_completion_tokens=8, echo=True)
    assert out["choices"][0]["message"]["content"] == "День" + greedy(models["chat"], tokenizer, prompt, 8)
    body = {"model": "chat", "messages": started, "add_generation_prompt": False, "continue_final_message": True,
            "temperature": 0, "max_completion_tokens": 8, "echo": True, "stream": True}
    with server.stream("POST", "/v1/chat/completions", json=body) as r:
        deltas = [c["choices"][0]["delta"] for c in sse(r)[:-1]]
    assert deltas[:2] == [{"role": "assistant", "content": ""}, {"content": "День"}]  # the echo follows the role
    assert "".join(d["content"] for d in deltas) == out["choices"][0]["message"]["content"]


BAD_CHATS = [
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages", "message 0 has the unknown role 'robot'"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages", "message 0 has the unknown role 'tool'"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "not supported"),
    ({"functions": [{"name": "f"}]}, 400, "functions", "not supported"),
    ({"top_logprobs": 2}, 400, "top_logprobs", "needs logprobs: true"),
    ({"logprobs": True, "top_logprobs": 21}, 422, "top_logprobs", ""),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options", "only with stream: true"),
    ({"continue_final_message": True}, 400, "continue_final_message", "cannot be true with add_generation_prompt"),
    ({"max_completion_tokens": 201}, 400, "max_completion_tokens", "201 is over the limit of 200"),
    ({"max_tokens": 201}, 400, "max_tokens", "201 is over the limit of 200"),
    ({"max_completion_tokens": 0}, 400, "max_completion_tokens", "0 generates nothing"),
    ({"max_completion_tokens": 1000, "model": "configured"}, 400, "max_completion_tokens", "1000 is over"),
    ({"n": 4}, 400, "n", "4 is over the limit of 3"),
    ({"min_tokens": 50, "max_tokens": 10}, 400, "min_tokens", "50 is over the most tokens to generate (10)"),
    ({"messages": [{"role": "user", "content": "слово " * 1100}]}, 400, "messages", "prompt 0 has"),
    ({"messages": []}, 422, "messages", ""),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages",
     "message 0 has content of type 'image_url'; only text parts are supported"),
    ({"messages": [{"role": "user"}]}, 422, "messages", ""),
    ({"max_token": 5}, 400, "max_token", "not a field of this endpoint (did you mean 'max_tokens'?)"),
    ({"chat_template": "{% for %}"}, 400, "chat_template", "chat template"),
    ({"chat_template_kwargs": {"messages": []}}, 400, "chat_template_kwargs", "'messages' is reserved"),
    ({"model": "nope"}, 404, "model", "model 'nope' is not served here"),
]


@pytest.mark.parametrize("body, status, param, message", BAD_CHATS,
                         ids=[f"{s}-{p}-{i}" for i, (_, s, p, _) in enumerate(BAD_CHATS)])
def test_bad_chats_are_refused_naming_the_field_then_a_chat_works(server, body, status, param, message):
    r = server.post("/v1/chat/completions", json={"model": "chat", "messages": CHAT, **body})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert error["message"].startswith(f"{param}: {message}" if status != 404 else message), error["message"]
    assert chat(server, model="chat", max_completion_tokens=2)["usage"]["completion_tokens"] <= 2


def test_a_chat_with_no_length_may_fill_the_context(server, tokenizer):
    """No max_tokens: up to the server's limit (200) or the model's room, whichever is less (tiny: 256 positions)."""
    long = [{"role": "user", "content": "слово " * 60}]
    out = chat(server, model="configured", messages=long, ignore_eos=True)
    prompt = len(tokenizer.encode(render_chat(CONFIGURED, long, add_generation_prompt=True)))
    assert out["usage"]["prompt_tokens"] == prompt and out["usage"]["completion_tokens"] == min(200, 256 - prompt)
    assert out["choices"][0]["finish_reason"] == "length"


def test_chat_logprobs_agree_with_the_checkpoint(server, models, tokenizer):
    prompt = tokenizer.encode(render_chat(BUILTIN, CHAT, add_generation_prompt=True))
    out = chat(server, model="chat", max_completion_tokens=5, temperature=0, logprobs=True, top_logprobs=1)
    ids = prompt + [tokenizer.encode(t["token"])[0] for t in out["choices"][0]["logprobs"]["content"]]
    with torch.no_grad():
        want = models["chat"](torch.tensor([ids]))[0][0].float().log_softmax(-1)
    for i, token in enumerate(out["choices"][0]["logprobs"]["content"]):
        assert token["logprob"] == pytest.approx(want[len(prompt) - 1 + i, ids[len(prompt) + i]].item(), abs=1e-4)
    assert json.dumps(out, ensure_ascii=False)  # plain JSON all the way


# ------------------------------------------------------------------ real clients (the `clients` test extra)

def test_openai_client_chat(server, models, tokenizer):
    import openai

    client = openai.OpenAI(base_url=f"{str(server.base_url).rstrip('/')}/v1", api_key="unused", max_retries=0)
    want = greedy(models["chat"], tokenizer, render_chat(BUILTIN, CHAT, add_generation_prompt=True), 8)
    out = client.chat.completions.create(model="chat", messages=CHAT, max_completion_tokens=8, temperature=0,
                                         logprobs=True, top_logprobs=2)
    (choice,) = out.choices
    assert choice.message.role == "assistant" and choice.message.content == want
    assert b"".join(bytes(t.bytes) for t in choice.logprobs.content).decode() == want
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == t.logprob for t in choice.logprobs.content)
    chunks = list(client.chat.completions.create(model="chat", messages=CHAT, max_completion_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    pair = client.chat.completions.create(model="chat", messages=CHAT, max_completion_tokens=8, n=2, seed=3)
    again = client.chat.completions.create(model="chat", messages=CHAT, max_completion_tokens=8, n=2, seed=3)
    assert [c.message.content for c in pair.choices] == [c.message.content for c in again.choices]
    assert [c.index for c in pair.choices] == [0, 1]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="chat", messages=CHAT, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}])
    assert e.value.status_code == 400 and e.value.body["param"] == "tools"


def test_langchain_chat_openai_invokes_streams_and_batches(server, models, tokenizer):
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="chat", base_url=f"{str(server.base_url).rstrip('/')}/v1", api_key="unused", max_tokens=10,
                     temperature=0, max_retries=0)
    conversations = [[SystemMessage(CHAT[0]["content"]), HumanMessage(CHAT[1]["content"])],
                     [HumanMessage("Я помню чудное мгновенье")]]
    want = [greedy(models["chat"], tokenizer, render_chat(BUILTIN, [{"role": m.type.replace("human", "user"),
                                                                     "content": m.content} for m in messages],
                                                          add_generation_prompt=True), 10)
            for messages in conversations]
    assert llm.invoke(conversations[0]).content == want[0]
    assert "".join(chunk.content for chunk in llm.stream(conversations[1])) == want[1]
    assert [m.content for m in llm.batch(conversations)] == want


def test_lm_eval_chat_completions_equal_its_hf_backend(server, models, data_dir, tmp_path):
    """lm-evaluation-harness's local-chat-completions with --apply_chat_template against its own `hf` backend on the
    same checkpoint exported to HF with the same template: the same generations."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from test_serving import lm_eval_tasks

    from rugpt_ray.checkpoints import export_hf

    task = "rugpt_continue"
    assert task in lm_eval_tasks(tmp_path)
    manager = TaskManager(include_path=str(tmp_path))
    hf = export_hf(models["chat"], tmp_path / "hf", tokenizer_folder=data_dir / "tokenizer", chat_template=BUILTIN)
    assert (hf / CHAT_TEMPLATE_FILE).read_text() == BUILTIN
    runs = {}
    for backend, args in [
        ("local-chat-completions", {"model": "chat", "max_retries": 1,
                                    "base_url": f"{str(server.base_url).rstrip('/')}/v1/chat/completions"}),
        ("hf", {"pretrained": str(hf), "dtype": "float32", "device": "cpu"}),
    ]:
        out = lm_eval.simple_evaluate(model=backend, model_args=args, tasks=[task], task_manager=manager,
                                      batch_size=1, log_samples=True, bootstrap_iters=0, apply_chat_template=True)
        runs[backend] = [s["filtered_resps"] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]
    assert runs["local-chat-completions"] == runs["hf"]
    assert any(r[0] for r in runs["hf"])  # something was generated
