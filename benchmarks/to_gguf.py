"""An HF export (`rugpt-ray export RUN OUT --to hf`) to GGUF with llama.cpp's converter, for the peer comparison.

llama.cpp's `convert_hf_to_gguf.py` recognises a BPE tokenizer by the hash of its ids for a fixed text, and it
knows ruGPT3XL's HF port (evilfreelancer/ruGPT3XL) but not the ai-forever tokenizer's ids, which differ from
that port's. ruGPT3's tokenizer is GPT-2's byte-level BPE with GPT-2's pre-split, so its hash is registered here
as "gpt-2" before the converter runs. Paths come from benchmarks/peers_setup.sh's peers.env.

    .venv/bin/python benchmarks/to_gguf.py PEERS_DIR HF_DIR OUT.gguf [f32|bf16|f16|q8_0]
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

RUGPT3_BPE_HASH = "6af741926fc734a2f14336f72b696c7154611be519447976ff95930fdc0fa6f4"


def peers_env(folder: Path) -> dict[str, str]:
    """What benchmarks/peers_setup.sh set up in `folder` (its peers.env), empty where it set up nothing."""
    path = folder / "peers.env"
    if not path.is_file():
        return {}
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def main() -> None:
    peers, hf_dir, out = (Path(a) for a in sys.argv[1:4])
    outtype = sys.argv[4] if len(sys.argv) > 4 else "f32"
    env = peers_env(peers)
    if "LLAMA_CONVERT" not in env:
        sys.exit(f"{peers / 'peers.env'}: no llama.cpp converter (run benchmarks/peers_setup.sh)")
    converter = Path(env["LLAMA_CONVERT"])
    sys.path[:0] = [env["LLAMA_GGUF_PY"], str(converter.parent)]
    from hashlib import sha256

    from conversion.base import TextModel

    original = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        import re

        source = Path(sys.modules[TextModel.__module__].__file__).read_text()
        text = eval(re.search(r"chktxt = ('.*')\n", source).group(1))  # the converter's own fixed text
        if sha256(str(tokenizer.encode(text)).encode()).hexdigest() == RUGPT3_BPE_HASH:
            return "gpt-2"
        return original(self, tokenizer)

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(converter), str(hf_dir), "--outtype", outtype, "--outfile", str(out)]
    runpy.run_path(str(converter), run_name="__main__")


if __name__ == "__main__":
    main()
