# make demo: create .venv, install, run infertune on the bundled digits CNN, write results
# make test: create .venv, install, run the whole test suite (slow end-to-end tests included)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev
DEMO_OUT ?= demo-out
DIGITS := examples/digits

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p $(DEMO_OUT)
	$(PY) -m infertune inspect $(DIGITS)/digits_cnn.onnx -o $(DEMO_OUT)/inspect.json
	$(PY) -m infertune run $(DIGITS)/digits_cnn.onnx --data $(DIGITS)/test.npz -o $(DEMO_OUT)/reference.npz
	$(PY) -m infertune compare $(DEMO_OUT)/reference.npz $(DIGITS)/digits_cnn.onnx \
		--data $(DIGITS)/test.npz --opt-level disable --check 'cosine>=0.99999' \
		-o $(DEMO_OUT)/compare.json
	$(PY) -m infertune compare $(DIGITS)/digits_cnn.onnx $(DIGITS)/digits_cnn.onnx \
		--data $(DIGITS)/test.npz --batch 32 --check 'top1_drop<=0.5' -o $(DEMO_OUT)/accuracy.json
	$(PY) -m infertune quantize $(DIGITS)/digits_cnn.onnx --data $(DIGITS)/calib.npz --method auto \
		-o $(DEMO_OUT)/digits_cnn.int8.onnx
	$(PY) -m infertune compare $(DIGITS)/digits_cnn.onnx $(DEMO_OUT)/digits_cnn.int8.onnx \
		--data $(DIGITS)/test.npz --batch 60 --check 'top1_drop<=0.5' -o $(DEMO_OUT)/int8_accuracy.json
	$(PY) -m infertune bench $(DIGITS)/digits_cnn.onnx --data $(DIGITS)/test.npz --threads 1 \
		--time 2 -o $(DEMO_OUT)/bench.json
	$(PY) -m infertune bench $(DEMO_OUT)/digits_cnn.int8.onnx --data $(DIGITS)/test.npz --threads 1 \
		--time 2 -o $(DEMO_OUT)/bench_int8.json
	@echo "results written to $(DEMO_OUT)/"

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) benchmarks/bench_overhead.py
	$(PY) benchmarks/quantize.py
	$(PY) benchmarks/sensitivity.py
	$(PY) benchmarks/perf.py

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks scripts

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache
