# `make demo` and `make test` work on a fresh machine: they create .venv and install into it first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-paper paper-figures gpu-check install clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt -c constraints.txt
	touch $@

demo: install
	$(PY) train.py --demo

# pytest-xdist: one worker per core (tests/conftest.py shares torch's threads among them); each test file
# stays on one worker, so that a file's kernel builds happen once
test: install
	$(PY) -m pytest -n auto --dist loadfile

# The paper's mechanisms alone, as executable documentation: contrastive denoising, the matching, the query
# selection and look forward twice (test_model), the deformable attention, the losses, the stored outputs
# of a fixed model, and a tiny model that learns
PAPER_TESTS := tests/test_denoising.py tests/test_matcher.py tests/test_model.py tests/test_deformable_attn.py \
	tests/test_losses.py tests/test_expected_outputs.py tests/test_learning.py
test-paper: install
	$(PY) -m pytest -n auto --dist loadfile $(PAPER_TESTS)

# docs/PAPER.md's pictures of the paper's mechanisms, drawn from the demo's checkpoint (`make demo` first) on one
# validation image by python -m appendix.explain
PAPER_IMAGE ?= demo_output/data/val2017/000001.jpg
paper-figures: install
	$(PY) -m appendix.explain demo_output/best.pth $(PAPER_IMAGE) --data demo_output/data --output-dir docs/figures

# On a GPU machine, with that machine's own Python (torch, torchvision, numpy, scipy, ninja, pytest; no
# pycocotools, no package downloads): every GPU figure of BENCHMARKS.md, as markdown, in about 6 minutes.
GPU_CHECK_OUTPUT ?= gpu_check.md
gpu-check:
	$(PYTHON) bench/gpu_check.py --output $(GPU_CHECK_OUTPUT) $(if $(OFFICIAL),--official $(OFFICIAL))

clean:
	rm -rf $(VENV) .pytest_cache
