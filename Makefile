# The README's two commands: `make run` (set up, then the Fashion-MNIST recipe in quick
# mode) and `make test` (set up, then the whole test suite). Set-up is idempotent.
VENV ?= .venv
OUT ?= runs/fashion-mnist
LOGDIR ?= $(OUT)/tensorboard

.PHONY: setup run test bench tensorboard
setup:
	@bash scripts/setup.sh

run: setup
	$(VENV)/bin/prh-lightning fashion-mnist --quick --out $(OUT)

test: setup
	$(VENV)/bin/python -m pytest -q tests

bench: setup
	for b in benchmarks/*.py; do case $$b in *gpu_check*) continue;; esac; $(VENV)/bin/python $$b || exit 1; done

# TensorBoard on the logs of `make run` (or LOGDIR=...), without activating the venv.
tensorboard: setup
	$(VENV)/bin/tensorboard --logdir $(LOGDIR)
