# Local servers on 127.0.0.1 (deploy/local/): the bundled Triton alone (`make triton`, issue 3) and
# the whole stack (issues 5, 12): Redis, Triton, the service on the triton backend (avatars and jobs
# in Redis), the personalisation worker and a Prometheus server scraping the service and Triton. deploy/local/tritonserver.py and deploy/local/stack.py do the work; the stack's
# state, pid files and logs live in $(STACK_STATE). Included by the root Makefile (PY, PYTHON,
# STAMP; REPOSITORY comes from mk/export.mk).
TRITON_VENV := .venv-triton
TRITON_STAMP := $(TRITON_VENV)/.installed
# free disk (GiB) that making $(TRITON_VENV) needs (0.6 installed); 0 skips the check
TRITON_VENV_GIB ?= 1
STACK_STATE ?= var/stack
STACK_GRPC_PORT ?= 50051
STACK_METRICS_PORT ?= 8080
STACK_WORKER_METRICS_PORT ?= 8081
STACK_TRITON_HTTP_PORT ?= 8000
STACK_TRITON_GRPC_PORT ?= 8001
STACK_TRITON_METRICS_PORT ?= 8002
STACK_PROMETHEUS_PORT ?= 9090
STACK_REDIS_PORT ?= 6379
STACK_SCRAPE_INTERVAL ?= 1s
PROMETHEUS ?= prometheus
# down/status need only the stdlib: they work without .venv too.
STACK_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))
STACK_PORTS = --grpc-port $(STACK_GRPC_PORT) --metrics-port $(STACK_METRICS_PORT) \
	--worker-metrics-port $(STACK_WORKER_METRICS_PORT) \
	--triton-http-port $(STACK_TRITON_HTTP_PORT) --triton-grpc-port $(STACK_TRITON_GRPC_PORT) \
	--triton-metrics-port $(STACK_TRITON_METRICS_PORT) --prometheus-port $(STACK_PROMETHEUS_PORT) \
	--redis-port $(STACK_REDIS_PORT)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

REDIS_SERVER ?= redis-server

.PHONY: triton-venv triton triton-stop up down stack-status prometheus redis

# Triton's own environment: nvidia-pytriton pins numpy<2, the project needs numpy 2.
triton-venv: $(TRITON_STAMP)

$(TRITON_STAMP): requirements/triton-lock.txt
	test -x $(TRITON_VENV)/bin/python || { $(PYTHON) tools/need_disk.py $(TRITON_VENV_GIB) $(TRITON_VENV) "$(TRITON_VENV) (the bundled Triton server: 0.6 GiB installed)" && $(PYTHON) -m venv $(TRITON_VENV); }
	$(TRITON_VENV)/bin/python -m pip install -q --upgrade pip==26.3
	$(TRITON_VENV)/bin/python -m pip install -q --no-deps -r requirements/triton-lock.txt
	touch $(TRITON_STAMP)

bench: $(TRITON_STAMP)  # its serving ceiling through Triton too (mk/service.mk)

triton: model-repository $(TRITON_STAMP)
	$(PY) -m deploy.local.tritonserver start --repository $(REPOSITORY) --venv $(TRITON_VENV) --state var/triton

triton-stop:
	$(PY) -m deploy.local.tritonserver stop --state var/triton

# Debian's prometheus package (2.42), installed when no prometheus binary is found. The package's
# systemd unit is never used: apt may start it on a systemd host, so it is stopped and disabled
# right after the install (the stack runs the binary itself with its own config and data).
prometheus:
	@command -v $(PROMETHEUS) >/dev/null 2>&1 || test -x /usr/bin/prometheus || { \
		echo "installing Debian's prometheus package (apt-get)"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus \
		|| { $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -q --no-install-recommends prometheus; }; \
		if [ -d /run/systemd/system ]; then $(SUDO) systemctl disable --now prometheus.service || true; fi; \
		test -x /usr/bin/prometheus; }

# Debian's redis-server package (7.0), installed when no redis-server binary is found; as with
# Prometheus, the package's systemd unit is stopped and disabled (tests and the stack run their own).
redis:
	@command -v $(REDIS_SERVER) >/dev/null 2>&1 || test -x /usr/bin/redis-server || { \
		echo "installing Debian's redis-server package (apt-get)"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server \
		|| { $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -q --no-install-recommends redis-server; }; \
		if [ -d /run/systemd/system ]; then $(SUDO) systemctl disable --now redis-server.service || true; fi; \
		test -x /usr/bin/redis-server; }

up: model-repository $(TRITON_STAMP) $(STAMP) prometheus redis
	$(PY) deploy/local/stack.py up --state $(STACK_STATE) --repository $(REPOSITORY) \
		--triton-venv $(TRITON_VENV) --scrape-interval $(STACK_SCRAPE_INTERVAL) $(STACK_PORTS)$(if $(filter-out prometheus,$(PROMETHEUS)), --prometheus $(PROMETHEUS))

down:
	$(STACK_PY) deploy/local/stack.py down --state $(STACK_STATE)

stack-status:
	$(STACK_PY) deploy/local/stack.py status --state $(STACK_STATE) $(STACK_PORTS)
