# Export (issue 3): the committed checkpoint -> the model repository. Included by the root Makefile.
REPOSITORY ?= model_repository
PROFILE ?= python

.PHONY: model-repository

# The repository is built from the committed checkpoint (weights are never hand-copied); the
# python profile is the one the bundled Triton runs, and its model.onnx files serve ONNX Runtime.
# Prerequisites: what the exported files are made of - the networks' code (the graph), the
# contract (names, metadata), facekit/cpus.py (copied beside each python-profile model.py,
# export/repository.py python_files) and the engines' verdict.
EXPORTED_FROM := $(wildcard export/*.py) facekit/contract.py facekit/cpus.py \
	$(addprefix training/,blocks.py checkpoint.py config.py embedder.py generator.py)
$(REPOSITORY)/generator/config.pbtxt: $(CHECKPOINT) $(EXPORTED_FROM) \
		$(wildcard $(basename $(CHECKPOINT)).engines.json) | $(STAMP)
	$(VENV)/bin/talkinghead export --checkpoint $(CHECKPOINT) --repository $(REPOSITORY) --profile $(PROFILE)

model-repository: $(REPOSITORY)/generator/config.pbtxt
