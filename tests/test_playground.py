"""The playground page in a real browser (Debian's Chromium, driven by Playwright), and the Grafana dashboard against a
real scrape: one served app with an API key, as a user who opens http://127.0.0.1:PORT/ meets it."""

import json
import math
import re
import shutil
from pathlib import Path

import httpx
import pytest
from app_client import app_client
from playwright.sync_api import expect, sync_playwright
from polling import poll

from rugpt_ray.checkpoints import save_native
from rugpt_ray.config import preset
from rugpt_ray.serving import ServeConfig
from rugpt_ray.serving.engine import STEP_PAUSE_ENV

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("playground")]

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "serve_configs" / "grafana" / "rugpt-serving.json"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
KEY_ENV, KEY = "RUGPT_PLAYGROUND_TEST_KEY", "playground-test-key"
PROMPT = "Мороз и солнце; день чудесный!"
LONG = 200  # tokens: a request this long takes 20 s at least, however fast the machine, so Stop comes first
STEP_PAUSE_S = 0.1
WAIT_MS = 60_000


@pytest.fixture(scope="module")
def server(ray_local, tmp_path_factory, make_model, data_dir):
    """One tiny model with the built-in chat template, behind an API key, on its own loopback port; the client
    sends the key."""
    path = save_native(make_model(preset("tiny"), seed=1), tmp_path_factory.mktemp("playground") / "tiny")
    cfg = ServeConfig(models={"tiny": {"path": str(path), "chat_template": "rugpt3-chat"}},
                      tokenizer=str(data_dir / "tokenizer"), max_new_tokens=LONG, api_key_env=KEY_ENV)
    env = {KEY_ENV: KEY, STEP_PAUSE_ENV: str(STEP_PAUSE_S)}
    with app_client(cfg, "playground", ray_actor_options={"runtime_env": {"env_vars": env}}) as client:
        client.headers["Authorization"] = f"Bearer {KEY}"
        yield client


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium, checked for before any server starts."""
    if not Path(CHROMIUM).exists():
        pytest.skip("no Chromium for the browser tests: install it with `apt-get install -y chromium` (.ci/run does)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser, server):
    """One browser tab on the playground, shared by the tests in order (the key given once stays in the tab)."""
    tab = browser.new_page(viewport={"width": 1200, "height": 760})
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    tab.goto(str(server.base_url))
    tab.set_default_timeout(WAIT_MS)
    yield tab
    tab.close()
    assert not errors, f"the page's JavaScript failed: {errors}"


def generate(page, **settings: str) -> str:
    """Fill the page's settings, press Generate, wait for the end; the status line."""
    for name, value in settings.items():
        page.fill(f"#{name}", value)
    page.click("#generate")
    expect(page.locator("#generate")).to_be_enabled(timeout=WAIT_MS)
    return page.inner_text("#status")


def test_the_page_asks_for_the_key_then_lists_the_models(page, server):
    no_key = {"Authorization": ""}
    assert server.get("/v1/models", headers=no_key).status_code == 401  # the API needs the key
    assert server.get("/playground/settings", headers=no_key).status_code == 401
    for path in ("/", "/playground", "/playground/static/playground.js"):  # the page's files are open
        r = server.get(path, headers=no_key)
        assert r.status_code == 200 and r.headers["content-security-policy"].startswith("default-src 'self'")
    assert server.get("/playground/static/..%2Fplayground.py", headers=no_key).status_code == 404
    page.wait_for_selector("#key-form:not([hidden])")
    assert "missing or wrong API key" in page.inner_text("#error")  # the server's own words
    assert page.evaluate("document.activeElement.id") == "api-key"
    page.fill("#api-key", "wrong")
    page.click("#key-form button")
    expect(page.locator("#error")).to_contain_text("401: missing or wrong API key")
    page.fill("#api-key", KEY)
    page.click("#key-form button")
    page.wait_for_selector("#model option[value=tiny]", state="attached")
    page.wait_for_selector("#error", state="hidden")
    page.select_option("#model", "tiny")
    assert page.evaluate("sessionStorage.getItem('rugpt-api-key')") == KEY
    assert page.evaluate("localStorage.length") == 0
    # the server's defaults and limits reached the controls
    assert page.input_value("#temperature") == "1" and page.input_value("#max_tokens") == "16"
    assert page.get_attribute("#max_tokens", "max") == str(LONG) and page.get_attribute("#top_p", "max") == "1"
    assert page.inner_text("#stop-label").endswith("(up to 8)")


