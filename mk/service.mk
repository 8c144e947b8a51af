# gRPC API stubs, the server and the benchmark. Included by the root Makefile (which defines PY, VENV, STAMP).
PROTOS := $(wildcard proto/talkinghead/v1/*.proto)
GEN_ROOT ?= api
STUBS := $(patsubst proto/talkinghead/v1/%.proto,$(GEN_ROOT)/talkinghead/v1/%_pb2.py,$(PROTOS))
BENCH_OUT ?= out/bench.json
SOAK_OUT ?= out/soak.json
SOAK_ARGS ?=
FUZZ_CASES ?= 100000
FUZZ_SEED ?= $(shell date +%s)

.PHONY: protos serve bench baseline-repository soak fuzz

protos: $(STUBS)

# One protoc run writes every stub (+ gRPC + .pyi) into the `api` package, which the server
# (service/) and the client (client/) both import and which imports neither. protoc names imports
# after the proto path (`from talkinghead.v1 import ...`), which would resolve to the CLI package
# `talkinghead`, so sed re-roots them under api. tests/test_client.py
# (test_generated_stubs_are_fresh) rebuilds into a temp GEN_ROOT and compares with the committed files.
$(STUBS) &: $(PROTOS)
	mkdir -p $(GEN_ROOT)/talkinghead/v1
	$(PY) -m grpc_tools.protoc -Iproto --python_out=$(GEN_ROOT) --grpc_python_out=$(GEN_ROOT) \
		--pyi_out=$(GEN_ROOT) $(PROTOS)
	sed -i -E 's/^from talkinghead\.v1 import/from api.talkinghead.v1 import/' \
		$(GEN_ROOT)/talkinghead/v1/*.py $(GEN_ROOT)/talkinghead/v1/*.pyi
	for d in $(GEN_ROOT) $(GEN_ROOT)/talkinghead $(GEN_ROOT)/talkinghead/v1; do test -f $$d/__init__.py || \
		echo '"""The talkinghead.v1 gRPC API, generated from proto/ by `make protos` (do not edit);' \
		'imported by the server (service/) and the client (client/)."""' > $$d/__init__.py; done

serve: $(STAMP)
	$(VENV)/bin/talkinghead serve

# Paired against the previous model: BASELINE, the model repository `make baseline-repository`
# exports from git revision BASELINE_REV with that revision's own code (default: the paper-G
# model, served until the warp-guided G replaced it). BASELINE= (empty) skips the pairing.
BASELINE ?= out/baseline_repository
BASELINE_REV ?= abab4d4
BASELINE_TREE := out/.baseline-tree

bench: $(STAMP) $(TRITON_STAMP) model-repository $(if $(BASELINE),$(BASELINE)/generator/config.pbtxt)
	$(VENV)/bin/talkinghead bench --out $(BENCH_OUT) --overwrite $(if $(BASELINE),--baseline $(BASELINE)) --triton-venv $(TRITON_VENV)

baseline-repository: $(BASELINE)/generator/config.pbtxt

$(BASELINE)/generator/config.pbtxt: | $(STAMP)
	rm -rf $(BASELINE_TREE) && git worktree prune
	git worktree add --detach $(BASELINE_TREE) $(BASELINE_REV)
	cd $(BASELINE_TREE) && PYTHONPATH=$$PWD $(abspath $(PY)) -m talkinghead.cli export --no-check \
		--checkpoint models/talkinghead-small.pt --repository $(abspath $(BASELINE))
	git worktree remove --force $(BASELINE_TREE)

# 64 live streams for 10 minutes against `talkinghead serve` (tools/soak.py): the server's RSS
# growth after warm-up < 5 %, no error status, frames lost only by the drop policy, every stream
# slot released -> $(SOAK_OUT). Shorter: make soak SOAK_ARGS="--duration 120 --warmup 30".
soak: $(STAMP) model-repository
	$(PY) tools/soak.py --out $(SOAK_OUT) $(SOAK_ARGS)

# The fuzz suite at length (tests/test_fuzz.py; the default suite runs 3,000 derandomised cases):
# FUZZ_CASES hypothesis-generated and raw requests over every RPC against `talkinghead serve` in a
# child process, a new seed each run (printed; FUZZ_SEED=N repeats one). ~9 ms a case on 2 cores.
fuzz: $(STAMP) model-repository
	TALKINGHEAD_FUZZ_CASES=$(FUZZ_CASES) TALKINGHEAD_FUZZ_SEED=$(FUZZ_SEED) \
		$(PY) -m pytest -q -s -p no:cacheprovider tests/test_fuzz.py
