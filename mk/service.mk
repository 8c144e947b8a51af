# gRPC service: stubs, server, benchmark. Included by the root Makefile (which defines PY, VENV, STAMP).
PROTOS := $(wildcard proto/talkinghead/v1/*.proto)
GEN_ROOT ?= service/gen
STUBS := $(patsubst proto/talkinghead/v1/%.proto,$(GEN_ROOT)/talkinghead/v1/%_pb2.py,$(PROTOS))
BENCH_OUT ?= out/bench.json

.PHONY: protos serve bench

protos: $(STUBS)

# One protoc run writes every stub (+ gRPC + .pyi). protoc names imports after the proto path
# (`from talkinghead.v1 import ...`), which would resolve to the CLI package `talkinghead`, so sed
# re-roots them under service.gen. tests/test_service_stubs.py rebuilds into a temp GEN_ROOT and
# compares with the committed files.
$(STUBS) &: $(PROTOS)
	mkdir -p $(GEN_ROOT)/talkinghead/v1
	$(PY) -m grpc_tools.protoc -Iproto --python_out=$(GEN_ROOT) --grpc_python_out=$(GEN_ROOT) \
		--pyi_out=$(GEN_ROOT) $(PROTOS)
	sed -i -E 's/^from talkinghead\.v1 import/from service.gen.talkinghead.v1 import/' \
		$(GEN_ROOT)/talkinghead/v1/*.py $(GEN_ROOT)/talkinghead/v1/*.pyi
	for d in $(GEN_ROOT) $(GEN_ROOT)/talkinghead $(GEN_ROOT)/talkinghead/v1; do \
		test -f $$d/__init__.py || echo '"""Generated gRPC stubs (make protos); do not edit."""' > $$d/__init__.py; done

serve: $(STAMP)
	$(VENV)/bin/talkinghead serve

bench: $(STAMP)
	$(VENV)/bin/talkinghead bench --out $(BENCH_OUT)
