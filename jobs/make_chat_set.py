"""`python jobs/make_chat_set.py --out DIR`: a small chat set for `jobs/configs/chat-tiny-cpu.yaml`, built from the
shared corpus: DIR/train.jsonl from `corpus/train`, DIR/valid.jsonl from `corpus/valid` (other books, so the
validation phrases are held out).

The task is one a tiny model learns in a few dozen steps, so the masked validation loss shows it: the user asks to
repeat a phrase (a sentence of the corpus) and the assistant says it back. A conversation has one to three such
exchanges, some after a system turn; the longest do not fit a 128-token block and are cut at a turn. TRL's
conversational format, one conversation per line. Each file is written under a temporary name and renamed, and
nothing is written inside $RUGPT_DATA.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
from pathlib import Path

from rugpt_ray.config import data_root
from rugpt_ray.errors import UserError

ASKS = ("Повтори: {}", "Повтори дословно: {}", "Скажи ещё раз: «{}»", "Повтори эту фразу: {}")
SYSTEM = "Ты повторяешь фразы пользователя слово в слово."
_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+")


def phrases(folder: Path, min_words: int = 3, max_words: int = 12) -> list[str]:
    """The corpus folder's sentences of a few words, whitespace collapsed, in file order."""
    out = []
    for path in sorted(folder.glob("*.txt")):
        for sentence in _SENTENCE_END.split(path.read_text(encoding="utf-8")):
            sentence = " ".join(sentence.split())
            if min_words <= len(sentence.split()) <= max_words:
                out.append(sentence)
    return out


def conversations(pool: list[str], count: int, rng: random.Random) -> list[dict]:
    """`count` conversations of one to three repeat-this exchanges, a third of them after a system turn."""
    out = []
    for _ in range(count):
        messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 1 / 3 else []
        for phrase in rng.sample(pool, rng.choice((1, 1, 2, 3))):
            messages += [{"role": "user", "content": rng.choice(ASKS).format(phrase)},
                         {"role": "assistant", "content": phrase}]
        out.append({"messages": messages})
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    """One record per line, under a temporary name in the same folder, then renamed."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_chat_set(out: Path, corpus: Path, train: int, valid: int, seed: int) -> dict[str, Path]:
    """train.jsonl and valid.jsonl in `out` (created), from the corpus's train and valid books."""
    if out.resolve().is_relative_to(data_root().resolve()):
        raise UserError(f"--out {out}: inside the shared data folder {data_root()}, which is read-only")
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, count in (("train", train), ("valid", valid)):
        pool = phrases(corpus / split)
        if not pool:
            raise UserError(f"{corpus / split}: no sentences of 3-12 words in its .txt files")
        written[split] = out / f"{split}.jsonl"
        write_jsonl(written[split], conversations(pool, count, rng))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder for train.jsonl and valid.jsonl")
    p.add_argument("--corpus", type=Path, default=data_root() / "corpus", help="default $RUGPT_DATA/corpus")
    p.add_argument("--train", type=int, default=2000, help="training conversations (default 2000)")
    p.add_argument("--valid", type=int, default=200, help="validation conversations (default 200)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        written = make_chat_set(args.out, args.corpus, args.train, args.valid, args.seed)
    except UserError as e:
        print(f"make_chat_set: error: {e}", file=sys.stderr)
        return 2
    for path in written.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
