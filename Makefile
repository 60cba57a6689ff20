# `make demo` runs the Fashion-MNIST demo study; `make test` runs the test suite.
# Each target installs what it needs first: a virtual environment in .venv with the
# project and its test extras, and the Fashion-MNIST files from Debian's package.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: install data demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $@

data: $(FASHION_MNIST)

$(FASHION_MNIST):
	@if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'" >&2; exit 2; \
	fi

demo: install data
	$(BIN)/hpo run studies/fashion_mnist_demo.yaml

test: install data
	$(BIN)/python -m pytest

bench: install data
	$(BIN)/python -m bench.data_pipeline
	$(BIN)/python -m bench.hpo_efficiency
	$(BIN)/python -m bench.orchestration_overhead

clean:
	rm -rf $(VENV) .pytest_cache
