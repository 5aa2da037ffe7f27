# Two entry points: `make demo` (the main job) and `make test` (the test suite).
# Both bootstrap a project-local venv from nothing but python3.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml setup.py | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: venv test demo bench gpu-check wheels clean

venv: $(STAMP)

# On a machine whose system python already has a CUDA torch, reuse it (system site packages);
# otherwise install the CPU build of torch 2.13.0 before anything else can pull a CUDA wheel.
$(BIN)/python:
	@if $(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then \
		echo "[refrag] CUDA torch found in $(PY): venv reuses it"; \
		$(PY) -m venv --system-site-packages $(VENV); \
	else \
		$(PY) -m venv $(VENV); \
	fi

$(STAMP): $(BIN)/python pyproject.toml setup.py
	@$(BIN)/python -c "import torch" >/dev/null 2>&1 || $(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

# One pytest worker per core (pytest-xdist), whole files per worker so module fixtures run once.
# pytest exits 5 when it collects nothing: that is a failure here, never a pass.
test: $(STAMP)
	@$(BIN)/python -m pytest -q -n auto --dist loadfile $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

demo: $(STAMP)
	$(BIN)/python -m refrag.demo

bench: $(STAMP)
	@mkdir -p bench/results
	$(BIN)/python -m pytest bench/ --benchmark-only --benchmark-json=bench/results/latest.json
	$(BIN)/python -m bench.report bench/results/latest.json

# Every GPU number in one prepared command (bench/gpu_check.py; README "On a GPU"). It needs no
# venv and installs nothing from a registry, so it runs as is on a GPU machine whose python3 has
# CUDA torch, triton and pytest-benchmark; `make wheels` beforehand (where the registry is
# reachable) brings the fla / Liger baselines along in .wheels/. On a CPU: DRY_RUN=1.
GPU_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
BUDGET ?= 480
gpu-check:
	PYTHONPATH=$(CURDIR):$(CURDIR)/.pythonpath$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY) -m bench.gpu_check --budget-s $(BUDGET) \
		$(if $(OUT),--out $(OUT)) $(if $(filter 1 yes true,$(DRY_RUN)),--dry-run) $(if $(STEPS),--steps $(STEPS))

wheels:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY)) -m bench.wheels download

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
