"""prepare-data tokens/s on the shared corpus vs the seed's way and vs the tokenizer alone, all measured in one run
(not a timed test).

The seed (ru-gpts on transformers 3.x) tokenized each whole file with the slow, pure-Python GPT2Tokenizer in one
process, cut fixed windows and pickled them. transformers 5.x no longer has that tokenizer (its GPT2Tokenizer is
Rust-backed now), so the slow one is rebuilt here from its published algorithm (byte-to-unicode map, the GPT-2
regex pre-split, lowest-rank-first merges with a per-word cache) and checked to give our ids on every file.
transformers 5.24's GPT2Tokenizer called the seed's way is reported as a second reference. The ceiling is the
tokenizer alone: reading the files and `encode_batch` on all of them, with the Rust tokenizer's own threads.

    .venv/bin/python benchmarks/data_prepare.py [--data ../shared/data] [--seq-len 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import tempfile
import time
from pathlib import Path

import regex

for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
                   "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}.items():
    os.environ.setdefault(key, value)

from rugpt_ray.config import data_root  # noqa: E402
from rugpt_ray.data import DataConfig, prepare_data, resolve_inputs  # noqa: E402
from rugpt_ray.tokenizer import load_tokenizer  # noqa: E402


def _bytes_to_unicode() -> dict[int, str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


class SlowGPT2Tokenizer:
    """The seed's tokenizer: pure-Python byte-level BPE as in transformers <= 4 `GPT2Tokenizer`."""

    PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def __init__(self, folder: Path):
        self.encoder = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        merges = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
        self.ranks = {tuple(m.split()): i for i, m in enumerate(m for m in merges if m)}
        self.byte_encoder = _bytes_to_unicode()
        self.cache: dict[str, list[str]] = {}

    def _bpe(self, token: str) -> list[str]:
        if token in self.cache:
            return self.cache[token]
        word = list(token)
        while len(word) > 1:
            pair = min(zip(word, word[1:], strict=False), key=lambda p: self.ranks.get(p, float("inf")))
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == pair:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self.cache[token] = word
        return word

    def tokenize(self, text: str) -> list[str]:
        out = []
        for piece in self.PATTERN.findall(text):
            out.extend(self._bpe("".join(self.byte_encoder[b] for b in piece.encode("utf-8"))))
        return out

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        return [self.encoder[t] for t in tokens]


SEED = "seed: slow Python GPT2Tokenizer, 1 process"
HF = "seed's calls on transformers 5.24 GPT2Tokenizer (Rust)"
WARM = "prepare-data, Ray already up"
ALONE = "the tokenizer alone: read + encode_batch, own threads"


def tokenizer_alone(tokenizer, files: list[str]) -> tuple[float, int]:
    """What prepare-data cannot beat: the files read and tokenized in one call, on every core the tokenizer uses."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # read at each call; Ray's workers took "false" when it started
    try:
        start = time.perf_counter()
        ids = tokenizer.encode_batch([Path(path).read_text(encoding="utf-8") for path in files])
        return time.perf_counter() - start, sum(map(len, ids))
    finally:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"


def seed_way(tokenizer, files: list[str], seq_len: int, cache: Path) -> tuple[float, int]:
    """Whole file -> tokenize -> ids -> non-overlapping windows (remainder dropped) -> pickle, one process."""
    start = time.perf_counter()
    tokens = 0
    for i, path in enumerate(files):
        ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(Path(path).read_text(encoding="utf-8")))
        tokens += len(ids)
        windows = [ids[j : j + seq_len] for j in range(0, len(ids) - seq_len + 1, seq_len)]
        with open(cache / f"{i}.pkl", "wb") as f:
            pickle.dump(windows, f)
    return time.perf_counter() - start, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(data_root()))
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best time of each way counts")
    args = ap.parse_args()
    data = Path(args.data)
    files = resolve_inputs(data / "corpus" / "train")
    mb = sum(os.path.getsize(path) for path in files) / 1e6
    ours = load_tokenizer(data / "tokenizer")
    slow = SlowGPT2Tokenizer(data / "tokenizer")
    for path in files:  # the rebuilt seed tokenizer must be the seed's tokenizer: same ids on every file
        text = Path(path).read_text(encoding="utf-8")
        assert slow.convert_tokens_to_ids(slow.tokenize(text)) == ours.encode(text), path
    from transformers import GPT2Tokenizer

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        import ray

        cfg = DataConfig(inputs=[str(data / "corpus" / "train")], tokenizer=str(data / "tokenizer"),
                         seq_len=args.seq_len, out=str(tmp / "cold"))
        start = time.perf_counter()
        meta = prepare_data(cfg, progress=False)  # starts Ray, like `rugpt-ray prepare-data` does
        cold = time.perf_counter() - start
        tokens = meta["splits"]["train"]["tokens"] - meta["splits"]["train"]["documents"]  # without the EOS
        # Other jobs on a shared machine come and go: alternate the ways for `rounds` rounds, keep each one's best.
        # The seed's tokenizers start each round with empty word caches, as in the one run the seed made: its
        # unbounded cache would otherwise hold every word of this corpus (ours is bounded to 10k words).
        best: dict[str, tuple[float, int]] = {}
        for i in range(args.rounds):
            slow.cache.clear()
            hf = GPT2Tokenizer.from_pretrained(str(data / "tokenizer"))
            for k, (name, tok) in enumerate(((SEED, slow), (HF, hf))):
                (tmp / f"pickles{k}-{i}").mkdir()
                seconds, n = seed_way(tok, files, args.seq_len, tmp / f"pickles{k}-{i}")
                best[name] = min(best.get(name, (seconds, n)), (seconds, n))
            cfg.out = str(tmp / f"warm{i}")
            start = time.perf_counter()
            prepare_data(cfg, progress=False)
            best[WARM] = min(best.get(WARM, (1e9, tokens)), (time.perf_counter() - start, tokens))
            best[ALONE] = min(best.get(ALONE, (1e9, tokens)), tokenizer_alone(ours, files))
        rows = [(name, *best[name]) for name in (SEED, HF)]
        rows += [("prepare-data, incl. Ray start (CLI run, once)", cold, tokens), (WARM, *best[WARM]),
                 (ALONE, *best[ALONE])]
        kept = meta["splits"]["train"]["tokens_kept"] / meta["splits"]["train"]["tokens"]
        cpus = ray.cluster_resources().get("CPU", 0)
        ray.shutdown()

    base = rows[0][2] / rows[0][1]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Ray CPUs {cpus:g}; "
          f"best of {args.rounds} alternating rounds; "
          f"load average {load_start[0]:.1f} before, {os.getloadavg()[0]:.1f} after (others' jobs skew timings)")
    print(f"corpus: {len(files)} files, {rows[0][2]:,} tokens; seq_len {args.seq_len}; prepare-data kept "
          f"{100 * kept:.2f}% of tokens in full blocks")
    print(f"| {'way':<56} | {'seconds':>8} | {'tokens/s':>10} | {'vs seed':>7} |")
    print(f"|{'-' * 58}|{'-' * 10}|{'-' * 12}|{'-' * 9}|")
    for name, seconds, tokens in rows:
        print(f"| {name:<56} | {seconds:>8.2f} | {tokens / seconds:>10,.0f} | {tokens / seconds / base:>6.1f}x |")
    print(f"prepare-data with Ray up makes {100 * best[ALONE][0] / best[WARM][0]:.0f}% of the tokenizer's own "
          f"throughput on the same files ({mb / best[WARM][0]:.2f} against {mb / best[ALONE][0]:.2f} MB/s)")


if __name__ == "__main__":
    main()