def test_greedy_text_and_hovered_logprobs_equal_the_apis(page, server, tmp_path):
    page.fill("#prompt", PROMPT)
    page.click("#greedy")
    status = generate(page, max_tokens="12")
    api = server.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                                               "logprobs": 5}).json()
    (choice,) = api["choices"]
    assert page.text_content("#choice-0 .text") == choice["text"] and choice["text"]
    usage = api["usage"]
    assert f"{usage['prompt_tokens']} prompt + {usage['completion_tokens']} generated tokens" in status
    assert "first token after" in status and int(page.get_attribute("#status", "data-ttft-ms")) >= 0

    logprobs, spans, token = choice["logprobs"], page.locator("#choice-0 .tok"), 0
    for i in range(spans.count()):  # a span holds one token, or the tokens of a character split over them
        spans.nth(i).hover()
        info = page.locator("#token-info")
        info.wait_for(state="visible")
        for chosen, table in zip(info.locator("p.chosen").all(), info.locator("table").all(), strict=True):
            assert float(chosen.get_attribute("data-logprob")) == logprobs["token_logprobs"][token]
            assert f"logprob {logprobs['token_logprobs'][token]:.4f}" in chosen.inner_text()
            shown = {row.get_attribute("data-token"): float(row.get_attribute("data-logprob"))
                     for row in table.locator("tr.alternative").all()}
            assert shown == dict(sorted(logprobs["top_logprobs"][token].items(), key=lambda kv: -kv[1])[:5])
            token += 1
    assert token == len(logprobs["tokens"]) == usage["completion_tokens"]
    spans.nth(2).focus()  # the keyboard shows the same
    assert page.locator("#token-info").is_visible()
    page.screenshot(path=tmp_path / "playground.png")
    assert (tmp_path / "playground.png").stat().st_size > 10_000


def test_chat_mode_with_a_json_schema_equals_the_api(page, server):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}}, "required": ["name"],
              "additionalProperties": False}
    page.check("input[name=mode][value=chat]")
    page.click("#structured summary")  # the schema box opens
    page.fill("#schema", json.dumps(schema))
    status = generate(page, max_tokens="40")
    messages = [{"role": "system", "content": "Ты — полезный ассистент."},
                {"role": "user", "content": "Кто такой Пушкин?"}]  # the page's first conversation
    api = server.post("/v1/chat/completions", json={
        "model": "tiny", "messages": messages, "max_tokens": 40, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "playground", "schema": schema}}}).json()
    (choice,) = api["choices"]
    content = choice["message"]["content"]
    assert page.text_content("#choice-0 .text") == content and choice["finish_reason"] == "stop", status
    assert set(json.loads(content)) == {"name"}
    # the answer joined the conversation, and the user's turn follows
    roles = page.eval_on_selector_all("#messages select", "selects => selects.map(s => s.value)")
    assert roles == ["system", "user", "assistant", "user"]
    assert page.evaluate("document.activeElement.getAttribute('aria-label')") == "Message 4"
    page.fill("#schema", "{not json")  # a bad schema is refused before anything is sent
    generate(page)
    assert page.inner_text("#error").startswith("JSON schema: not JSON")
    page.fill("#schema", "")
    page.check("input[name=mode][value=completion]")


def test_errors_are_shown_as_the_server_words_them(page):
    generate(page, top_p="5")
    assert "top_p" in page.inner_text("#error") and page.inner_text("#error").startswith("422")
    page.click("#reset")
    assert page.input_value("#top_p") == "1"


def test_stop_cancels_the_request_and_the_server_frees_its_rows(page, server):
    before = server.get("/stats").json()["models"]["tiny"]
    page.fill("#max_tokens", str(LONG))
    page.click("#generate")
    tokens_or_error = page.locator("#choice-0 .tok").nth(2).or_(page.locator("#error:not([hidden])"))
    expect(tokens_or_error).to_be_visible(timeout=WAIT_MS)
    assert page.locator("#error").is_hidden(), page.inner_text("#error")
    page.click("#stop-button")
    expect(page.locator("#generate")).to_be_enabled(timeout=WAIT_MS)
    assert page.inner_text("#status").startswith("stopped")

    def settled() -> dict | None:
        now = server.get("/stats").json()["models"]["tiny"]
        return now if now["active_requests"] == 0 else None

    now = poll(settled, 30, "the stopped request to leave the batch")
    assert now["active_rows"] == 0 and now["cancelled_requests"] == before["cancelled_requests"] + 1
    assert now["tokens"] - before["tokens"] < LONG


def dashboard_metrics() -> set[str]:
    """Every metric name in the dashboard's PromQL (all Ray-exported: `ray_` prefixed)."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return {name for expr in exprs for name in re.findall(r"\bray_[a-z0-9_]+", expr)}


def test_every_dashboard_metric_is_in_a_real_scrape(server, ray_metrics_port):
    """After a generation and a refused request (and those above), Ray's Prometheus endpoint has every series the
    dashboard queries, with the labels it is templated on."""
    names = dashboard_metrics()
    assert {"ray_rugpt_time_to_first_token_seconds_bucket", "ray_rugpt_model_loads_total",
            "ray_serve_num_deployment_http_error_requests_total"} <= names
    assert server.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3}).status_code == 200
    assert server.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404  # an error code

    def scraped() -> dict[str, str] | None:
        samples: dict[str, str] = {}
        for line in httpx.get(f"http://127.0.0.1:{ray_metrics_port}/metrics", timeout=10).text.splitlines():
            if 'application="playground"' in line:
                samples.setdefault(line.split("{", 1)[0], line)
        return samples if names <= set(samples) else None

    samples = poll(scraped, 90, f"the dashboard's metrics {sorted(names)} (exported every 10 s)", interval=2)
    for name in names:
        if name.startswith("ray_rugpt_"):
            assert all(f'{label}="' in samples[name] for label in ("model", "application", "deployment")), name
    assert math.isfinite(float(samples["ray_rugpt_model_loads_total"].rsplit(" ", 1)[1]))
