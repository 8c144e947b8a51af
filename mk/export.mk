# Export (issue 3): the committed checkpoint -> the model repository. Included by the root Makefile.
REPOSITORY ?= model_repository
PROFILE ?= python

.PHONY: model-repository

# The repository is built from the committed checkpoint (weights are never hand-copied); the
# python profile is the one the bundled Triton runs, and its model.onnx files serve ONNX Runtime.
# facekit/cpus.py: copied beside each python-profile model.py (export/repository.py python_files).
$(REPOSITORY)/generator/config.pbtxt: $(CHECKPOINT) $(wildcard export/*.py) facekit/cpus.py training/blocks.py \
		$(wildcard $(basename $(CHECKPOINT)).engines.json) | $(STAMP)
	$(VENV)/bin/talkinghead export --checkpoint $(CHECKPOINT) --repository $(REPOSITORY) --profile $(PROFILE)

model-repository: $(REPOSITORY)/generator/config.pbtxt
