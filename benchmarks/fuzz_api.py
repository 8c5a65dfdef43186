"""A long Schemathesis run against the served API: every phase (coverage's boundary cases, then fuzzing), all default
checks plus not_a_server_error, on every operation of /openapi.json, with a key set (so `ignored_auth` runs too).

Starts a local Ray + Serve on 127.0.0.1 with a freshly initialised `tiny` model and small limits (as
tests/test_api_contract.py does, which runs only the fuzzing phase with a few examples), runs `st run` with a fixed
seed, then prints the cases tried, the failures by kind and whether the server still answers. schemathesis.toml
(repository root) says which statuses count as accepting valid data. Exit status: Schemathesis's (0: no failure).

    python benchmarks/fuzz_api.py [--max-examples 100] [--seed 7] [--out result.json]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
from serve_load import free_port  # benchmarks/ is on sys.path when a script there runs

from rugpt_ray.config import data_root

REPO = Path(__file__).resolve().parents[1]
KEY_ENV = "RUGPT_FUZZ_KEY"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-examples", type=int, default=100, choices=range(1, 10001), metavar="1..10000",
                        help="cases per operation and phase")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--tokenizer", default=str(data_root() / "tokenizer"))
    parser.add_argument("--out", help="write the summary as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import torch
    from ray import serve

    from rugpt_ray.checkpoints import save_native
    from rugpt_ray.config import preset
    from rugpt_ray.model import GPT
    from rugpt_ray.serving import ServeConfig
    from rugpt_ray.serving.app import serve_app

    torch.manual_seed(0)
    scratch = Path(tempfile.mkdtemp(prefix="fuzz-api-"))
    model_dir = save_native(GPT(preset("tiny")), scratch / "tiny")
    key = os.urandom(16).hex()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = ServeConfig(models={"tiny": {"path": str(model_dir), "chat_template": "rugpt3-chat"}},
                      tokenizer=args.tokenizer, max_new_tokens=16, max_prompt_tokens=64, max_n=2, max_batch_size=8,
                      max_prompts=4, max_total_tokens=512, api_key_env=KEY_ENV, grammar_compile_timeout_s=1.0)
    serve.run(serve_app(cfg, ray_actor_options={"runtime_env": {"env_vars": {KEY_ENV: key}}}), name="fuzz",
              route_prefix="/")
    report = scratch / "report.json"
    try:
        run = subprocess.run([str(Path(sys.executable).parent / "st"), "--config-file", str(REPO / "schemathesis.toml"),
                              "run", f"{url}/openapi.json",
                              "--seed", str(args.seed), "--max-examples", str(args.max_examples),
                              "--generation-deterministic", "--workers", "1", "--request-timeout", "120",
                              "-H", f"Authorization: Bearer {key}", "--report", "json",
                              "--report-json-path", str(report)], cwd=scratch, text=True, capture_output=True)
        healthy = httpx.get(f"{url}/healthz", timeout=30).status_code == 200
    finally:
        serve.shutdown()
        ray.shutdown()
    print(run.stdout[-8000:], run.stderr[-2000:], sep="\n")
    data = json.loads(report.read_text())
    failures = {f["code"]: f["count"] for f in data["failures"]}
    summary = {"max_examples": args.max_examples, "seed": args.seed, "cases": data["test_cases"]["generated"],
               "cases_with_failures": data["test_cases"]["with_failures"], "failures": failures,
               "exit_code": run.returncode, "healthy_after": healthy}
    print(json.dumps(summary))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
