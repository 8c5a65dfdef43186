"""Chat templates: rendering as transformers renders, the loss mask, conversation checks."""

import pytest
from transformers import PreTrainedTokenizerFast

from rugpt_ray.chat import (
    ChatTemplateError,
    chat_template_source,
    chat_tokens,
    check_conversation,
    render_chat,
)
from rugpt_ray.errors import UserError

TEMPLATE = chat_template_source("rugpt3-chat")
CHAT = [
    {"role": "system", "content": "Ты повторяешь фразы."},
    {"role": "user", "content": "Повтори: мороз и солнце"},
    {"role": "assistant", "content": "мороз и солнце"},
    {"role": "user", "content": "Повтори:  день чудесный!"},
    {"role": "assistant", "content": " день чудесный!\nДа."},
]


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer):
    """transformers' own tokenizer over the same BPE, with the template: the independent renderer and mask."""
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer._tok, eos_token="</s>", pad_token="<pad>")
    hf.chat_template = TEMPLATE
    return hf


def test_turns_are_framed_by_the_vocabulary_s_own_special_tokens(tokenizer):
    text = render_chat(TEMPLATE, CHAT[:3])
    assert text == ("<s>system\nТы повторяешь фразы.</s>\n<s>user\nПовтори: мороз и солнце</s>\n"
                    "<s>assistant\nмороз и солнце</s>\n")
    prompt = render_chat(TEMPLATE, CHAT[:2], add_generation_prompt=True)
    assert prompt == text[:text.rindex("мороз и солнце</s>\n")]
    ids = tokenizer.encode(prompt)
    assert ids.count(tokenizer.bos_id) == 3 and ids.count(tokenizer.eos_id) == 2  # one token each


def test_continue_final_message_ends_inside_the_last_message():
    text = render_chat(TEMPLATE, CHAT[:3], continue_final_message=True)
    assert text.endswith("<s>assistant\nмороз и солнце")


def test_rendering_and_mask_equal_transformers_apply_chat_template(tokenizer, hf_tokenizer):
    ids, mask = chat_tokens(tokenizer, TEMPLATE, CHAT)
    assert render_chat(TEMPLATE, CHAT) == hf_tokenizer.apply_chat_template(CHAT, tokenize=False)
    hf = hf_tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == hf["input_ids"]
    assert mask == hf["assistant_masks"]


def test_the_mask_covers_exactly_the_assistant_content_and_its_end_of_turn(tokenizer):
    ids, mask = chat_tokens(tokenizer, TEMPLATE, CHAT)
    learned = [token for token, m in zip(ids, mask, strict=True) if m]
    assert tokenizer.decode(learned) == "мороз и солнце</s> день чудесный!\nДа.</s>"
    assert sum(mask) == len(tokenizer.encode("мороз и солнце</s>")) + len(tokenizer.encode(" день чудесный!\nДа.</s>"))
    last = max(i for i, m in enumerate(mask) if m)
    assert ids[last] == tokenizer.eos_id and mask[last + 1:] == [0]  # the "\n" after the turn is not learned


@pytest.mark.parametrize(("record", "reason"), [
    ({"conversation": []}, "missing the 'messages' key"),
    ([1, 2], "missing the 'messages' key"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, "message 0: must be an object with a 'role' and a text 'content'"),
    ({"messages": [{"role": "bot", "content": "a"}]}, "message 0: unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " \n"}]},
     "message 1: empty content"),
    ({"messages": [{"role": "user", "content": "a"}]}, "no assistant turn"),
])
def test_bad_conversations_are_refused_with_the_reason(record, reason):
    with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        check_conversation(record)


def test_a_good_record_gives_its_messages_only():
    record = {"messages": [{"role": "user", "content": "a", "name": "x"}, {"role": "assistant", "content": "b"}]}
    assert check_conversation(record) == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]


def test_templates_by_name_or_file_and_their_errors(tmp_path):
    custom = tmp_path / "t.jinja"
    custom.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}", encoding="utf-8")
    assert render_chat(chat_template_source(str(custom)), CHAT[:2]) == "Ты повторяешь фразы.\nПовтори: мороз и солнце\n"
    with pytest.raises(UserError, match=r"chat template 'nope': neither a built-in name \(rugpt3-chat\) nor a file"):
        chat_template_source("nope")
    broken = tmp_path / "broken.jinja"
    broken.write_text("<s>\n{% for m in messages %}{{ m }", encoding="utf-8")
    with pytest.raises(ChatTemplateError, match=f"chat template {broken}: line 2: unexpected"):
        chat_template_source(str(broken))
    failing = "{{ raise_exception('only user turns') }}"
    with pytest.raises(ChatTemplateError, match="only user turns"):
        render_chat(failing, CHAT)
