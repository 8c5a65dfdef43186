"""Structured outputs at the decoder: JSON schemas, JSON objects, regexes, choices and grammars on a random-weight
model sampling at temperature 1, mixed with unconstrained rows and with adapters; bad specs."""

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import numpy as np
import pytest
import torch
from schemas import SCHEMAS

from rugpt_ray.config import preset
from rugpt_ray.constraints import (
    FEW_ALLOWED,
    MAX_WHITESPACE,
    allowed_tokens,
    blocked_tokens,
    compile_constraint,
    mask_logits,
)
from rugpt_ray.generation import Decoder, GenerationConfig, RequestError, generate
from rugpt_ray.lora import apply_adapter, load_adapter

TINY = preset("tiny")  # 50264 rows: 50257..50263 are padding the tokenizer cannot decode
SAMPLED = GenerationConfig(max_new_tokens=120, temperature=1.0)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """As the serving replica runs: a few dozen rows gain nothing from a second thread, and lose much while other
    processes keep the cores busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(make_model):
    return make_model(TINY, seed=7)


def constrain(kind, spec, tokenizer, **kwargs):
    return compile_constraint(kind, spec, tokenizer, TINY.vocab_size, **kwargs)


def run(decoder, requests):
    """Feed `requests` ((prompt ids, cfg, constraint) each) to `decoder` as slots free up; per request, its
    sequences' (text, token ids, finish reason)."""
    out = {i: {} for i in range(len(requests))}
    queue = list(enumerate(requests))
    while queue or decoder:
        while queue and decoder.free_slots >= queue[0][1][1].num_return_sequences:
            i, (ids, cfg, constraint) = queue.pop(0)
            decoder.add([ids], cfg, owner=i, constraint=constraint)
        for i, event in decoder.step():
            text, tokens, _ = out[i].get(event.index, ("", [], None))
            out[i][event.index] = (text + event.text, tokens + [event.token_id] * (event.token_id is not None),
                                   event.finish_reason)
    return [[out[i][j] for j in sorted(out[i])] for i in out]


def never_special(tokens, tokenizer):
    """No `<pad>`/`<s>`/`<unk>`/`<mask>` and no padding row; EOS never kept in the output."""
    return all(4 < t < len(tokenizer) for t in tokens)


def test_sampled_outputs_of_generated_schemas_validate(model, tokenizer):
    prompts = [tokenizer.encode(p) for p in ("Ответ в JSON:", "{", "Данные о городе")]
    requests = [(prompts[i % 3], GenerationConfig(**{**SAMPLED.__dict__, "seed": i}),
                 constrain("json", SCHEMAS[i % len(SCHEMAS)], tokenizer)) for i in range(9 * len(SCHEMAS))]
    assert len(requests) >= 200 and len(SCHEMAS) >= 20
    results = [seqs[0] for seqs in run(Decoder(model, tokenizer, slots=48, capacity=160), requests)]
    finished = [(i, text) for i, (text, _, reason) in enumerate(results) if reason == "stop"]
    for i, text in finished:
        jsonschema.validate(json.loads(text), SCHEMAS[i % len(SCHEMAS)])
    assert len(finished) >= 0.9 * len(requests)
    assert {reason for _, _, reason in results} <= {"stop", "length"}
    assert all(never_special(tokens, tokenizer) for _, tokens, _ in results)
    assert all(len(run_) <= MAX_WHITESPACE for text, _, _ in results for run_ in re.findall(r"[\t\n\r]+", text))


@pytest.mark.parametrize("regex", [r"\d{3}-\d{2}-\d{4}", r"(да|нет), [a-z]{2,6}!", r"[А-Яа-я]{1,8}@[a-z]{2,4}\.ru",
                                   r"-?(0|[1-9][0-9]{0,5})(\.[0-9]{1,3})?"])
def test_regex_outputs_fullmatch(model, tokenizer, regex):
    cfg = GenerationConfig(max_new_tokens=40, temperature=1.0, seed=1, num_return_sequences=8)
    outputs = generate(model, tokenizer, "Ответ:", cfg, constrain("regex", regex, tokenizer))
    assert all(c.finish_reason == "stop" and re.fullmatch(regex, c.text) for c in outputs), [c.text for c in outputs]
    assert len({c.text for c in outputs}) > 1  # sampled, not forced


