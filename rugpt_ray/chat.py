"""Chat templates: how a conversation becomes one token sequence, and which of its tokens an assistant learns.

A template is Jinja text rendered by transformers' own renderer (sandboxed jinja2 with `{% generation %}`), so a
conversation renders here exactly as `AutoTokenizer.apply_chat_template` and vLLM render it from the same file.
Assistant content sits inside `{% generation %}`/`{% endgeneration %}`, so the template itself defines the loss
mask (TRL's `assistant_only_loss`). ruGPT3's vocabulary has no chat tokens, and none is added: the built-in
`rugpt3-chat` frames each turn with the vocabulary's own `<s>` and `</s>`, and `</s>` is EOS, so a generated
answer ends where its turn does.

No torch and no Ray here: the data pipeline, training and serving all render through this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser

from rugpt_ray.errors import UserError

CHAT_TEMPLATE_FILE = "chat_template.jinja"
"""The template's file name beside a checkpoint's weights (transformers reads the same name from an HF folder)."""
DEFAULT_CHAT_TEMPLATE = "rugpt3-chat"
ROLES = ("system", "user", "assistant")

BUILTIN_FOLDER = Path(__file__).with_name("chat_templates")
"""The built-in templates, NAME.jinja each (`rugpt3-chat`: `<s>ROLE\\nCONTENT</s>\\n` per turn)."""


class ChatTemplateError(UserError):
    """A template that does not compile, or a conversation it cannot render."""


class Encoder(Protocol):
    """What `chat_tokens` needs of a tokenizer (`RuGPTTokenizer`)."""

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]: ...


def chat_template_source(spec: str) -> str:
    """The template text of a built-in name (`rugpt3-chat`) or of a Jinja file; checked to compile."""
    builtin = BUILTIN_FOLDER / f"{spec}.jinja"
    path = builtin if "/" not in spec and builtin.is_file() else Path(spec).expanduser()
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in BUILTIN_FOLDER.glob("*.jinja")))
        raise UserError(f"chat template {spec!r}: neither a built-in name ({names}) nor a file")
    source = path.read_text(encoding="utf-8")
    check_template(source, str(path))
    return source


def check_template(source: str, where: str) -> None:
    """Refuse a template whose Jinja does not compile, naming the line."""
    try:
        jinja2.Environment(extensions=[_GenerationTag]).parse(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template {where}: line {e.lineno}: {e.message}") from None


class _GenerationTag(jinja2.ext.Extension):
    """Lets the syntax check accept `{% generation %}`, which transformers' renderer implements."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def check_conversation(record: Any) -> list[dict[str, str]]:
    """The messages of one TRL conversational record, `{"messages": [{"role", "content"}, ...]}`.

    Raises ValueError with the reason (the caller adds the file and line): no `messages`, a message that is not
    a role and a text, an unknown role, empty content, or no assistant turn to learn from.
    """
    if not isinstance(record, dict) or "messages" not in record:
        raise ValueError("missing the 'messages' key")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"message {i}: must be an object with a 'role' and a text 'content'")
        if message.get("role") not in ROLES:
            raise ValueError(f"message {i}: unknown role {message.get('role')!r} (one of {', '.join(ROLES)})")
        if not message["content"].strip():
            raise ValueError(f"message {i}: empty content")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def render_chat(template: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool = False,
                continue_final_message: bool = False, **template_kwargs: Any) -> str:
    """The conversation as the model reads it: with `add_generation_prompt` it ends where an answer starts, with
    `continue_final_message` inside the last message (an answer to go on with)."""
    return _render(template, messages, add_generation_prompt=add_generation_prompt,
                   continue_final_message=continue_final_message, **template_kwargs)[0]


def chat_tokens(tokenizer: Encoder, template: str, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation and its loss mask: 1 on the tokens the template's generation blocks
    cover (assistant content and its end-of-turn token), 0 elsewhere."""
    text, spans = _render(template, messages, return_assistant_tokens_mask=True)
    ids, offsets = tokenizer.encode_with_offsets(text)
    mask = [int(any(start < end_ and stop > start_ for start_, end_ in spans)) for start, stop in offsets]
    return ids, mask


def _render(template: str, messages: list[dict[str, Any]], **options: Any) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of its generation blocks. transformers is imported here, not at
    the top: it costs half a CPU-second, and every Ray worker that loads a checkpoint imports this module."""
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, spans = render_jinja_template([messages], chat_template=template, **options)
    except (jinja2.TemplateError, ValueError, TypeError) as e:
        raise ChatTemplateError(f"chat template: {type(e).__name__}: {e}") from None
    return rendered[0], (spans[0] if spans else [])
