# Two entry points, both from a fresh machine with only Python 3 and pip:
#   make demo   - create .venv, install kerasbn with every extra, run the demo
#   make test   - same environment, run the whole test suite on the
#                 TensorFlow backend and, alongside it, its backend-neutral
#                 tests on JAX
#   make test-torch - install PyTorch into the venv (CPU is enough), run the
#                 backend-neutral tests on the PyTorch backend
#   make sweep    - every tf-keras application (tests/stock_files.py), from
#                 .h5 and SavedModel, to SavedModel and ONNX, and from a
#                 JAX session; results in sweep-results.json (resumable;
#                 hours on two cores, most of it the largest models)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kerasbn-installed
export TF_CPP_MIN_LOG_LEVEL ?= 2

# PyTorch is not in any extra (its CUDA wheels make a ~7 GB environment);
# `make test-torch` installs this. Override for another build, e.g.
# make test-torch TORCH='torch --index-url https://download.pytorch.org/whl/cpu'
TORCH ?= torch==2.13.0

.PHONY: demo test test-jax test-torch sweep op-sweep bench bench-quick venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[all]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/quickstart.py

# Two processes side by side, each keeping about one of the two cores
# busy (Keras tracing and Python between small ops): the TensorFlow run,
# and the JAX run of the backend-neutral tests followed by the TensorFlow
# tests of the stock-model files (LATE_TESTS), which would otherwise
# leave the second core idle once the JAX run is done. The second
# process's output follows.
LATE_TESTS := tests/test_stock_applications.py tests/test_graph_fold_stock.py

test: $(STAMP)
	@log=$$(mktemp); \
	( KERASBN_TEST_BACKEND=jax $(BIN)/python -m pytest -p no:cacheprovider; \
	  jx=$$?; echo "==== TensorFlow: $(LATE_TESTS) ===="; \
	  $(BIN)/python -m pytest -p no:cacheprovider $(LATE_TESTS); \
	  late=$$?; test $$jx -eq 0 && test $$late -eq 0 ) >$$log 2>&1 & second=$$!; \
	trap 'kill $$second 2>/dev/null; rm -f $$log' INT TERM; \
	$(BIN)/python -m pytest -p no:cacheprovider \
		$(foreach f,$(LATE_TESTS),--ignore=$(f)); first=$$?; \
	wait $$second; rest=$$?; \
	echo "==== backend-neutral tests on JAX, then the late TensorFlow tests ===="; \
	cat $$log; rm -f $$log; \
	test $$first -eq 0 && test $$rest -eq 0

test-jax: $(STAMP)
	KERASBN_TEST_BACKEND=jax $(BIN)/python -m pytest -p no:cacheprovider

test-torch: $(STAMP)
	$(BIN)/python -m pip install --quiet $(TORCH)
	KERASBN_TEST_BACKEND=torch $(BIN)/python -m pytest -p no:cacheprovider

sweep: $(STAMP)
	$(BIN)/python tools/sweep.py --out sweep-work --results sweep-results.json

op-sweep: $(STAMP)
	$(BIN)/python tools/op_sweep.py --results op-sweep-results.json
	$(BIN)/python tools/op_sweep.py --results op-sweep-results.json --table

bench: $(STAMP)
	$(BIN)/python tools/benchmark.py

bench-quick: $(STAMP)
	$(BIN)/python tools/benchmark.py --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
