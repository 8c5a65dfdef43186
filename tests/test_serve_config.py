"""ServeConfig's `models:` entries: a path, or a path and the chat template for a checkpoint that has none."""

from pathlib import Path

import pytest

from rugpt_ray.chat import DEFAULT_CHAT_TEMPLATE
from rugpt_ray.errors import UserError
from rugpt_ray.serving.config import ModelSpec, ServeConfig


def config(models: dict) -> ServeConfig:
    return ServeConfig.from_dict({"models": models, "tokenizer": "tok"})


def test_a_model_is_a_path_or_a_path_and_a_chat_template():
    cfg = config({"a": "runs/a", "b": {"path": "runs/b", "chat_template": DEFAULT_CHAT_TEMPLATE}})
    assert cfg.models == {"a": ModelSpec(path="runs/a"),
                          "b": ModelSpec(path="runs/b", chat_template=DEFAULT_CHAT_TEMPLATE)}
    assert cfg.default_model == "a"


@pytest.mark.parametrize("models, message", [
    ({"m": {"path": "p", "chat_templat": "x"}}, "serve config: models.m.chat_templat Extra inputs are not permitted"),
    ({"m": {"chat_template": DEFAULT_CHAT_TEMPLATE}}, "serve config: models.m.path Field required"),
    ({"m": {"path": "p", "chat_template": ""}}, "serve config: models.m.chat_template String should have at least 1"),
    ({"m": ""}, "serve config: models.m.path String should have at least 1 character"),
    ({"": "p"}, "serve config: models model names must be non-empty"),
])
def test_bad_model_entries_say_which_in_one_line(models, message):
    with pytest.raises(UserError) as e:
        config(models)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_resolving_keeps_a_built_in_name_and_makes_a_template_file_absolute(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "tok").mkdir()
    (tmp_path / "mine.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    monkeypatch.chdir(tmp_path)
    cfg = config({"named": {"path": "model", "chat_template": DEFAULT_CHAT_TEMPLATE},
                  "filed": {"path": "model", "chat_template": "mine.jinja"}, "bare": "model"}).resolved()
    assert cfg.models["named"] == ModelSpec(path=str(tmp_path / "model"), chat_template=DEFAULT_CHAT_TEMPLATE)
    assert cfg.models["filed"].chat_template == str(tmp_path / "mine.jinja")
    assert cfg.models["bare"].chat_template is None


@pytest.mark.parametrize("template, message", [
    ("nope", "model m: chat template 'nope': neither a built-in name (rugpt3-chat) nor a file"),
    ("broken.jinja", "model m: chat template "),
])
def test_a_chat_template_that_cannot_be_used_fails_where_the_app_is_built(tmp_path, monkeypatch, template, message):
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}")
    (tmp_path / "tok").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        config({"m": {"path": str(Path(tmp_path)), "chat_template": template}}).resolved()
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
