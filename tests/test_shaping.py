"""Response shaping without HTTP: a request's token events, as the engine yields them, read back in each endpoint's
shape, whole and streamed."""

import json

import pytest

from rugpt_ray.generation import TokenEvent, TokenLogprob, Transcript
from rugpt_ray.serving.chat_completions import ChatChoices, ChatResponses
from rugpt_ray.serving.completions import Choices, CompletionResponses, GenerateResponses
from rugpt_ray.serving.streaming import DONE

PROMPT = "Мороз и солнце;"
OUTPUTS = [" день чудесный!", " ночь темна"]


def events_of(tokenizer, row: int, text: str, finish: str, first_logprob: float = -1.0,
              prompt_logprobs: list[TokenLogprob] | None = None) -> list[TokenEvent]:
    """The engine's events for one sequence generating `text`: one per token, with made-up log-probabilities
    (token i: first_logprob - i / 10; its top-2: id 5 then id 6)."""
    ids = tokenizer.encode(text)
    events = []
    for i, token in enumerate(ids):
        piece = tokenizer.decode(ids[:i + 1])[len(tokenizer.decode(ids[:i])):]
        events.append(TokenEvent(row, token, piece, finish if i == len(ids) - 1 else None,
                                 first_logprob - i / 10, [(5, -0.1), (6, -0.2)],
                                 prompt_logprobs if i == 0 else None))
    assert "".join(e.text for e in events) == text  # every token is whole characters
    return events


@pytest.fixture
def request_events(tokenizer):
    """A prompt, two sequences of it (each a list of events), as one request with n=2 and echo'd logprobs."""
    prompt = tokenizer.encode(PROMPT)
    scored = [TokenLogprob(prompt[0], None, None)] + [TokenLogprob(t, -2.0, [(5, -0.1), (6, -0.2)])
                                                       for t in prompt[1:]]
    rows = [events_of(tokenizer, row, text, "stop" if row == 0 else "length", -1.0 - row, scored)
            for row, text in enumerate(OUTPUTS)]
    return prompt, rows


def transcript_of(prompt: list[int], rows: list[list[TokenEvent]]) -> Transcript:
    transcript = Transcript([prompt], len(rows))
    for events in rows:
        transcript.add(events)
    return transcript


def test_completion_object(tokenizer, request_events):
    prompt, rows = request_events
    choices = Choices(tokenizer, [prompt], 2, echo=False, logprobs=2)
    out = CompletionResponses("m", choices, n=2).whole(transcript_of(prompt, rows))
    assert out["id"].startswith("cmpl-") and out["object"] == "text_completion" and out["model"] == "m"
    assert [(c["index"], c["text"], c["finish_reason"]) for c in out["choices"]] == [
        (0, OUTPUTS[0], "stop"), (1, OUTPUTS[1], "length")]
    generated = [len(tokenizer.encode(t)) for t in OUTPUTS]
    assert out["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": sum(generated),
                            "total_tokens": len(prompt) + sum(generated)}
    lp = out["choices"][0]["logprobs"]
    ids = tokenizer.encode(OUTPUTS[0])
    assert lp["tokens"] == [tokenizer.decode([t]) for t in ids]
    assert lp["token_logprobs"] == pytest.approx([-1.0 - i / 10 for i in range(len(ids))])
    assert lp["text_offset"] == [len(tokenizer.decode(ids[:i])) for i in range(len(ids))]
    five, six = tokenizer.decode([5]), tokenizer.decode([6])
    assert lp["top_logprobs"][0] == {five: -0.1, six: -0.2, lp["tokens"][0]: lp["token_logprobs"][0]}  # k + 1


def test_echo_puts_the_prompt_first(tokenizer, request_events):
    prompt, rows = request_events
    choices = Choices(tokenizer, [prompt], 2, echo=True, logprobs=2)
    (first, _) = CompletionResponses("m", choices, n=2).whole(transcript_of(prompt, rows))["choices"]
    assert first["text"] == PROMPT + OUTPUTS[0]
    lp = first["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:len(prompt)] == [-2.0] * (len(prompt) - 1)
    assert lp["text_offset"][len(prompt)] == len(PROMPT)


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_chunks_add_up_to_the_whole_answer(tokenizer, request_events, echo):
    """Chunks as the stream sends them (one per event, the two sequences interleaved) against the whole answer."""
    prompt, rows = request_events
    whole = CompletionResponses("m", Choices(tokenizer, [prompt], 2, echo, 1), n=2).whole(transcript_of(prompt, rows))
    streamed = CompletionResponses("m", Choices(tokenizer, [prompt], 2, echo, 1), n=2, include_usage=True)
    transcript, chunks = Transcript([prompt], 2), []
    interleaved = [e for pair in zip(*rows, strict=False) for e in pair] + rows[0][len(rows[1]):]
    for event in interleaved:
        transcript.add([event])
        chunks.append(streamed.chunk(transcript, event.index, [event]))
    assert {c["id"] for c in chunks} == {streamed.head["id"]}
    for choice in whole["choices"]:
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == choice["index"]]
        assert "".join(c["text"] for c in mine) == choice["text"]
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert [v for c in mine for v in c["logprobs"][key]] == choice["logprobs"][key], key
        assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + [choice["finish_reason"]]
    usage, done = streamed.closing(transcript)
    assert json.loads(usage.removeprefix("data: ")) == {**streamed.head, "choices": [], "usage": whole["usage"]}
    assert done == DONE
    assert CompletionResponses("m", Choices(tokenizer, [prompt], 2, echo, 1), n=2).closing(transcript) == [DONE]


