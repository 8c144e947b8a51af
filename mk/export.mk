# Export and the local Triton server (issue 3). Included by the root Makefile.
REPOSITORY ?= model_repository
PROFILE ?= python
TRITON_VENV := .venv-triton
TRITON_STAMP := $(TRITON_VENV)/.installed

.PHONY: model-repository export-check triton-venv triton triton-stop

# The repository is built from the committed checkpoint (weights are never hand-copied); the
# python profile is the one the bundled Triton runs, and its model.onnx files serve ONNX Runtime.
$(REPOSITORY)/generator/config.pbtxt: $(CHECKPOINT) $(wildcard export/*.py) | $(STAMP)
	$(VENV)/bin/talkinghead export --checkpoint $(CHECKPOINT) --repository $(REPOSITORY) --profile $(PROFILE)

model-repository: $(REPOSITORY)/generator/config.pbtxt

# Triton's own environment: nvidia-pytriton pins numpy<2, the project needs numpy 2.
triton-venv: $(TRITON_STAMP)

$(TRITON_STAMP): requirements/triton-lock.txt
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q --upgrade pip==26.3
	$(TRITON_VENV)/bin/python -m pip install -q --no-deps -r requirements/triton-lock.txt
	touch $(TRITON_STAMP)

triton: model-repository $(TRITON_STAMP)
	$(PY) -m export.triton_local start --repository $(REPOSITORY) --venv $(TRITON_VENV) --state var/triton

triton-stop:
	$(PY) -m export.triton_local stop --state var/triton
