# The two commands a fresh machine needs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist

.PHONY: install test lint imports demo bench ablation fuzz clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	# torch/torchvision first: pip takes both from this machine's disk.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	touch $@

fashion-mnist:
	@if [ ! -f $(FMNIST_DIR)/t10k-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST missing: install the Debian package dataset-fashion-mnist" >&2; exit 1; fi; \
	fi

install: $(VENV)/.installed fashion-mnist

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

imports: install
	$(BIN)/lint-imports
	$(BIN)/python scripts/import_graph.py

demo: install
	$(BIN)/python -m vitq.demo

bench: install
	$(BIN)/vitq bench --model fmnist-vit-tiny --preset quick --bits 3,4,6 \
	  --methods isvit,repq,ptq-uniform --calib fashion-mnist:train:1024 \
	  --eval fashion-mnist:test --json bench-out/bench.json

# The upload fuzzer's long profile: random, 10x the cases of `make test` (tests/api/test_upload_fuzz.py).
fuzz: install
	VITQ_FUZZ_PROFILE=long $(BIN)/python -m pytest -q -s tests/api/test_upload_fuzz.py

ablation: install
	$(BIN)/vitq ablation --model fmnist-vit-tiny --preset quick --iters 20 --bits 3 --seeds 3 \
	  --calib fashion-mnist:train:1024 --eval fashion-mnist:test --json bench-out/ablation-seeds.json

clean:
	rm -rf $(VENV) .vitq bench-out
