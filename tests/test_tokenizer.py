"""The ruGPT3 tokenizer: HF GPT-2's ids on plain text, the project's EOS/pad rule, fingerprints, clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from rugpt_ray.errors import UserError
from rugpt_ray.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def prose(data_dir: Path) -> list[str]:
    """A few thousand characters of each validation text, cut at line ends."""
    files = sorted((data_dir / "corpus" / "valid").glob("*.txt"))
    return [p.read_text(encoding="utf-8")[:4000].rsplit("\n", 1)[0] for p in files]


def test_plain_text_encodes_as_hf_gpt2_does(tokenizer, prose, data_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    assert prose and all(len(text) > 1000 for text in prose)
    for text in prose:
        ids = tokenizer.encode(text)
        assert ids == hf(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode_batch(prose) == [tokenizer.encode(text) for text in prose]


def test_no_token_is_added_and_the_specials_are_single_ids(tokenizer, data_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    assert len(hf) == 50258 and hf.eos_token == "<|endoftext|>"  # HF appends id 50257: a row 50257-row models lack
    assert tokenizer.vocab_size == len(tokenizer) == 50257 and tokenizer.token_to_id("<|endoftext|>") is None
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    ids = tokenizer.encode("<s>Пушкин родился</s><pad>")
    assert ids[0] == 1 and ids[-2:] == [2, 0]  # the seed's prompts start with a literal <s>
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Пушкин родился"


def test_token_bytes_join_to_the_decoded_text(tokenizer, prose):
    for text in prose:
        ids = tokenizer.encode("<s>" + text)
        assert b"".join(tokenizer.token_bytes(t) for t in ids).decode("utf-8") == "<s>" + text
    split = [t for t in range(len(tokenizer)) if tokenizer.token_bytes(t) in {bytes([b]) for b in range(128, 256)}]
    assert split and all(tokenizer.decode([t]) == "\ufffd" for t in split)  # half a character each


def test_fingerprint_follows_the_files_that_define_the_ids(tokenizer, data_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(data_dir / "tokenizer", copy)
    assert load_tokenizer(copy).fingerprint == tokenizer.fingerprint  # the folder's place does not matter
    merges = (copy / "merges.txt").read_text(encoding="utf-8").splitlines()
    (copy / "merges.txt").write_text("\n".join([*merges, merges[1]]) + "\n", encoding="utf-8")  # one merge twice
    assert load_tokenizer(copy).fingerprint != tokenizer.fingerprint


def test_bad_folders_and_names_are_one_clear_error(data_dir, tmp_path):
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(data_dir / "tokenizer" / "vocab.json", half)
    with pytest.raises(UserError, match="tokenizer folder .*half: missing merges.txt"):
        load_tokenizer(half)
    with pytest.raises(UserError, match="expected a folder with vocab.json and merges.txt"):
        load_tokenizer(half / "vocab.json")
    with pytest.raises(UserError, match="tokenizer /no/such: no such folder"):
        load_tokenizer("/no/such")
    (half / "merges.txt").write_text("#version: 0.2\n")
    (half / "vocab.json").write_text('{"a": 0, "<pad>": 1}')
    with pytest.raises(UserError, match=r"special tokens \['<s>', '</s>', '<unk>', '<mask>'\] are not in"):
        load_tokenizer(half)


@pytest.mark.slow  # the hub client retries a refused connection for about 20 s before it gives up
def test_an_unreachable_hub_is_reported_with_its_cause(tmp_path):
    """A refused connection, a gated repo and a full disk must not read the same: the line keeps the cause."""
    import os
    import subprocess
    import sys

    from ports import free_port

    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
           "HF_HOME": str(tmp_path)}  # nothing listens there
    code = ("from rugpt_ray.errors import UserError\nfrom rugpt_ray.tokenizer import load_tokenizer\n"
            "try:\n    load_tokenizer('org/name')\nexcept UserError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    line = out.stdout.strip()
    assert line.startswith("tokenizer org/name: could not fetch vocab.json, merges.txt from the hub: "), line
    assert "LocalEntryNotFoundError" in line and "ConnectError: [Errno 111] Connection refused" in line, line
    assert "\n" not in line
