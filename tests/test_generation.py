"""Generation: greedy parity with HF generate, KV cache = full recompute for sparse models, sampling rules."""

import copy

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

from rugpt_ray.checkpoints import export_hf
from rugpt_ray.config import ModelConfig, preset
from rugpt_ray.errors import UserError
from rugpt_ray.generation import (
    TOP_P_REJECTIONS,
    GenerationConfig,
    LogitBias,
    OutputPenalties,
    RepetitionPenalty,
    Row,
    SequenceState,
    choose_tokens,
    generate,
    stream,
)

DENSE = ModelConfig(n_layer=2, n_embd=64, n_head=4, n_positions=256, vocab_size=50257)
PROMPTS = ["Мороз и солнце; день чудесный!", "Все счастливые семьи похожи друг на друга, каждая"]


@pytest.fixture(scope="module")
def dense_pair(tmp_path_factory, make_model):
    model = make_model(DENSE, seed=1)
    out = tmp_path_factory.mktemp("hf") / "model"
    export_hf(model, out)
    return model, GPT2LMHeadModel.from_pretrained(out).eval()


def hf_greedy(hf, tokenizer, prompts, max_new_tokens, **kwargs):
    enc = [tokenizer.encode(p) for p in prompts]
    width = max(map(len, enc))
    ids = torch.tensor([[tokenizer.pad_id] * (width - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                      pad_token_id=tokenizer.pad_id, eos_token_id=None, **kwargs)
    return out[:, width:].tolist()


def test_greedy_equals_hf_generate_on_a_padded_batch(dense_pair, tokenizer):
    model, hf = dense_pair
    ours = generate(model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=40, greedy=True))
    theirs = hf_greedy(hf, tokenizer, PROMPTS, 40)
    assert [c.token_ids for c in ours] == theirs
    assert len(set(theirs[0])) > 10  # a varied continuation, not one repeated token


def test_repetition_penalty_equals_hf(dense_pair, tokenizer):
    model, hf = dense_pair
    ours = generate(model, tokenizer, PROMPTS[:1], GenerationConfig(max_new_tokens=30, greedy=True,
                                                                    repetition_penalty=1.5))
    assert [c.token_ids for c in ours] == hf_greedy(hf, tokenizer, PROMPTS[:1], 30, repetition_penalty=1.5)


def test_sparse_cache_equals_full_recompute(make_model, tokenizer):
    model = make_model(preset("tiny"), seed=2)  # 64-token windows: 150 tokens cross two window borders
    prompt = "Белеет парус одинокой в тумане моря голубом!.. Что ищет он в стране далекой? Что кинул он в краю родном?"
    ids = torch.tensor([tokenizer.encode(prompt)])
    out = generate(model, tokenizer, prompt, GenerationConfig(max_new_tokens=150 - ids.shape[1], greedy=True))[0]
    with torch.no_grad():
        for _ in range(len(out.token_ids)):
            ids = torch.cat([ids, model(ids)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert out.token_ids == ids[0, -len(out.token_ids):].tolist()
    assert ids.shape[1] > 128


def test_batch_equals_one_prompt_at_a_time_for_sparse(make_model, tokenizer):
    model = make_model(preset("tiny"), seed=3)
    cfg = GenerationConfig(max_new_tokens=90, greedy=True)
    batch = generate(model, tokenizer, PROMPTS, cfg)
    alone = [generate(model, tokenizer, p, cfg)[0] for p in PROMPTS]
    assert [c.token_ids for c in batch] == [c.token_ids for c in alone]


def test_seeded_sampling_is_reproducible(dense_pair, tokenizer):
    model, _ = dense_pair
    cfg = GenerationConfig(max_new_tokens=20, temperature=0.9, top_k=50, top_p=0.95, seed=5, num_return_sequences=3)
    first = generate(model, tokenizer, PROMPTS, cfg)
    again = generate(model, tokenizer, PROMPTS, cfg)
    other = generate(model, tokenizer, PROMPTS, GenerationConfig(**{**cfg.__dict__, "seed": 6}))
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [c.token_ids for c in first] != [c.token_ids for c in other]
    assert [c.prompt_index for c in first] == [0, 0, 0, 1, 1, 1]
    assert len({tuple(c.token_ids) for c in first[:3]}) > 1


def test_top_k_one_is_greedy_and_top_k_bounds_choices(dense_pair, tokenizer):
    model, _ = dense_pair
    greedy = generate(model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=15, greedy=True))
    top1 = generate(model, tokenizer, PROMPTS, GenerationConfig(max_new_tokens=15, top_k=1, seed=0))
    assert [c.token_ids for c in greedy] == [c.token_ids for c in top1]
    # top_k=3: every sampled token is among the 3 most likely at its step
    out = generate(model, tokenizer, PROMPTS[0], GenerationConfig(max_new_tokens=10, top_k=3, seed=1))[0]
    ids = torch.tensor([tokenizer.encode(PROMPTS[0])])
    with torch.no_grad():
        for token in out.token_ids:
            assert token in model(ids)[0][0, -1].topk(3).indices.tolist()
            ids = torch.cat([ids, torch.tensor([[token]])], 1)


def test_stream_equals_generate_and_stop_strings(dense_pair, tokenizer):
    model, _ = dense_pair
    full = generate(model, tokenizer, PROMPTS[0], GenerationConfig(max_new_tokens=40, greedy=True))[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cfg = GenerationConfig(max_new_tokens=40, greedy=True, stop=[stop])
    cut = generate(model, tokenizer, PROMPTS[0], cfg)[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    streamed = "".join(e.text for e in stream(model, tokenizer, PROMPTS[0], cfg))
    assert streamed == cut.text
    sampled = GenerationConfig(max_new_tokens=30, temperature=0.8, seed=3, num_return_sequences=2)
    events = list(stream(model, tokenizer, PROMPTS, sampled))
    texts = {i: "".join(e.text for e in events if e.index == i) for i in range(4)}
    assert texts == {c.index: c.text for c in generate(model, tokenizer, PROMPTS, sampled)}


def test_padding_rows_are_never_sampled(make_model, tokenizer):
    model = make_model(preset("tiny"), seed=4)  # 50264 rows: ids 50257.. are the seed's padding
    ids = torch.tensor([tokenizer.encode(PROMPTS[0])])
    captured = {}
    hook = model.transformer.ln_f.register_forward_hook(lambda m, i, o: captured.update(h=o[0, -1].clone()))
    with torch.no_grad():
        model(ids)
        hook.remove()
        model.transformer.wte.weight[50260] = captured["h"] * 100  # makes row 50260 win the next argmax by far
        assert model(ids)[0][0, -1].argmax().item() == 50260
    out = generate(model, tokenizer, PROMPTS[0], GenerationConfig(max_new_tokens=5, greedy=True))[0]
    assert all(t < len(tokenizer) for t in out.token_ids)


def test_eos_ends_a_sequence(dense_pair, tokenizer):
    model, _ = dense_pair
    cfg = GenerationConfig(max_new_tokens=10, greedy=True)
    plain = generate(model, tokenizer, PROMPTS[0], cfg)[0]
    eos_at_third = copy.copy(tokenizer)
    eos_at_third.eos_id = plain.token_ids[2]
    out = generate(model, eos_at_third, PROMPTS[0], cfg)[0]
    assert (out.finish_reason, out.token_ids) == ("stop", plain.token_ids[:2])
    assert plain.finish_reason == "length"


def test_stop_tokens_min_tokens_and_ignore_eos(dense_pair, tokenizer):
    model, _ = dense_pair
    plain = generate(model, tokenizer, PROMPTS[0], GenerationConfig(max_new_tokens=10, greedy=True))[0]
    third = plain.token_ids[2]
    first_at = plain.token_ids.index(third)
    stopped = generate(model, tokenizer, PROMPTS[0], GenerationConfig(max_new_tokens=10, greedy=True,
                                                                      stop_token_ids=[third]))[0]
    assert (stopped.finish_reason, stopped.token_ids) == ("stop", plain.token_ids[:first_at])
    kept = generate(model, tokenizer, PROMPTS[0], GenerationConfig(max_new_tokens=10, greedy=True, stop_token_ids=[
        third], include_stop_str_in_output=True))[0]
    assert kept.token_ids == plain.token_ids[:first_at + 1] and kept.text == tokenizer.decode(kept.token_ids)
    at_least = generate(model, tokenizer, PROMPTS[0], GenerationConfig(max_new_tokens=10, greedy=True,
                                                                       stop_token_ids=[third], min_new_tokens=8))[0]
    assert len(at_least.token_ids) >= 8 and third not in at_least.token_ids[:8]  # masked until 8 tokens
    eos_at_third = copy.copy(tokenizer)
    eos_at_third.eos_id = third
    ignored = generate(model, eos_at_third, PROMPTS[0], GenerationConfig(max_new_tokens=10, greedy=True,
                                                                         ignore_eos=True))[0]
    assert ignored.token_ids == plain.token_ids
    stop = plain.text[len(plain.text) // 2:][:2]
    with_stop = generate(model, tokenizer, PROMPTS[0], GenerationConfig(max_new_tokens=10, greedy=True, stop=[stop],
                                                                        include_stop_str_in_output=True))[0]
    assert with_stop.text == plain.text[:plain.text.index(stop) + len(stop)]


def test_prompt_logprobs_are_the_checkpoints_log_softmax_and_max_new_tokens_0_only_scores(dense_pair, tokenizer):
    model, _ = dense_pair
    ids = tokenizer.encode(PROMPTS[1])
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0][0].float().log_softmax(-1)
    events = list(stream(model, tokenizer, [ids, ids[:5]], GenerationConfig(max_new_tokens=0, prompt_logprobs=2)))
    assert [(e.index, e.token_id, e.text, e.finish_reason) for e in events] == [(0, None, "", "length"),
                                                                                (1, None, "", "length")]
    scored = events[0].prompt_logprobs
    assert [t.token_id for t in scored] == ids and scored[0].logprob is None and scored[0].top is None
    assert [t.logprob for t in scored[1:]] == pytest.approx(want[torch.arange(len(ids) - 1), ids[1:]].tolist(),
                                                            abs=1e-4)
    assert [t.top[0][0] for t in scored[1:]] == want[:-1].argmax(-1).tolist()
    assert [t.logprob for t in events[1].prompt_logprobs[1:]] == pytest.approx([t.logprob for t in scored[1:5]],
                                                                               abs=1e-5)
    sampled = list(stream(model, tokenizer, [ids], GenerationConfig(max_new_tokens=3, greedy=True,
                                                                    prompt_logprobs=0)))
    assert [t.top for t in sampled[0].prompt_logprobs[1:]] == [[]] * (len(ids) - 1)
    assert all(e.prompt_logprobs is None for e in sampled[1:]) and len(sampled) == 3


@pytest.mark.parametrize("field,value", [("max_new_tokens", 0), ("temperature", -1.0), ("top_p", 0.0),
                                         ("top_p", 1.5), ("num_return_sequences", 0), ("top_k", -1),
                                         ("presence_penalty", 2.5), ("frequency_penalty", -3.0),
                                         ("logit_bias", {5: 101.0}), ("logprobs", -1)])
def test_bad_generation_config_names_the_field(dense_pair, tokenizer, field, value):
    model, _ = dense_pair
    with pytest.raises(UserError, match=field):
        generate(model, tokenizer, "привет", GenerationConfig(**{field: value}))


def test_prompt_errors(dense_pair, tokenizer):
    model, _ = dense_pair
    with pytest.raises(UserError, match="prompt 1 is empty"):
        generate(model, tokenizer, ["a", ""])
    with pytest.raises(UserError, match="exceeds the model's 256 positions"):
        generate(model, tokenizer, "слово " * 200, GenerationConfig(max_new_tokens=100))


# ------------------------------------------------------------------------- sampling against the reference math

def reference_token(logits, cfg, draws):
    """The textbook filters over the whole vocabulary (a full sort for top-p), then the documented draw: inverse
    CDF in id order over the kept tokens (top-k rows), or over all tokens until a kept one comes (top-p only), and
    over the kept ones after `TOP_P_REJECTIONS` draws that were not."""
    x = logits / cfg.temperature
    if cfg.top_k:
        x = x.masked_fill(x < x.topk(cfg.top_k).values[-1], float("-inf"))
    kept = x.clone()
    if cfg.top_p < 1:
        ordered, order = x.sort(descending=True)
        p = ordered.softmax(-1)
        drop = torch.zeros_like(p, dtype=torch.bool).scatter(0, order, p.cumsum(-1) - p >= cfg.top_p)
        kept = x.masked_fill(drop, float("-inf"))
    def inverse_cdf(scores):
        cdf = scores.softmax(-1).cumsum(-1, dtype=torch.float64)
        return int(torch.searchsorted(cdf, torch.tensor([next(draws) * float(cdf[-1])], dtype=torch.float64),
                                      right=True))

    for _ in range(TOP_P_REJECTIONS):
        token = inverse_cdf(kept if cfg.top_k else x)
        if kept[token] > float("-inf"):
            return token
    return inverse_cdf(kept)


def test_a_tiny_top_p_ends_its_rejections_in_the_nucleus():
    """top_p 1e-300 keeps only the likeliest token: 1 / 50000 of the draws would land there, so the row draws
    from the nucleus after TOP_P_REJECTIONS tries, not once per vocabulary entry."""
    logits = torch.randn(4, 50257, generator=torch.Generator().manual_seed(3))
    draws, taken = Draws(4, seed=5), []
    tokens = choose_tokens(logits, [GenerationConfig(top_p=1e-300)] * 4, lambda rows: taken.append(rows) or
                           draws(rows))
    assert tokens.tolist() == logits.argmax(-1).tolist()
    assert len(taken) == 1 + TOP_P_REJECTIONS


class Draws:
    """One generator per row, as the decoder has: `draw(rows)` takes the next number of each listed row."""

    def __init__(self, rows, seed):
        self.generators = [torch.Generator().manual_seed(seed + r) for r in range(rows)]

    def __call__(self, rows):
        return torch.tensor([float(torch.rand(1, generator=self.generators[r], dtype=torch.float64)) for r in rows],
                            dtype=torch.float64)

    def row(self, r):
        while True:
            yield float(torch.rand(1, generator=self.generators[r], dtype=torch.float64))


SAMPLERS = {
    "temperature": GenerationConfig(temperature=0.7),
    "top_k": GenerationConfig(top_k=20),
    "top_p": GenerationConfig(top_p=0.8),
    "top_k+top_p": GenerationConfig(top_k=100, top_p=0.6, temperature=1.3),
    "top_p, flat": GenerationConfig(top_p=0.3, temperature=3.0),  # the kept set is most of the vocabulary
    "top_p, rarely drawn": GenerationConfig(top_p=0.02, temperature=3.0),  # many rows end in the sorted nucleus
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampling_equals_the_reference_for_the_same_draws(name):
    cfg = SAMPLERS[name]
    logits = torch.randn(6, 3000, generator=torch.Generator().manual_seed(0)) * torch.tensor([[0.5], [1], [2], [3],
                                                                                                 [4], [6]])
    ours, theirs = Draws(6, seed=1), Draws(6, seed=1)
    got = torch.stack([choose_tokens(logits, [cfg] * 6, ours) for _ in range(120)])
    streams = [theirs.row(r) for r in range(6)]
    want = torch.tensor([[reference_token(logits[r], cfg, streams[r]) for r in range(6)] for _ in range(120)])
    assert torch.equal(got, want)
    assert len(set(got[:, 2].tolist())) > 5  # the draws explore the distribution


def test_mixed_rows_sample_as_each_alone_and_greedy_rows_take_the_argmax():
    cfgs = [*SAMPLERS.values(), GenerationConfig(greedy=True), GenerationConfig(temperature=0)]
    logits = torch.randn(len(cfgs), 3000, generator=torch.Generator().manual_seed(1)) * 3
    together, alone = Draws(len(cfgs), seed=2), [Draws(len(cfgs), seed=2) for _ in cfgs]
    for _ in range(50):
        batched = choose_tokens(logits, cfgs, together)
        single = [int(choose_tokens(logits[r:r + 1], cfgs[r:r + 1], lambda rows, r=r: alone[r]([r])))
                  for r in range(len(cfgs))]
        assert batched.tolist() == single
        assert batched[-2:].tolist() == logits[-2:].argmax(-1).tolist()


@pytest.mark.parametrize("name", [*SAMPLERS, "greedy"])
def test_a_row_narrowed_to_its_allowed_ids_chooses_as_over_the_masked_vocabulary(name):
    """A constrained row that allows few tokens draws among their logits alone (`allowed`): the same token, draw for
    draw, as over the whole row with every other logit at -inf; unconstrained rows (None) are left as they are."""
    cfg = GenerationConfig(greedy=True) if name == "greedy" else SAMPLERS[name]
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 3000, generator=gen) * 3
    allowed = [np.sort(torch.randperm(3000, generator=gen)[:n].numpy()) for n in (1, 2, 7, 40, 375)] + [None]
    if name == "greedy":  # ties: the first id of the likeliest wins, as argmax over the row
        logits[2, :40], allowed[2] = logits[2, 0], np.arange(40)
    masked = torch.full_like(logits, float("-inf"))
    for r, ids in enumerate(allowed):
        masked[r] = logits[r] if ids is None else masked[r].index_copy(0, torch.from_numpy(ids), logits[r, ids])
    ours, theirs = Draws(6, seed=3), Draws(6, seed=3)
    got = torch.stack([choose_tokens(logits, [cfg] * 6, ours, allowed) for _ in range(60)])
    want = torch.stack([choose_tokens(masked, [cfg] * 6, theirs) for _ in range(60)])
    assert torch.equal(got, want)
    assert all(set(got[:, r].tolist()) <= set(ids.tolist()) for r, ids in enumerate(allowed[:5]))
    assert name != "temperature" or len(set(got[:, 4].tolist())) > 5


def test_penalties_and_logit_bias_equal_the_reference():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 500, generator=gen) * 2
    histories = [torch.randint(0, 500, (n,), generator=gen) for n in (30, 12, 50, 7)]
    prompt_lengths = [10, 12, 20, 3]
    cfgs = [GenerationConfig(repetition_penalty=1.3, presence_penalty=0.5),
            GenerationConfig(frequency_penalty=0.7, logit_bias={3: 5.0, 7: -100.0}),
            GenerationConfig(repetition_penalty=0.8, frequency_penalty=-0.4, presence_penalty=1.5, logit_bias={9: 2}),
            GenerationConfig()]
    rows = [Row(None, cfg, SequenceState(0, cfg), history[:n].tolist(), None, history, len(history))
            for cfg, history, n in zip(cfgs, histories, prompt_lengths, strict=True)]
    ours = logits.clone()
    for processor in (LogitBias(), RepetitionPenalty(), OutputPenalties()):
        processor.apply(ours, rows)
    for r, cfg in enumerate(cfgs):
        want = logits[r].clone()
        for token, value in cfg.logit_bias.items():
            want[token] += value
        for token in set(histories[r].tolist()):
            v = want[token]
            want[token] = v / cfg.repetition_penalty if v > 0 else v * cfg.repetition_penalty
        for token in set(histories[r][prompt_lengths[r]:].tolist()):
            count = histories[r][prompt_lengths[r]:].tolist().count(token)
            want[token] -= cfg.frequency_penalty * count + cfg.presence_penalty
        assert torch.allclose(ours[r], want, atol=1e-5), r
    assert torch.equal(ours[3], logits[3])


def test_penalties_change_generation_and_logit_bias_forces_a_token(dense_pair, tokenizer):
    model, _ = dense_pair
    plain = generate(model, tokenizer, PROMPTS[0], GenerationConfig(max_new_tokens=30, greedy=True))[0].token_ids
    penalized = generate(model, tokenizer, PROMPTS[0], GenerationConfig(max_new_tokens=30, greedy=True,
                                                                        frequency_penalty=2.0))[0].token_ids
    assert penalized != plain
    assert len(set(penalized)) >= len(set(plain))
    forced = generate(model, tokenizer, PROMPTS[0], GenerationConfig(max_new_tokens=5, seed=0,
                                                                     logit_bias={1234: 100.0}))[0]
    assert forced.token_ids == [1234] * 5


def test_logprobs_are_the_raw_model_log_softmax(dense_pair, tokenizer):
    model, _ = dense_pair
    cfg = GenerationConfig(max_new_tokens=6, temperature=0.8, top_k=5, repetition_penalty=1.4, seed=4, logprobs=3)
    events = list(stream(model, tokenizer, PROMPTS[0], cfg))
    ids = torch.tensor([tokenizer.encode(PROMPTS[0])])
    with torch.no_grad():
        for e in events:
            raw = model(ids)[0][0, -1].float().log_softmax(-1)
            assert e.logprob == pytest.approx(float(raw[e.token_id]), abs=1e-4)
            top = raw.topk(3)
            assert [t for t, _ in e.top_logprobs] == top.indices.tolist()
            assert [v for _, v in e.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
            ids = torch.cat([ids, torch.tensor([[e.token_id]])], 1)
    assert all(e.logprob is None for e in stream(model, tokenizer, PROMPTS[0], GenerationConfig(max_new_tokens=2)))
