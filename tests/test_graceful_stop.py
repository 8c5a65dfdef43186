"""`rugpt-ray serve --config serve_configs/local.yaml` (the config `serve run` takes, which Ray's command cannot stop
gracefully) stopped by SIGTERM (what containers and Kubernetes send) while a request is in flight: the request
finishes, new ones get 503 with Retry-After meanwhile, and the process exits 0 without a stack trace. Ctrl-C's
SIGINT takes the same handler: test_serving's command-line server (the flags' case) is stopped with it.

The port is the app's ingress replica's own (Ray Serve's direct ingress, not Serve's proxy), and a server started
again at once takes it back, although the stop closed a client's kept-alive connection (whose TIME_WAIT the kernel
keeps on the server's side for a minute)."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import psutil
import pytest
from polling import poll
from ports import free_port
from test_serving import stop_server, wait_ready

from rugpt_ray.checkpoints import save_native
from rugpt_ray.config import preset
from rugpt_ray.serving.engine import STEP_PAUSE_ENV

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("graceful_stop")]

TOKENS = 100
"""The in-flight request's length: with the engine's 60 ms pause per decode step (its test seam) it runs at least
6 s after its first token, however fast the machine, so the stop begins while it streams (the server says how many
requests were in flight)."""


def listener(port: int) -> str:
    """The command line of the process listening on `port`."""
    pids = {c.pid for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    return " ".join(psutil.Process(pids.pop()).cmdline())


def test_sigterm_lets_the_request_in_flight_finish_and_refuses_new_ones(tmp_path, make_model, data_dir):
    model = save_native(make_model(preset("tiny"), seed=1), tmp_path / "tiny")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    code = "import sys; from rugpt_ray.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, STEP_PAUSE_ENV: "0.06", "RUGPT_SERVE_MODEL": str(model), "RUGPT_DATA": str(data_dir)}
    command = [sys.executable, "-c", code, "serve", "--config", str(REPO / "serve_configs" / "local.yaml"), "--port",
               str(port)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    kept_alive, again = httpx.Client(base_url=base), None  # a pooled client, as the OpenAI SDK's
    try:
        wait_ready(f"{base}/healthz", proc)
        assert kept_alive.get("/healthz").status_code == 200  # its connection stays open until the server closes it
        assert listener(port).startswith("ray::ServeReplica:rugpt:RuGPTRouter"), listener(port)
        events: list = []
        first, status = threading.Event(), []

        def stream() -> None:
            body = {"prompt": "Привет", "max_tokens": TOKENS, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
                status.append(r.status_code)
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        payload = line.removeprefix("data: ")
                        events.append(payload if payload == "[DONE]" else json.loads(payload))
                        first.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(120), f"the streamed request never started: {status}"
        proc.send_signal(signal.SIGTERM)

        def refused() -> httpx.Response | None:
            r = httpx.post(f"{base}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=30)
            return r if r.status_code == 503 else None

        r = poll(refused, 60, "a new request to be refused while stopping")
        assert r.json()["error"]["code"] == "stopping" and r.headers["retry-after"] == "1"
        reader.join(120)
        out, _ = proc.communicate(timeout=120)
        kept_alive.close()  # the server closed its end first: that end waits in TIME_WAIT
        assert any(c.status == psutil.CONN_TIME_WAIT and c.laddr.port == port for c in psutil.net_connections("tcp"))
        again = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_ready(f"{base}/healthz", again)
        stop_server(again)
    finally:
        kept_alive.close()
        for server in (proc, again):
            if server is not None and server.poll() is None:
                server.kill()
    assert events[-1] == "[DONE]", events[-3:]
    text = "".join(e["choices"][0]["text"] for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length" and text, events[-2:]
    assert proc.returncode == 0, out[-3000:]
    stopping = re.search(r"stopping: new requests get 503; (\d+) in flight get up to 30 s", out)  # the default
    # the stream, and maybe a refused() request that arrived before the stop began
    assert stopping and int(stopping[1]) >= 1 and "stopped\n" in out, out[-3000:]
    assert "Traceback" not in out and "SIGTERM received" not in out, out[-3000:]