def test_choice_outputs_are_choices_and_special_names_stay_text(model, tokenizer):
    choices = ["да", "нет", "может быть", "<pad>", "</s>"]
    cfg = GenerationConfig(max_new_tokens=10, temperature=1.0, seed=2, num_return_sequences=16)
    outputs = generate(model, tokenizer, ["Вопрос?", "Ответ:"], cfg, constrain("choice", choices, tokenizer))
    assert all(c.finish_reason == "stop" and c.text in choices for c in outputs)
    assert len({c.text for c in outputs}) >= 3
    assert all(never_special(c.token_ids, tokenizer) for c in outputs)  # "<pad>" is spelt with text tokens


@pytest.mark.parametrize("grammar,pattern", [
    ('root ::= word ", " word "."\nword ::= "да" | "нет" | [0-9]', r"(да|нет|[0-9]), (да|нет|[0-9])\."),
    ('start: NUMBER ("+" NUMBER)~1..3\nNUMBER: /[1-9][0-9]{0,2}/', r"[1-9][0-9]{0,2}(\+[1-9][0-9]{0,2}){1,3}"),
])
def test_grammar_outputs_are_sentences_of_the_grammar(model, tokenizer, grammar, pattern):
    cfg = GenerationConfig(max_new_tokens=40, temperature=1.0, seed=3, num_return_sequences=8)
    outputs = generate(model, tokenizer, "Ответ:", cfg, constrain("grammar", grammar, tokenizer))
    assert all(c.finish_reason == "stop" and re.fullmatch(pattern, c.text) for c in outputs), [c.text for c in outputs]


def test_json_object_outputs_are_objects(model, tokenizer):
    closing = {t: 6.0 for t in range(5, len(tokenizer)) if set(tokenizer.token_bytes(t)) <= set(b'"}]0123456789')}
    cfg = GenerationConfig(max_new_tokens=60, temperature=1.0, seed=4, num_return_sequences=8, logit_bias=closing)
    outputs = generate(model, tokenizer, "JSON:", cfg, constrain("json_object", None, tokenizer))
    finished = [c for c in outputs if c.finish_reason == "stop"]
    assert len(finished) >= 4 and all(isinstance(json.loads(c.text), dict) for c in finished)
    assert all(c.text.startswith("{") for c in outputs)


def test_eos_is_allowed_exactly_when_the_grammar_is_complete(tokenizer):
    choices = ["да", "да, нет"]
    matcher, tokens = constrain("choice", choices, tokenizer).matcher(), tokenizer.encode(choices[1])

    def allowed():
        mask = np.empty((1, (TINY.vocab_size + 31) // 32), dtype=np.uint32)
        matcher.fill(mask[0])
        return ~blocked_tokens(mask, TINY.vocab_size)[0]

    eos_allowed = []
    for token in tokens:
        now = allowed()
        assert now[token] and not now[[0, 1, 3, 4]].any() and not now[len(tokenizer):].any()
        eos_allowed.append(bool(now[tokenizer.eos_id]))
        matcher.accept(token)
    assert eos_allowed == [tokenizer.decode(tokens[:i]) in choices for i in range(len(tokens))]
    assert True in eos_allowed and matcher.must_end and allowed().nonzero().flatten().tolist() == [tokenizer.eos_id]


def test_allowed_ids_and_masked_rows_follow_the_bitmask(tokenizer):
    """`allowed_tokens` lists exactly the ids a row of the bitmask allows, and `mask_logits` keeps exactly their
    logits in the rows it is given, for rows that allow few tokens (a JSON step) and many (free text)."""
    matchers = [constrain("json", schema, tokenizer).matcher() for schema in SCHEMAS[:3]]
    matchers.append(constrain("regex", "[а-я ]{0,40}", tokenizer).matcher())  # many tokens allowed
    bitmask = np.empty((len(matchers), (TINY.vocab_size + 31) // 32), dtype=np.uint32)
    for j, matcher in enumerate(matchers):
        matcher.fill(bitmask[j])
    blocked = blocked_tokens(bitmask, TINY.vocab_size)
    assert blocked[:3].logical_not().sum(1).max() < TINY.vocab_size * FEW_ALLOWED < blocked[3].logical_not().sum()
    assert [ids.tolist() for ids in allowed_tokens(bitmask)] == [row.nonzero().flatten().tolist() for row in ~blocked]
    assert allowed_tokens(bitmask[:0]) == []
    logits, rows = torch.randn(6, TINY.vocab_size), [5, 0, 2, 3]
    expected = logits.clone()
    expected[rows] = expected[rows].masked_fill(blocked, float("-inf"))
    mask_logits(logits.numpy(), rows, bitmask)
    assert torch.equal(logits, expected)


def test_whitespace_runs_are_capped(model, tokenizer):
    spaces = {t: 100.0 for t in range(5, len(tokenizer)) if tokenizer.token_bytes(t).isspace()}
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["a"], "additionalProperties": False}
    cfg = GenerationConfig(max_new_tokens=100, greedy=True, logit_bias=spaces)  # whitespace wins wherever allowed
    out = generate(model, tokenizer, "JSON:", cfg, constrain("json", schema, tokenizer))[0]
    assert out.finish_reason == "stop" and json.loads(out.text)["a"] in range(10)
    assert max(map(len, re.findall(r"\s+", out.text))) == MAX_WHITESPACE


def test_max_new_tokens_first_ends_with_length_and_the_partial_text(model, tokenizer):
    schema = {"type": "object", "properties": {"name": {"type": "string", "minLength": 30}}, "required": ["name"]}
    out = generate(model, tokenizer, "JSON:", GenerationConfig(max_new_tokens=6, temperature=1.0, seed=5),
                   constrain("json", schema, tokenizer))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 6
    assert out.text == tokenizer.decode(out.token_ids) and out.text.lstrip().startswith('{')


def test_a_grammar_that_allows_only_eos_beats_min_new_tokens(model, tokenizer):
    done = generate(model, tokenizer, "Ответ:", GenerationConfig(max_new_tokens=10, min_new_tokens=8, greedy=True),
                    constrain("choice", ["да"], tokenizer))[0]
    assert (done.text, done.finish_reason) == ("да", "stop") and len(done.token_ids) < 8
    more = generate(model, tokenizer, "Ответ:", GenerationConfig(max_new_tokens=10, min_new_tokens=6, greedy=True),
                    constrain("regex", "[0-9]+", tokenizer))[0]  # complete after one digit, yet it may go on
    assert re.fullmatch("[0-9]+", more.text) and len(more.token_ids) >= 6


def test_logprobs_of_constrained_rows_are_the_raw_models(model, tokenizer):
    cfg = GenerationConfig(max_new_tokens=10, greedy=True, logprobs=2)
    out = generate(model, tokenizer, "Ответ:", cfg, constrain("regex", "[0-9]{8}", tokenizer))[0]
    assert out.finish_reason == "stop" and re.fullmatch("[0-9]{8}", out.text)
    ids = torch.tensor([tokenizer.encode("Ответ:")])
    with torch.no_grad():
        for entry in out.logprobs:
            raw = model(ids)[0][0, -1].float()
            raw[len(tokenizer):] = float("-inf")
            raw = raw.log_softmax(-1)
            assert entry.logprob == pytest.approx(float(raw[entry.token_id]), abs=1e-4)
            assert [token for token, _ in entry.top] == raw.topk(2).indices.tolist()
            ids = torch.cat([ids, torch.tensor([[entry.token_id]])], 1)
    assert any(entry.token_id != entry.top[0][0] for entry in out.logprobs)  # the grammar overruled the model


def test_unconstrained_rows_are_bit_equal_with_constrained_rows_in_their_steps(model, tokenizer):
    cfgs = [GenerationConfig(max_new_tokens=30, temperature=1.0, seed=6, logprobs=2),
            GenerationConfig(max_new_tokens=30, top_k=40, repetition_penalty=1.3, seed=7, logprobs=2)]
    schema = SCHEMAS[3]
    constrained = constrain("json", schema, tokenizer)

    def events(with_constrained):
        decoder = Decoder(model, tokenizer, slots=4, capacity=64, static_shapes=True)  # same shapes in both runs
        for i, cfg in enumerate(cfgs):
            decoder.add([tokenizer.encode("Жили-были")], cfg, owner=i)
        got, steps = [], 0
        while decoder:
            if steps == 1 and with_constrained:  # they join a step later and leave earlier
                decoder.add([tokenizer.encode("{")], GenerationConfig(max_new_tokens=30, temperature=1.0), owner="c",
                            constraint=constrained)
                decoder.add([tokenizer.encode("{")], GenerationConfig(max_new_tokens=20, greedy=True), owner="c",
                            constraint=constrained)
            got += [(owner, e.token_id, e.logprob, e.top_logprobs, e.finish_reason) for owner, e in decoder.step()]
            steps += 1
        return got

    mixed = events(with_constrained=True)
    assert [e for e in mixed if e[0] != "c"] == events(with_constrained=False)
    assert sum(e[0] == "c" for e in mixed) > 10


def test_adapters_combine_with_constraints(make_model, make_adapter, tokenizer, tmp_path):
    adapter = load_adapter(make_adapter(TINY, 5, 1, tmp_path / "a1"))
    regex = r"[а-я]{3,12}( [а-я]{2,8}){0,3}\."
    constraint = constrain("regex", regex, tokenizer)
    cfg = GenerationConfig(max_new_tokens=50, temperature=1.0, seed=8, num_return_sequences=4)
    models = {"a1": apply_adapter(make_model(TINY, 5), adapter), "base": make_model(TINY, 5)}
    alone = {name: generate(model, tokenizer, "Ответ:", cfg, constraint) for name, model in models.items()}
    decoder = Decoder(make_model(TINY, 5), tokenizer, slots=8)
    ids = tokenizer.encode("Ответ:")
    decoder.add([ids], cfg, owner="a1", adapter=("a1", adapter), constraint=constraint)
    decoder.add([ids], cfg, owner="base", constraint=constraint)
    texts = {"a1": [""] * 4, "base": [""] * 4}
    while decoder:
        for owner, event in decoder.step():
            texts[owner][event.index] += event.text
    assert texts == {name: [c.text for c in completions] for name, completions in alone.items()}
    assert texts["a1"] != texts["base"] and all(re.fullmatch(regex, t) for ts in texts.values() for t in ts)


@pytest.mark.parametrize("kind,spec,reason", [
    ("json", {"type": "strin"}, "Invalid type: strin"),
    ("json", {"type": "array", "uniqueItems": True}, "Unimplemented keys"),
    ("json", {"type": "string", "format": "no-such-format"}, "Unknown format"),
    ("json", {"$ref": "#/$defs/missing"}, "does not exist"),
    ("json", "{not json", "not valid JSON"),
    ("json", [1, 2], "must be a JSON object"),
    ("json_object", {"type": "object"}, "takes no spec"),
    ("regex", "(да|нет", "unclosed group"),
    ("regex", "", "non-empty string"),
    ("grammar", "start: undefined_rule", "unknown name"),
    ("choice", [], "non-empty list"),
    ("choice", ["да", 1], "non-empty list"),
    ("yaml", "a: 1", "unknown structured output kind"),
])
def test_bad_specs_are_request_errors_naming_the_reason(tokenizer, kind, spec, reason):
    with pytest.raises(RequestError, match=re.escape(reason)) as error:
        constrain(kind, spec, tokenizer)
    assert error.value.param == (None if kind == "yaml" else kind)


def test_a_compile_past_the_time_limit_is_a_request_error(tokenizer):
    schema = {"type": "object", "properties": {f"p{i}": {"type": ["string", "integer", "null"]} for i in range(3000)}}
    with pytest.raises(RequestError, match=r"did not compile within the time limit \(0 s\)"):
        constrain("json", schema, tokenizer, time_limit=0)


def test_compiled_once_per_spec_and_rows_from_any_thread_and_checked_against_the_decoder(model, tokenizer):
    regex = r"[0-9]{2}"
    with ThreadPoolExecutor(8) as pool:  # the serving engine compiles in threads, off its event loop
        compiled = list(pool.map(lambda _: constrain("regex", regex, tokenizer), range(16)))
    assert all(c is compiled[0] for c in compiled) and constrain("regex", regex, tokenizer) is compiled[0]
    other_rows = compile_constraint("regex", regex, tokenizer, 50257)
    assert other_rows is not constrain("regex", regex, tokenizer)
    decoder = Decoder(model, tokenizer, slots=2)
    with pytest.raises(RequestError, match="compiled for tokenizer .* and 50257 rows"):
        decoder.add([[5, 6]], SAMPLED, constraint=other_rows)
    with pytest.raises(RequestError, match="ignore_eos"):
        decoder.add([[5, 6]], GenerationConfig(ignore_eos=True), constraint=constrain("regex", regex, tokenizer))
    assert decoder.free_slots == 2 and not decoder
