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
	$(PY) -m infertune tune $(DIGITS)/digits_cnn.onnx --calib $(DIGITS)/calib.npz --eval $(DIGITS)/test.npz \
		--eval-samples 360 --budget 'top1_drop<=0.5' --threads 1,2 --methods auto,minmax \
		-o $(DEMO_OUT)/digits-tuned --run-dir $(DEMO_OUT)/digits-tuned.run --force
	$(PY) -c "import infertune; a = infertune.load('$(DEMO_OUT)/digits-tuned'); \
		print('artifact verified:', a.path, a.manifest['latency'], a.differences or 'same machine')"
	@echo "artifact and report: $(DEMO_OUT)/digits-tuned/ (open report.html in a browser)"

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) benchmarks/bench_overhead.py
	$(PY) benchmarks/quantize.py
	$(PY) benchmarks/sensitivity.py
	$(PY) benchmarks/perf.py
	$(PY) benchmarks/backends.py
	$(PY) benchmarks/tune.py
	$(PY) benchmarks/timing_method.py

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks scripts

clean:
	rm -rf $(VENV) .venv-inc $(DEMO_OUT) .pytest_cache .ruff_cache