def test_best_of_returns_the_best_mean_logprob(tokenizer, request_events):
    prompt, rows = request_events  # row 0 averages higher (-1.0 - i/10 against -2.0 - i/10)
    swapped = [[TokenEvent(1 - e.index, e.token_id, e.text, e.finish_reason, e.logprob, e.top_logprobs)
                for e in events] for events in rows]
    out = CompletionResponses("m", Choices(tokenizer, [prompt], 2, False, None), n=1).whole(
        transcript_of(prompt, swapped))
    assert [(c["index"], c["text"], c["logprobs"]) for c in out["choices"]] == [(0, OUTPUTS[0], None)]
    assert out["usage"]["completion_tokens"] == sum(len(tokenizer.encode(t)) for t in OUTPUTS)  # both generated


def test_generate_shape(tokenizer, request_events):
    prompt, rows = request_events
    responses = GenerateResponses("m", Choices(tokenizer, [prompt], 2, False, None), n=2)
    transcript = transcript_of(prompt, rows)
    out = responses.whole(transcript)
    assert out["model"] == "m" and out["usage"] == transcript.usage
    assert [(c["index"], c["prompt_index"], c["text"], c["completion_tokens"]) for c in out["completions"]] == [
        (i, 0, text, len(tokenizer.encode(text))) for i, text in enumerate(OUTPUTS)]
    assert responses.chunk(transcript, 1, rows[1][-1:]) == {"index": 1, "text": rows[1][-1].text, "logprobs": None,
                                                           "finish_reason": "length"}
    (done,) = responses.closing(transcript)
    assert json.loads(done.removeprefix("data: ")) == {"done": True, **out}


def test_chat_completion_object(tokenizer, request_events):
    prompt, rows = request_events
    out = ChatResponses("m", ChatChoices(tokenizer, prompt, 2, top_logprobs=2), n=2, echoed="Да").whole(
        transcript_of(prompt, rows))
    assert out["id"].startswith("chatcmpl-") and out["object"] == "chat.completion" and out["model"] == "m"
    assert [(c["index"], c["message"], c["finish_reason"]) for c in out["choices"]] == [
        (i, {"role": "assistant", "content": "Да" + text}, ["stop", "length"][i]) for i, text in enumerate(OUTPUTS)]
    assert out["usage"] == transcript_of(prompt, rows).usage
    content = out["choices"][0]["logprobs"]["content"]
    ids = tokenizer.encode(OUTPUTS[0])
    entry = {"token": tokenizer.decode([ids[0]]), "logprob": -1.0, "bytes": list(tokenizer.token_bytes(ids[0]))}
    five, six = ({"token": tokenizer.decode([t]), "logprob": lp, "bytes": list(tokenizer.token_bytes(t))}
                 for t, lp in ((5, -0.1), (6, -0.2)))
    assert content[0] == {**entry, "top_logprobs": [five, six]}  # the k likeliest only
    assert [t["logprob"] for t in content] == pytest.approx([-1.0 - i / 10 for i in range(len(ids))])
    assert b"".join(bytes(t["bytes"]) for t in content).decode() == OUTPUTS[0]
    plain = ChatResponses("m", ChatChoices(tokenizer, prompt, 2, None), n=2).whole(transcript_of(prompt, rows))
    assert [c["logprobs"] for c in plain["choices"]] == [None, None]


def test_chat_stream_order_is_role_echo_content_finish_usage_done(tokenizer, request_events):
    prompt, rows = request_events
    responses = ChatResponses("m", ChatChoices(tokenizer, prompt, 2, top_logprobs=2), n=2, echoed="Да",
                              include_usage=True)
    opening = [json.loads(e.removeprefix("data: ")) for e in responses.opening()]
    assert [(c["choices"][0]["index"], c["choices"][0]["delta"]) for c in opening] == [
        (0, {"role": "assistant", "content": ""}), (1, {"role": "assistant", "content": ""}),
        (0, {"content": "Да"}), (1, {"content": "Да"})]
    transcript = Transcript([prompt], 2)
    for events in rows:
        transcript.add(events)
    last = responses.chunk(transcript, 0, rows[0][-2:])
    assert last["object"] == "chat.completion.chunk" and last["id"] == responses.head["id"]
    (choice,) = last["choices"]
    assert choice["delta"] == {"content": rows[0][-2].text + rows[0][-1].text} and choice["finish_reason"] == "stop"
    assert [t["token"] for t in choice["logprobs"]["content"]] == [e.text for e in rows[0][-2:]]
    usage, done = responses.closing(transcript)
    assert json.loads(usage.removeprefix("data: "))["usage"] == transcript.usage and done == DONE
    assert ChatResponses("m", ChatChoices(tokenizer, prompt, 2, None), n=2).opening()[2:] == []  # no echo
