# Two entry points for a fresh machine (both install what they need):
#   make demo   the main job: `ddkit run configs/mnist.yaml` on the embedded MNIST-5k (about 14 min, 2 CPU cores)
#   make test   the test suite (starts a real single-node SLURM cluster on localhost; installs it with apt)
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install sysdeps demo quick test test-slow bench lint clean

install: $(VENV)/.installed

# pyproject.toml asks for torch>=2.4; constraints.txt pins torch 2.14.1 / torchvision 0.29.1, the releases on
# this machine's disk, so pip never downloads a multi-GB CUDA build. `.[dev]` includes the `demo` extra.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/ddkit run configs/mnist.yaml

quick: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/ddkit run configs/mnist.yaml --quick --set run_dir=runs/mnist-quick

test: install sysdeps
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

# The shadow container build (tools/shadow_build.py) needs debootstrap + bubblewrap, the generator bundle test's
# apptainer stand-in bubblewrap; the SLURM fixture installs its own packages.
sysdeps:
	@command -v debootstrap >/dev/null && command -v bwrap >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && export DEBIAN_FRONTEND=noninteractive && apt-get update -qq && \
	    apt-get install -y -qq debootstrap bubblewrap >/dev/null; } || \
	  echo "note: debootstrap/bubblewrap missing and not root: the slow shadow-build test will skip"

test-slow: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m slow $(PYTEST_ARGS)

# The distilled-set benches read a finished demo run and take tens of minutes each: run them by hand after
# `make demo` (README, "Results on the embedded default").
RUN_BENCHES = bench/distill.py bench/quality.py bench/minimax_ablation.py
bench: install
	for b in $(filter-out $(RUN_BENCHES),$(wildcard bench/*.py)); do echo "== $$b"; $(PY) $$b || exit 1; done
	@echo "after make demo, by hand: $(RUN_BENCHES) (each takes configs/mnist.yaml)"

lint: install
	$(VENV)/bin/ruff check ddkit tests bench

clean:
	rm -rf runs shards .pytest_cache
