{{/*
Small helpers every template uses: names, labels, annotations, images, which Triton the chart runs,
claim and secret names, the checks the schema cannot express, probe timing, and the HPA, PDB and
ServiceMonitor bodies the server and Triton share. Whole containers live with the templates that
use them: Triton's in triton-deployment.yaml (also the sidecar of server-deployment.yaml), the model
repository's volumes, mount and sync container in _model-repository.tpl.
*/}}

{{- define "talkinghead.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* `<release>-<chart>`, or just the release name when it already contains the chart name. */}}
{{- define "talkinghead.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "talkinghead.tritonFullname" -}}
{{- printf "%s-triton" (include "talkinghead.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "talkinghead.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels. Call with (dict "ctx" $ "component" "service"). */}}
{{- define "talkinghead.selectorLabels" -}}
app.kubernetes.io/name: {{ include "talkinghead.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* All labels of a resource. Call with (dict "ctx" $ "component" "service"). */}}
{{- define "talkinghead.labels" -}}
{{ include "talkinghead.selectorLabels" . }}
helm.sh/chart: {{ include "talkinghead.chart" .ctx }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: talkinghead
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* metadata.annotations of a resource: commonAnnotations merged with (dict ... "extra" map). */}}
{{- define "talkinghead.annotations" -}}
{{- $all := merge (dict) (.extra | default dict) (.ctx.Values.commonAnnotations | default dict) -}}
{{- if $all -}}
annotations:
  {{- toYaml $all | nindent 2 }}
{{- end -}}
{{- end -}}

{{- define "talkinghead.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "talkinghead.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* An image reference. Call with (dict "image" .Values.server.image "ctx" $). */}}
{{- define "talkinghead.image" -}}
{{- $repo := .image.repository -}}
{{- if .image.registry -}}{{- $repo = printf "%s/%s" .image.registry .image.repository -}}{{- end -}}
{{- if .image.digest -}}
{{- printf "%s@%s" $repo .image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default .ctx.Chart.AppVersion .image.tag | toString) -}}
{{- end -}}
{{- end -}}

{{/* "true" when the chart runs Triton itself (backend triton, mode deployment or sidecar). */}}
{{- define "talkinghead.tritonManaged" -}}
{{- if and (eq .Values.server.backend "triton") (ne .Values.triton.mode "external") -}}true{{- end -}}
{{- end -}}

{{- define "talkinghead.tritonDeployment" -}}
{{- if and (include "talkinghead.tritonManaged" .) (eq .Values.triton.mode "deployment") -}}true{{- end -}}
{{- end -}}

{{- define "talkinghead.tritonSidecar" -}}
{{- if and (include "talkinghead.tritonManaged" .) (eq .Values.triton.mode "sidecar") -}}true{{- end -}}
{{- end -}}

{{/* The gRPC address the server sends inference requests to. A Triton Deployment: the headless
Service, which resolves to every ready Triton pod; the server connects to each and spreads its
calls (service/backends/tritons.py). The ClusterIP Service would pin a server pod's one HTTP/2
connection, so all its calls, to a single Triton pod. */}}
{{- define "talkinghead.tritonUrl" -}}
{{- if eq .Values.triton.mode "external" -}}
{{- .Values.triton.externalUrl -}}
{{- else if eq .Values.triton.mode "sidecar" -}}
{{- printf "127.0.0.1:%d" (int .Values.triton.ports.grpc) -}}
{{- else -}}
{{- printf "%s-headless.%s.svc:%d" (include "talkinghead.tritonFullname" .) .Release.Namespace (int .Values.triton.ports.grpc) -}}
{{- end -}}
{{- end -}}

{{/* "true" when some pod of the chart mounts the model repository. */}}
{{- define "talkinghead.modelRepositoryUsed" -}}
{{- if or (eq .Values.server.backend "onnxruntime") (include "talkinghead.tritonManaged" .) .Values.worker.enabled -}}true{{- end -}}
{{- end -}}

{{- define "talkinghead.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "talkinghead.fullname" .)) .Values.tls.existingSecret -}}
{{- end -}}

{{- define "talkinghead.avatarClaimName" -}}
{{- default (printf "%s-avatars" (include "talkinghead.fullname" .)) .Values.avatarStore.persistence.existingClaim -}}
{{- end -}}

{{- define "talkinghead.modelClaimName" -}}
{{- if eq .Values.modelRepository.source "existingClaim" -}}
{{- .Values.modelRepository.existingClaim -}}
{{- else -}}
{{- printf "%s-models" (include "talkinghead.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* "true" when server and worker share state in Redis (redis.mode internal or external). */}}
{{- define "talkinghead.redisEnabled" -}}
{{- if ne .Values.redis.mode "none" -}}true{{- end -}}
{{- end -}}

{{- define "talkinghead.redisFullname" -}}
{{- printf "%s-redis" (include "talkinghead.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The Secret holding the in-chart Redis' password under `password`: the operator's, or the one the chart makes. */}}
{{- define "talkinghead.redisAuthSecret" -}}
{{- .Values.redis.auth.existingSecret | default (printf "%s-redis" (include "talkinghead.fullname" .)) -}}
{{- end -}}

{{/*
TALKINGHEAD_REDIS_URL as EnvVars: a Secret's `url` (external), the external URL, or the in-chart
Redis, whose password comes from its Secret as REDIS_PASSWORD and enters the URL by Kubernetes'
$(VAR) expansion, so it is in no ConfigMap and no pod spec.
*/}}
{{- define "talkinghead.redisEnv" -}}
{{- $r := .Values.redis -}}
{{- if and (eq $r.mode "external") $r.existingSecret }}
- name: TALKINGHEAD_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $r.existingSecret }}
      key: url
{{- else if eq $r.mode "external" }}
- name: TALKINGHEAD_REDIS_URL
  value: {{ $r.externalUrl | quote }}
{{- else }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "talkinghead.redisAuthSecret" . }}
      key: password
- name: TALKINGHEAD_REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s.%s.svc:%d/0" (include "talkinghead.redisFullname" .) .Release.Namespace (int $r.port) | quote }}
{{- end }}
{{- end -}}

{{/*
A Kubernetes quantity (`1Gi`, `768Mi`, `1.5G`, `1e9`, or a number of bytes) as a whole number of
bytes. Call with (dict "q" <quantity> "what" <the value's name, for the error>).
*/}}
{{- define "talkinghead.bytes" -}}
{{- $q := .q -}}
{{- if not (kindIs "string" $q) -}}
{{- int64 $q -}}
{{- else -}}
{{- $num := regexFind "^[0-9]+(\\.[0-9]+)?" $q -}}
{{- $suffix := trimPrefix $num $q -}}
{{- $units := dict "" 1 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "P" 1000000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "Pi" 1125899906842624 -}}
{{- $unit := 0 -}}
{{- if hasKey $units $suffix -}}
{{- $unit = index $units $suffix -}}
{{- else if regexMatch "^e[0-9]+$" $suffix -}}
{{- $unit = 1 -}}
{{- range until (int (trimPrefix "e" $suffix)) }}{{ $unit = mul $unit 10 }}{{ end -}}
{{- end -}}
{{- if or (not $num) (not $unit) -}}
{{- fail (printf "%s=%s: expected a quantity of bytes such as 768Mi, 1Gi or 1G" .what $q) -}}
{{- end -}}
{{- if contains "." $num -}}
{{- int64 (mulf (float64 $num) $unit) -}}
{{- else -}}
{{- mul (int64 $num) $unit -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The in-chart Redis' maxmemory in bytes: redis.maxmemory, else 75 % of its memory limit (Redis counts
only its dataset against maxmemory: fragmentation and the pages an append-only-file rewrite copies
need the rest); empty without either.
*/}}
{{- define "talkinghead.redisMaxmemory" -}}
{{- $r := .Values.redis -}}
{{- $limit := dig "limits" "memory" "" ($r.resources | default dict) -}}
{{- $limitBytes := 0 -}}
{{- if $limit -}}
{{- $limitBytes = include "talkinghead.bytes" (dict "q" $limit "what" "redis.resources.limits.memory") | int64 -}}
{{- end -}}
{{- if $r.maxmemory -}}
{{- $bytes := include "talkinghead.bytes" (dict "q" $r.maxmemory "what" "redis.maxmemory") | int64 -}}
{{- if and $limitBytes (ge $bytes $limitBytes) -}}
{{- fail (printf "redis.maxmemory=%v must be below redis.resources.limits.memory=%v (empty: 75 %% of it): at the limit the kernel kills Redis instead of Redis refusing writes. Lower redis.maxmemory or raise the limit" $r.maxmemory $limit) -}}
{{- end -}}
{{- $bytes -}}
{{- else if $limitBytes -}}
{{- div (mul $limitBytes 75) 100 -}}
{{- end -}}
{{- end -}}

{{/* The Triton gRPC address(es) the worker loads new models in: every pod behind the headless Service. */}}
{{- define "talkinghead.workerTritonUrl" -}}
{{- if include "talkinghead.tritonDeployment" . -}}
{{- printf "%s-headless.%s.svc:%d" (include "talkinghead.tritonFullname" .) .Release.Namespace (int .Values.triton.ports.grpc) -}}
{{- else if and (eq .Values.server.backend "triton") (eq .Values.triton.mode "external") -}}
{{- .Values.triton.externalUrl -}}
{{- end -}}
{{- end -}}

{{/* Combinations the schema cannot express; rendered (as nothing) by every workload template. */}}
{{- define "talkinghead.validate" -}}
{{- if and (eq .Values.server.backend "triton") (eq .Values.triton.mode "external") (not .Values.triton.externalUrl) -}}
{{- fail "triton.mode=external needs triton.externalUrl (host:port of Triton's gRPC endpoint)" -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) (ne (not .Values.tls.cert) (not .Values.tls.key)) -}}
{{- fail "tls.cert and tls.key go together; give neither to let the chart make a CA and a certificate" -}}
{{- end -}}
{{- if and (include "talkinghead.modelRepositoryUsed" .) (eq .Values.modelRepository.source "existingClaim") (not .Values.modelRepository.existingClaim) -}}
{{- fail "modelRepository.source=existingClaim needs modelRepository.existingClaim" -}}
{{- end -}}
{{- if and (include "talkinghead.modelRepositoryUsed" .) (eq .Values.modelRepository.source "objectStorage") (not .Values.modelRepository.objectStorage.url) -}}
{{- fail "modelRepository.source=objectStorage needs modelRepository.objectStorage.url (s3://... or gs://...)" -}}
{{- end -}}
{{- /* Without Redis each replica caches the avatars it read from the files, and nothing tells it
that another replica deleted or replaced one: it would go on serving the old avatar. */ -}}
{{- $s := .Values.server -}}
{{- $several := ternary (gt (int $s.autoscaling.maxReplicas) 1) (gt (int $s.replicaCount) 1) $s.autoscaling.enabled -}}
{{- if and $several (not (include "talkinghead.redisEnabled" .)) -}}
{{- fail "several server replicas (server.replicaCount > 1, or server.autoscaling.enabled with maxReplicas > 1) need Redis: without it each replica caches avatars from its own files and goes on serving one another replica deleted or replaced. Set redis.mode=internal (a Redis in this release) or redis.mode=external with redis.externalUrl or redis.existingSecret, or run one replica (server.replicaCount=1, server.autoscaling.enabled=false)" -}}
{{- end -}}
{{- range .Values.triton.extraArgs -}}
{{- if contains "shm-region-prefix-name" (toString .) -}}
{{- fail (printf "triton.extraArgs %q: the chart names the python backend's /dev/shm regions itself, so that a restarted Triton container removes those a killed one left; leave shm-region-prefix-name out" (toString .)) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.worker.enabled (not (include "talkinghead.redisEnabled" .)) -}}
{{- fail "worker.enabled needs redis.mode internal or external (the job queue)" -}}
{{- end -}}
{{- if and .Values.worker.enabled (eq .Values.modelRepository.source "objectStorage") -}}
{{- fail "worker.enabled writes models into a claim: modelRepository.source persistentVolumeClaim or existingClaim" -}}
{{- end -}}
{{- /* The worker writes the claim while Triton (or an in-process server) reads it, or another worker
writes it, from other pods, scheduled on any node. */ -}}
{{- $readers := or (include "talkinghead.tritonManaged" .) (eq .Values.server.backend "onnxruntime") (gt (int .Values.worker.replicaCount) 1) -}}
{{- if and .Values.worker.enabled $readers (not (has "ReadWriteMany" .Values.modelRepository.persistence.accessModes)) -}}
{{- fail (printf "worker.enabled needs a ReadWriteMany model repository claim: the worker writes generator_<avatar> into it while Triton (or the server with backend onnxruntime, or another worker) mounts it from other pods, on other nodes, and modelRepository.persistence.accessModes=%v lets pods on one node only write or share it (the others stay ContainerCreating with a Multi-Attach error). Set modelRepository.persistence.accessModes=[ReadWriteMany] with a StorageClass that provides it (NFS, EFS, Filestore, Azure Files, CephFS), and for modelRepository.existingClaim one that is ReadWriteMany" (toJson .Values.modelRepository.persistence.accessModes)) -}}
{{- end -}}
{{- /* Personalisations that could never be served: the worker writes generator_<avatar> into the
claim and asks every Triton to load it. */ -}}
{{- if and .Values.worker.enabled (include "talkinghead.tritonManaged" .) -}}
{{- if include "talkinghead.tritonSidecar" . -}}
{{- fail "worker.enabled with triton.mode=sidecar: the worker loads each new generator_<avatar> in every Triton, and withdraws a deleted or refused one, through Triton's headless Service, which a sidecar has none of (the worker would get no Triton address, and the server pods' NetworkPolicy admits no one to Triton's port): sidecars would go on serving an avatar's old generator after a new personalisation. Set triton.mode=deployment (Triton pods the worker reaches), or worker.enabled=false" -}}
{{- end -}}
{{- if .Values.triton.buildEngines.enabled -}}
{{- fail "worker.enabled with triton.buildEngines.enabled: Triton serves the copy of the repository its init container built at pod start (an emptyDir), so the generator_<avatar> models the worker writes into the claim never reach it and every load fails. Set triton.buildEngines.enabled=false with a repository exported with --profile python or onnxruntime (and worker.profile the same), or worker.enabled=false" -}}
{{- end -}}
{{- if ne .Values.triton.modelControlMode "explicit" -}}
{{- fail (printf "worker.enabled with triton.modelControlMode=%s: the worker loads each personalised generator in Triton, which refuses load requests unless its model control mode is explicit. Set triton.modelControlMode=explicit (the default), or worker.enabled=false" .Values.triton.modelControlMode) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.worker.enabled (eq .Values.worker.profile "tensorrt") (eq .Values.server.backend "triton") -}}
{{- fail "worker.profile=tensorrt: the worker writes model.onnx under platform tensorrt_plan and nothing builds its model.plan, so Triton cannot load a personalised generator. Set worker.profile=python or onnxruntime, with the repository exported with that profile" -}}
{{- end -}}
{{- $auth := .Values.auth -}}
{{- if not (or $auth.apiKeys.enabled $auth.clientCA.existingSecret $auth.allowUnauthenticated) -}}
{{- fail "the server refuses to listen on 0.0.0.0 without authentication: keep auth.apiKeys.enabled, set auth.clientCA.existingSecret, or set auth.allowUnauthenticated=true to accept anyone" -}}
{{- end -}}
{{- if and $auth.apiKeys.enabled (eq $auth.apiKeys.source "redis") (not (include "talkinghead.redisEnabled" .)) -}}
{{- fail "auth.apiKeys.source=redis needs redis.mode internal or external (the key ring lives in Redis)" -}}
{{- end -}}
{{- if and $auth.clientCA.existingSecret (not .Values.tls.enabled) -}}
{{- fail "auth.clientCA.existingSecret needs tls.enabled=true (client certificates are checked in the TLS handshake)" -}}
{{- end -}}
{{- if and $auth.clientCA.existingSecret (not $auth.clientCA.probeSecret) (or .Values.server.readinessProbe.enabled .Values.tests.enabled) -}}
{{- fail "auth.clientCA.existingSecret needs auth.clientCA.probeSecret (a kubernetes.io/tls Secret with a client certificate that CA signed): the readiness probe and the helm test must present one" -}}
{{- end -}}
{{- if and (eq .Values.redis.mode "external") (not .Values.redis.externalUrl) (not .Values.redis.existingSecret) -}}
{{- fail "redis.mode=external needs redis.externalUrl or redis.existingSecret" -}}
{{- end -}}
{{- $grace := .Values.server.shutdownGraceSeconds -}}
{{- $drain := float64 .Values.server.shutdownDrainSeconds -}}
{{- /* Whatever the grace (the operator's, or the computed one, at least 1 s): the drain and 1 s of
it must end before the kubelet kills the pod. */ -}}
{{- if ge (addf $drain 1) (float64 .Values.server.terminationGracePeriodSeconds) -}}
{{- fail (printf "server.shutdownDrainSeconds=%v leaves no time within server.terminationGracePeriodSeconds=%v: on SIGTERM the server takes new calls for the drain, then gives running streams at least 1 s (server.shutdownGraceSeconds), and the kubelet kills the pod at the end of the grace period, cutting them. Lower server.shutdownDrainSeconds or raise server.terminationGracePeriodSeconds above shutdownDrainSeconds + 1 (the default grace is the period less the drain less 5 s)" .Values.server.shutdownDrainSeconds .Values.server.terminationGracePeriodSeconds) -}}
{{- end -}}
{{- /* The grace whatever sets it: the chart's value, or the operator's --shutdown-grace in
server.extraArgs or TALKINGHEAD_SHUTDOWN_GRACE in server.extraEnv (those went unchecked). */ -}}
{{- $resolved := include "talkinghead.shutdownGraceSeconds" . -}}
{{- $from := ternary "server.shutdownGraceSeconds" "the shutdown grace (server.extraArgs' --shutdown-grace or server.extraEnv's TALKINGHEAD_SHUTDOWN_GRACE)" (ne (toString $grace) "") -}}
{{- if gt (float64 $resolved) 3600.0 -}}
{{- fail (printf "%s=%v: the server takes 0-3600 seconds and would refuse to start" $from $resolved) -}}
{{- end -}}
{{- if and (or (ne (toString $grace) "") (include "talkinghead.shutdownGraceArg" .) (include "talkinghead.shutdownGraceEnv" .)) (gt (int .Values.server.terminationGracePeriodSeconds) 0) (ge (addf (float64 $resolved) $drain) (float64 .Values.server.terminationGracePeriodSeconds)) -}}
{{- fail (printf "%s=%v (after server.shutdownDrainSeconds=%v) must end before server.terminationGracePeriodSeconds=%v: the kubelet kills the pod at the end of that, cutting the streams still running. Lower it (server.shutdownGraceSeconds empty: the grace period less the drain less 5 s) or raise server.terminationGracePeriodSeconds" $from $resolved .Values.server.shutdownDrainSeconds .Values.server.terminationGracePeriodSeconds) -}}
{{- end -}}
{{- if gt (int .Values.server.maxCreatesPerTenant) (int .Values.server.maxCreates) -}}
{{- fail (printf "server.maxCreatesPerTenant=%v is above server.maxCreates=%v: the server refuses to start (a tenant's creates in flight are at most the pod's); lower it with maxCreates" .Values.server.maxCreatesPerTenant .Values.server.maxCreates) -}}
{{- end -}}
{{- /* Triton must end its in-flight requests before the kubelet kills it: in its own pod within
its grace period; as a sidecar after its preStop sleep (the server's drain and streams' grace). */ -}}
{{- with include "talkinghead.tritonExitTimeout" . -}}
{{- $exit := int . -}}
{{- if include "talkinghead.tritonSidecar" $ -}}
{{- $stop := int (include "talkinghead.serverStopSeconds" $) -}}
{{- if ge (add $stop $exit) (int $.Values.server.terminationGracePeriodSeconds) -}}
{{- fail (printf "triton.mode=sidecar: Triton keeps serving the server for its drain and streams' grace (server.shutdownDrainSeconds + the shutdown grace = %d s, its preStop sleep), then needs --exit-timeout-secs=%d s to end in-flight requests, which together reach server.terminationGracePeriodSeconds=%v, when the kubelet kills the pod. Raise server.terminationGracePeriodSeconds, or lower server.shutdownGraceSeconds or triton.exitTimeoutSeconds" $stop $exit $.Values.server.terminationGracePeriodSeconds) -}}
{{- end -}}
{{- else if and (include "talkinghead.tritonDeployment" $) (ge $exit (int $.Values.triton.terminationGracePeriodSeconds)) -}}
{{- fail (printf "triton.exitTimeoutSeconds=%d must be below triton.terminationGracePeriodSeconds=%v: the kubelet kills Triton at the end of that, cutting the requests it was waiting for. Lower triton.exitTimeoutSeconds (empty: the grace period less 5 s) or raise triton.terminationGracePeriodSeconds" $exit $.Values.triton.terminationGracePeriodSeconds) -}}
{{- end -}}
{{- end -}}
{{- /* Containers of one pod share its network: two listeners on one port cannot both start. */ -}}
{{- $serverPod := list (list "server.grpcPort" .Values.server.grpcPort) (list "server.metricsPort" .Values.server.metricsPort) -}}
{{- $tritonPorts := list (list "triton.ports.http" .Values.triton.ports.http) (list "triton.ports.grpc" .Values.triton.ports.grpc) (list "triton.ports.metrics" .Values.triton.ports.metrics) -}}
{{- if include "talkinghead.tritonSidecar" . -}}
{{- include "talkinghead.distinctPorts" (dict "ports" (concat $serverPod $tritonPorts) "pod" "the server pod (Triton runs in it: triton.mode=sidecar)") -}}
{{- else -}}
{{- include "talkinghead.distinctPorts" (dict "ports" $serverPod "pod" "the server pod") -}}
{{- if include "talkinghead.tritonDeployment" . -}}
{{- include "talkinghead.distinctPorts" (dict "ports" $tritonPorts "pod" "the Triton pod") -}}
{{- end -}}
{{- end -}}
{{- range $name, $as := dict "server" .Values.server.autoscaling "triton" .Values.triton.autoscaling -}}
{{- if and $as.enabled (not $as.targetCPUUtilizationPercentage) (not $as.podsMetric.enabled) -}}
{{- fail (printf "%s.autoscaling needs targetCPUUtilizationPercentage > 0 or podsMetric.enabled" $name) -}}
{{- end -}}
{{- if lt (int $as.maxReplicas) (int $as.minReplicas) -}}
{{- fail (printf "%s.autoscaling.maxReplicas must be >= minReplicas" $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
"true" when a claim with these access modes may be mounted by pods on one node only (ReadWriteOnce,
ReadWriteOncePod; ReadOnlyMany shares only read-only mounts). Call with (dict "modes" <list> "readOnly" bool).
*/}}
{{- define "talkinghead.claimPinned" -}}
{{- if not (or (has "ReadWriteMany" .modes) (and .readOnly (has "ReadOnlyMany" .modes))) -}}true{{- end -}}
{{- end -}}

{{/*
A Deployment's `strategy`. The default RollingUpdate starts a new pod before stopping an old one: one
that mounts a claim only one node can attach (Multi-Attach), or needs a second GPU, never starts and
the rollout stalls. So: the operator's `override`; else Recreate where a pod mounts such a claim
(`pinned`) or holds a GPU as the only replica; RollingUpdate without surge where several replicas
hold GPUs; else surge one pod and keep every old one until it is ready. Call with (dict "override"
<values' strategy> "pinned" bool "gpu" bool "single" bool).
*/}}
{{- define "talkinghead.strategy" -}}
{{- if .override -}}
{{- toYaml .override -}}
{{- else if or .pinned (and .gpu .single) -}}
type: Recreate
{{- else if .gpu -}}
type: RollingUpdate
rollingUpdate:
  maxSurge: 0
  maxUnavailable: 1
{{- else -}}
type: RollingUpdate
rollingUpdate:
  maxSurge: 1
  maxUnavailable: 0
{{- end -}}
{{- end -}}

{{/* "true" when the model repository is a claim (not synced from object storage) that pods on one
node only may mount. Call with (dict "ctx" $ "readOnly" bool). */}}
{{- define "talkinghead.modelClaimPinned" -}}
{{- $m := .ctx.Values.modelRepository -}}
{{- if and (ne $m.source "objectStorage") (include "talkinghead.claimPinned" (dict "modes" $m.persistence.accessModes "readOnly" .readOnly)) -}}true{{- end -}}
{{- end -}}

{{/* Fails when two of `ports` (a list of (value name, port) pairs) of one `pod` are equal. */}}
{{- define "talkinghead.distinctPorts" -}}
{{- $seen := dict -}}
{{- range $pair := .ports -}}
{{- $name := index $pair 0 -}}
{{- $port := toString (int (index $pair 1)) -}}
{{- if hasKey $seen $port -}}
{{- fail (printf "%s and %s are both %s: they are ports of %s, whose containers share one network, so the second could not listen. Give each its own port" (index $seen $port) $name $port $.pod) -}}
{{- end -}}
{{- $_ := set $seen $port $name -}}
{{- end -}}
{{- end -}}

{{/* A probe's timing fields. Call with the probe's values. */}}
{{- define "talkinghead.probeTiming" -}}
initialDelaySeconds: {{ .initialDelaySeconds }}
periodSeconds: {{ .periodSeconds }}
timeoutSeconds: {{ .timeoutSeconds }}
failureThreshold: {{ .failureThreshold }}
successThreshold: {{ .successThreshold }}
{{- end -}}

{{/* HorizontalPodAutoscaler spec body. Call with (dict "as" <autoscaling values> "target" <Deployment name>). */}}
{{- define "talkinghead.hpaSpec" -}}
scaleTargetRef:
  apiVersion: apps/v1
  kind: Deployment
  name: {{ .target }}
minReplicas: {{ .as.minReplicas }}
maxReplicas: {{ .as.maxReplicas }}
metrics:
  {{- if .as.targetCPUUtilizationPercentage }}
  - type: Resource
    resource:
      name: cpu
      target:
        type: Utilization
        averageUtilization: {{ .as.targetCPUUtilizationPercentage }}
  {{- end }}
  {{- if .as.podsMetric.enabled }}
  - type: Pods
    pods:
      metric:
        name: {{ .as.podsMetric.name }}
      target:
        type: AverageValue
        averageValue: {{ .as.podsMetric.targetAverageValue | quote }}
  {{- end }}
{{- with .as.behavior }}
behavior:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* PodDisruptionBudget spec body. Call with (dict "pdb" <pdb values> "ctx" $ "component" name). */}}
{{- define "talkinghead.pdbSpec" -}}
{{- if and (not (kindIs "invalid" .pdb.minAvailable)) (ne (toString .pdb.minAvailable) "") -}}
minAvailable: {{ .pdb.minAvailable }}
{{- else -}}
maxUnavailable: {{ .pdb.maxUnavailable }}
{{- end }}
selector:
  matchLabels:
    {{- include "talkinghead.selectorLabels" (dict "ctx" .ctx "component" .component) | nindent 4 }}
{{- end -}}

{{/* ServiceMonitor metadata lines shared by both monitors. Call with (dict "ctx" $ "component" name "name" name). */}}
{{- define "talkinghead.serviceMonitorMeta" -}}
name: {{ .name }}
namespace: {{ default .ctx.Release.Namespace .ctx.Values.metrics.serviceMonitor.namespace }}
labels:
  {{- include "talkinghead.labels" (dict "ctx" .ctx "component" .component) | nindent 2 }}
  {{- with .ctx.Values.metrics.serviceMonitor.labels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with include "talkinghead.annotations" (dict "ctx" .ctx) }}
{{ . }}
{{- end }}
{{- end -}}

{{/* The Secret holding the watermark key under `key`: the operator's, or the one the chart makes. */}}
{{- define "talkinghead.watermarkSecret" -}}
{{- .Values.watermark.existingSecret | default (printf "%s-watermark" (include "talkinghead.fullname" .)) -}}
{{- end -}}

{{/*
The seconds the server gives running streams on SIGTERM (`talkinghead serve --shutdown-grace`,
default 5 s in the service): server.shutdownGraceSeconds, else the pod's
terminationGracePeriodSeconds less 5 s (at least 1), left for the rest of the shutdown before the
kubelet kills the pod. Empty when the operator passes it: --shutdown-grace in server.extraArgs, or
TALKINGHEAD_SHUTDOWN_GRACE in server.extraEnv (the chart's flag then reads that variable).
*/}}
{{- define "talkinghead.shutdownGrace" -}}
{{- $s := .Values.server -}}
{{- if not (or (include "talkinghead.shutdownGraceArg" .) (include "talkinghead.shutdownGraceEnv" .)) -}}
{{- if eq (toString $s.shutdownGraceSeconds) "" -}}
{{- min 3600 (max 1 (sub (sub (int $s.terminationGracePeriodSeconds) 5) (int $s.shutdownDrainSeconds))) -}}
{{- else -}}
{{- $s.shutdownGraceSeconds -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The seconds the server's streams get on SIGTERM whatever sets them: the chart's value, else the
operator's --shutdown-grace=N (server.extraArgs) or TALKINGHEAD_SHUTDOWN_GRACE (server.extraEnv),
else (one the chart cannot read) the default: the grace period less the drain less 5 s, at least 1.
*/}}
{{- define "talkinghead.shutdownGraceSeconds" -}}
{{- $s := .Values.server -}}
{{- $g := include "talkinghead.shutdownGrace" . -}}
{{- if not $g -}}
{{- range $s.extraArgs -}}{{- if hasPrefix "--shutdown-grace=" (toString .) -}}{{- $g = trimPrefix "--shutdown-grace=" (toString .) -}}{{- end -}}{{- end -}}
{{- end -}}
{{- if not $g -}}
{{- range $s.extraEnv -}}{{- if eq (toString .name) "TALKINGHEAD_SHUTDOWN_GRACE" -}}{{- $g = toString (.value | default "") -}}{{- end -}}{{- end -}}
{{- end -}}
{{- if not (regexMatch "^[0-9]+(\\.[0-9]+)?$" (toString $g)) -}}
{{- $g = min 3600 (max 1 (sub (sub (int $s.terminationGracePeriodSeconds) 5) (int $s.shutdownDrainSeconds))) -}}
{{- end -}}
{{- $g -}}
{{- end -}}

{{/* Whole seconds from SIGTERM until the server has drained and its streams' grace is over: how long
a Triton sidecar keeps serving it (its preStop sleeps that long before Triton gets SIGTERM). */}}
{{- define "talkinghead.serverStopSeconds" -}}
{{- ceil (addf (float64 .Values.server.shutdownDrainSeconds) (float64 (include "talkinghead.shutdownGraceSeconds" .))) | int -}}
{{- end -}}

{{/*
Triton's --exit-timeout-secs (how long it waits for in-flight requests after SIGTERM; Triton's own
default, 30 s, equals the default grace period, so the kubelet killed it first): triton.exitTimeoutSeconds,
else in its own Deployment its terminationGracePeriodSeconds less 5 s, and as a sidecar what the
server pod's grace period leaves after the preStop sleep, less 1 s; at least 1. Empty when
triton.extraArgs passes --exit-timeout-secs.
*/}}
{{- define "talkinghead.tritonExitTimeout" -}}
{{- $t := .Values.triton -}}
{{- $own := "" -}}
{{- range $t.extraArgs -}}{{- if hasPrefix "--exit-timeout-secs" (toString .) -}}{{- $own = "true" -}}{{- end -}}{{- end -}}
{{- if not $own -}}
{{- if ne (toString $t.exitTimeoutSeconds) "" -}}
{{- $t.exitTimeoutSeconds | int -}}
{{- else if include "talkinghead.tritonSidecar" . -}}
{{- max 1 (sub (sub (int .Values.server.terminationGracePeriodSeconds) (int (include "talkinghead.serverStopSeconds" .))) 1) -}}
{{- else -}}
{{- max 1 (sub (int $t.terminationGracePeriodSeconds) 5) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "true" when server.extraArgs passes --shutdown-grace itself. */}}
{{- define "talkinghead.shutdownGraceArg" -}}
{{- range .Values.server.extraArgs -}}{{- if hasPrefix "--shutdown-grace" (toString .) -}}true{{- end -}}{{- end -}}
{{- end -}}

{{/* "true" when server.extraEnv sets TALKINGHEAD_SHUTDOWN_GRACE. */}}
{{- define "talkinghead.shutdownGraceEnv" -}}
{{- range .Values.server.extraEnv -}}{{- if eq (toString .name) "TALKINGHEAD_SHUTDOWN_GRACE" -}}true{{- end -}}{{- end -}}
{{- end -}}

{{/* "true" when the server reads its key ring from a mounted Secret (auth.apiKeys.source secret). */}}
{{- define "talkinghead.apiKeysFromSecret" -}}
{{- if and .Values.auth.apiKeys.enabled (eq .Values.auth.apiKeys.source "secret") -}}true{{- end -}}
{{- end -}}

{{/* The Secret holding the key ring under `keys.json`: the operator's, or the one the chart makes. */}}
{{- define "talkinghead.apiKeysSecret" -}}
{{- .Values.auth.apiKeys.existingSecret | default (printf "%s-api-keys" (include "talkinghead.fullname" .)) -}}
{{- end -}}

{{/*
The container's CPU request, in millicores, from the downward API (TALKINGHEAD_CPU_REQUEST_MILLICORES):
where the container has no CPU limit (the chart's default) facekit/cpus.py sizes its threads by it,
not by the node's cores. Only for a container whose `resources` request CPU. Called with them.
*/}}
{{- define "talkinghead.cpuRequestEnv" -}}
{{- if and . .requests (hasKey .requests "cpu") -}}
- name: TALKINGHEAD_CPU_REQUEST_MILLICORES
  valueFrom:
    resourceFieldRef:
      resource: requests.cpu
      divisor: 1m
{{- end }}
{{- end -}}
