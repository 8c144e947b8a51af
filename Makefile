# One file ties the project together. `make demo` and `make test` work on a fresh machine:
# each builds the virtual environment it needs first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# free disk (GiB) that making .venv needs (2.5 installed, and pip's unpacking); 0 skips the check
VENV_GIB ?= 3
FACES ?= ../shared/data/faces
PORTRAIT ?= facekit/assets/demo_portrait.png
DRIVER ?= facekit/assets/demo_driver.npz
CHECKPOINT ?= models/talkinghead-small.pt
OUT ?= out/demo
DIRECT_OUT ?= out/demo-direct
EVAL_OUT ?= out/evaluation
# free disk (GiB) where `make test` writes its temporary files (TMPDIR, else /tmp; pytest keeps each
# test's tmp_path: 1.4 GiB at the end of a default run on three workers); 0 skips the check
TEST_GIB ?= 2
# `make test` runs test files on this many pytest-xdist workers (0: one process). Most of the suite
# waits on real servers, paced streams and subprocesses: on two cores (AMD EPYC) two workers left
# ~20 % of the CPU idle and took 858-940 s on CI's fresh clones (897 s in a built checkout), three
# 794-870 s (772 s): a small gain, inside the host's drift from hour to hour. The tests' own times
# add up to ~1,750 s; three workers hold ~11 GiB of memory at the peak. The cost: a personalisation
# worker runs at SCHED_IDLE, so with three busy workers it waits longer for a CPU (the killed-worker
# test 49 -> 115-138 s, its waits 420 s each). A file's tests stay on one worker (they share its
# module fixtures; session fixtures are made once per worker).
TEST_WORKERS ?= 3

.DEFAULT_GOAL := help
# Targets of the export, service and deploy parts live in mk/*.mk, one file per part.
include $(sort $(wildcard mk/*.mk))

.PHONY: help venv demo demo-direct test test-disk test-slow test-replicas lint format preprocess train-small evaluate clean

help:
	@echo "make demo        serve, create an avatar from PORTRAIT, personalise it and stream DRIVER, all over gRPC -> $(OUT)/"
	@echo "make demo-direct fine-tune and drive the model in one PyTorch process, no service, no watermark -> $(DIRECT_OUT)/"
	@echo "make test        the default test suite on TEST_WORKERS=$(TEST_WORKERS) workers, after test-disk: TEST_GIB=$(TEST_GIB) GiB free in TMPDIR (real data tests skip without $(FACES))"
	@echo "make test-slow   the long tests (marker: slow)"
	@echo "make test-replicas  redis + two service replicas + two Tritons + a worker, kill tests (slow)"
	@echo "make fuzz        every RPC fuzzed with FUZZ_CASES=100000 generated and raw requests (~15 min)"
	@echo "make lint        ruff + mypy (make format: ruff's fixes and formatting)"
	@echo "make serve       talkinghead serve with its defaults (127.0.0.1:50051, metrics :8080, var/)"
	@echo "make protos      regenerate api/ from proto/"
	@echo "make preprocess  crop faces + landmarks of $(FACES) for training"
	@echo "make train-small meta-learn the small model (CPU, ~1 h) into runs/small"
	@echo "make evaluate    CHECKPOINT vs the classical warp on the evaluation people -> $(EVAL_OUT)/ (~25 min on 2 cores, after make preprocess ~2 min; EVAL_ARGS= adds options)"
	@echo "make model-repository  export CHECKPOINT to $(REPOSITORY)/ (ONNX + Triton configs, PROFILE=$(PROFILE))"
	@echo "make triton      start the bundled Triton server on 127.0.0.1 with $(REPOSITORY)/ (make triton-stop)"
	@echo "make up / down   Redis + Triton + the service (triton backend) + a worker + Prometheus on 127.0.0.1 (var/stack/logs; make stack-status)"
	@echo "make bench       every CPU engine raw, the service at 1/4/16/64 live streams, paired vs the model of $(BASELINE_REV) -> out/bench.json"
	@echo "make soak        64 live streams for 10 min: server memory, statuses, drops, slots -> out/soak.json"
	@echo "make helm-lint   lint, render and validate the Helm chart in every configuration"
	@echo "make clean       remove .venv, out/ and the tools' caches"
	@echo "PYTHON=python3.11 names the Python 3.11 that makes .venv (default python3)"

venv: $(STAMP)

$(STAMP): requirements/lock.txt pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required"'
	test -x $(PY) || { $(PYTHON) tools/need_disk.py $(VENV_GIB) $(VENV) "$(VENV) (PyTorch, ONNX Runtime, OpenVINO: 2.5 GiB installed)" && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip==26.3
	$(PY) -m pip install -q --no-deps -r requirements/lock.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP) model-repository
	VENV=$(VENV) CHECKPOINT=$(CHECKPOINT) REPOSITORY=$(REPOSITORY) PORTRAIT=$(PORTRAIT) DRIVER=$(DRIVER) \
		OUT=$(OUT) STEPS=$(STEPS) tools/demo.sh

# The direct-model demo (no service): fine-tune and drive the PyTorch model in one process.
demo-direct: $(STAMP)
	$(PY) -m training.demo --checkpoint $(CHECKPOINT) --portrait $(PORTRAIT) --driver $(DRIVER) \
		--out $(DIRECT_OUT) $(if $(STEPS),--steps $(STEPS))

test: test-disk $(STAMP) $(TRITON_STAMP) $(HELM_BIN) model-repository prometheus redis
	$(PY) -m pytest -m "not slow" -q --durations=25 -n $(TEST_WORKERS) --dist loadfile

# (a suite that runs out of disk fails test by test with errors that look like the product's)
test-disk:
	@$(PYTHON) tools/need_disk.py $(TEST_GIB) "$${TMPDIR:-/tmp}" "make test (its temporary files, 1.4 GiB a run)" \
		"free some space (or point TMPDIR at a disk with room)"

test-slow: $(STAMP) $(TRITON_STAMP) model-repository redis
	$(PY) -m pytest -m slow -q

# The multi-replica test alone (slow): redis-server, two service replicas, two Tritons, a worker.
test-replicas: $(STAMP) $(TRITON_STAMP) model-repository redis
	$(PY) -m pytest -m slow -q tests/test_replicas.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy facekit training talkinghead export service client jobs worker deploy/local

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

preprocess: $(STAMP)
	$(VENV)/bin/talkinghead preprocess $(FACES) data/preprocessed-128 --config small

train-small: preprocess
	$(VENV)/bin/talkinghead train --config small --run runs/small

# The evaluation suite (training/evaluation): T = 1 and 8, warp / feed-forward / fine-tuned rows,
# one-shot stills. EVAL_ARGS adds options, e.g. EVAL_ARGS="--methods warp feed-forward" (minutes).
evaluate: preprocess
	$(VENV)/bin/talkinghead evaluate --checkpoint $(CHECKPOINT) --data data/preprocessed-128 \
		--faces $(FACES) --out $(EVAL_OUT) $(EVAL_ARGS)

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache .mypy_cache
