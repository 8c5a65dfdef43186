"""The ruGPT3 tokenizer: GPT-2 byte-level BPE over `vocab.json` + `merges.txt`.

EOS and padding rule (one rule for the 50257- and the 50264-row models):
the released vocab has `<pad>`=0, `<s>`=1, `</s>`=2, `<unk>`=3, `<mask>`=4 and no `<|endoftext|>`
(HF would append that one as id 50257, a row the 50257-row models do not have). So we never add a token:
EOS (end of document, stop of generation) is `</s>`, padding is `<pad>`, BOS is `<s>`. All five are
matched as single special tokens when they appear literally in text (the seed's prompts start with `<s>`);
any other text encodes exactly as HF `GPT2Tokenizer` does.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cached_property
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from rugpt_ray.errors import UserError, cause_line

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<mask>")
TOKENIZER_FILES = ("vocab.json", "merges.txt")


class RuGPTTokenizer:
    """Fast byte-level BPE with the project's EOS/pad rule; `encode_batch` runs in Rust threads."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        vocab, merges = (str(self.folder / name) for name in TOKENIZER_FILES)
        tok = Tokenizer(models.BPE.from_file(vocab, merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        self._vocab = json.loads((self.folder / "vocab.json").read_text(encoding="utf-8"))
        missing = [t for t in SPECIAL_TOKENS if t not in self._vocab]
        if missing:
            raise UserError(f"{self.folder / 'vocab.json'}: special tokens {missing} are not in the vocabulary")
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
        self._tok = tok
        self.vocab_size = len(self._vocab)
        self.pad_id = self._vocab["<pad>"]
        self.bos_id = self._vocab["<s>"]
        self.eos_id = self._vocab["</s>"]

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's character span in `text` (which tokens a chat's loss mask covers)."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._vocab.get(token)

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (a token can hold part of a UTF-8 character)."""
        return self._token_bytes[token]

    @cached_property
    def _token_bytes(self) -> list[bytes]:
        byte_of = _byte_level_alphabet()
        out = [b""] * self.vocab_size
        for text, token in self._vocab.items():
            out[token] = bytes(byte_of[c] for c in text)
        return out

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over the files that define the token ids; caches built with another tokenizer are refused."""
        h = hashlib.sha256()
        for name in TOKENIZER_FILES:
            h.update((self.folder / name).read_bytes())
        return h.hexdigest()[:16]


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet (char -> byte): the printable bytes stand for themselves, the other 68 for
    chr(256), chr(257), ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


def resolve_tokenizer_folder(path_or_hub_id: str | os.PathLike) -> Path:
    """A local folder with vocab.json/merges.txt, or a hub id fetched through huggingface_hub."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        missing = [n for n in TOKENIZER_FILES if not (path / n).is_file()]
        if missing:
            raise UserError(f"tokenizer folder {path}: missing {', '.join(missing)}")
        return path
    if path.exists():
        raise UserError(f"tokenizer {path}: expected a folder with {' and '.join(TOKENIZER_FILES)}")
    name = str(path_or_hub_id)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise UserError(f"tokenizer {name}: no such folder (and not a hub id like 'org/name')")
    from huggingface_hub import hf_hub_download

    try:
        files = [hf_hub_download(name, n) for n in TOKENIZER_FILES]
    except Exception as e:  # offline, unknown repo, missing file, full disk: one line that keeps the cause
        raise UserError(f"tokenizer {name}: could not fetch {', '.join(TOKENIZER_FILES)} from the hub: "
                        f"{cause_line(e)}") from e
    return Path(files[0]).parent


def load_tokenizer(path_or_hub_id: str | os.PathLike) -> RuGPTTokenizer:
    """Load the ruGPT3 tokenizer from a folder or a hub id."""
    return RuGPTTokenizer(resolve_tokenizer_folder(path_or_hub_id))
