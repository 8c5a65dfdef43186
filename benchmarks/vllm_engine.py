"""vLLM's offline engine as peers_cpu.py drives it: run by the vLLM venv's Python (benchmarks/peers_setup.sh), never
by the package's.

Loads the HF folder once in `dtype`, then answers each stdin line `ROWS TOKENS` with one stdout line: the aggregate
tokens/s of ROWS greedy sequences of TOKENS new tokens each (EOS ignored) after the shared prompt. A line `ready`
comes first, once the engine is up and warmed.

    $VLLM_PYTHON benchmarks/vllm_engine.py HF_DIR float32|bfloat16 PROMPT
"""

import sys
import time

from vllm import LLM, SamplingParams


def main() -> None:
    hf_dir, dtype, prompt = sys.argv[1:4]
    llm = LLM(model=hf_dir, dtype=dtype, max_model_len=512, seed=0)
    llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
    print("ready", flush=True)
    for line in sys.stdin:
        rows, tokens = map(int, line.split())
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        start = time.perf_counter()
        outputs = llm.generate([prompt] * rows, params, use_tqdm=False)
        made = sum(len(o.outputs[0].token_ids) for o in outputs)
        print(made / (time.perf_counter() - start), flush=True)


if __name__ == "__main__":
    main()
