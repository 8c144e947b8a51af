{{/* Names, labels, images, and the pieces the service and Triton pods share. */}}

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

{{/* An image reference. Call with (dict "image" .Values.service.image "ctx" $). */}}
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
{{- if and (eq .Values.service.backend "triton") (ne .Values.triton.mode "external") -}}true{{- end -}}
{{- end -}}

{{- define "talkinghead.tritonDeployment" -}}
{{- if and (include "talkinghead.tritonManaged" .) (eq .Values.triton.mode "deployment") -}}true{{- end -}}
{{- end -}}

{{- define "talkinghead.tritonSidecar" -}}
{{- if and (include "talkinghead.tritonManaged" .) (eq .Values.triton.mode "sidecar") -}}true{{- end -}}
{{- end -}}

{{/* The gRPC address the service sends inference requests to. */}}
{{- define "talkinghead.tritonUrl" -}}
{{- if eq .Values.triton.mode "external" -}}
{{- .Values.triton.externalUrl -}}
{{- else if eq .Values.triton.mode "sidecar" -}}
{{- printf "127.0.0.1:%d" (int .Values.triton.ports.grpc) -}}
{{- else -}}
{{- printf "%s.%s.svc:%d" (include "talkinghead.tritonFullname" .) .Release.Namespace (int .Values.triton.ports.grpc) -}}
{{- end -}}
{{- end -}}

{{/* "true" when some pod of the chart mounts the model repository. */}}
{{- define "talkinghead.modelRepositoryUsed" -}}
{{- if or (eq .Values.service.backend "onnxruntime") (include "talkinghead.tritonManaged" .) -}}true{{- end -}}
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

{{/* Combinations the schema cannot express; rendered (as nothing) by every workload template. */}}
{{- define "talkinghead.validate" -}}
{{- if and (eq .Values.service.backend "triton") (eq .Values.triton.mode "external") (not .Values.triton.externalUrl) -}}
{{- fail "triton.mode=external needs triton.externalUrl (host:port of Triton's gRPC endpoint)" -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) (not (and .Values.tls.cert .Values.tls.key)) -}}
{{- fail "tls.enabled needs tls.existingSecret, or both tls.cert and tls.key" -}}
{{- end -}}
{{- if and (include "talkinghead.modelRepositoryUsed" .) (eq .Values.modelRepository.source "existingClaim") (not .Values.modelRepository.existingClaim) -}}
{{- fail "modelRepository.source=existingClaim needs modelRepository.existingClaim" -}}
{{- end -}}
{{- if and (include "talkinghead.modelRepositoryUsed" .) (eq .Values.modelRepository.source "objectStorage") (not .Values.modelRepository.objectStorage.url) -}}
{{- fail "modelRepository.source=objectStorage needs modelRepository.objectStorage.url (s3://... or gs://...)" -}}
{{- end -}}
{{- range $name, $as := dict "service" .Values.service.autoscaling "triton" .Values.triton.autoscaling -}}
{{- if and $as.enabled (not $as.targetCPUUtilizationPercentage) (not $as.podsMetric.enabled) -}}
{{- fail (printf "%s.autoscaling needs targetCPUUtilizationPercentage > 0 or podsMetric.enabled" $name) -}}
{{- end -}}
{{- if lt (int $as.maxReplicas) (int $as.minReplicas) -}}
{{- fail (printf "%s.autoscaling.maxReplicas must be >= minReplicas" $name) -}}
{{- end -}}
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

{{/*
Readiness of the service: grpc.health.v1, SERVING only while its backend (Triton, or the in-process
models) is ready. Kubernetes' native gRPC probe, or, with TLS (which that probe cannot speak), an
exec of the image's talkinghead-healthcheck.
*/}}
{{- define "talkinghead.serviceReadinessHandler" -}}
{{- if .Values.tls.enabled -}}
exec:
  command:
    - talkinghead-healthcheck
    - --address=127.0.0.1:{{ .Values.service.grpcPort }}
    - --tls
    {{- with .Values.tls.serverName }}
    - --server-name={{ . }}
    {{- end }}
{{- else -}}
grpc:
  port: {{ .Values.service.grpcPort }}
{{- end -}}
{{- end -}}

{{/*
Volumes holding the model repository (`model-repository`: the claim, or an emptyDir the sync init
container fills) and, when engines are built, `model-repository-built`.
*/}}
{{- define "talkinghead.modelRepository.volumes" -}}
{{- $m := .Values.modelRepository -}}
- name: model-repository
{{- if eq $m.source "objectStorage" }}
  emptyDir:
    sizeLimit: {{ $m.objectStorage.sizeLimit }}
{{- else }}
  persistentVolumeClaim:
    claimName: {{ include "talkinghead.modelClaimName" . }}
    readOnly: true
{{- end }}
{{- if and (include "talkinghead.tritonManaged" .) .Values.triton.buildEngines.enabled }}
- name: model-repository-built
  emptyDir:
    sizeLimit: {{ .Values.triton.buildEngines.sizeLimit }}
{{- end }}
{{- end -}}

{{/* The init container that syncs the repository from object storage (source objectStorage). */}}
{{- define "talkinghead.modelRepository.syncContainer" -}}
{{- $o := .Values.modelRepository.objectStorage -}}
- name: sync-model-repository
  image: {{ include "talkinghead.image" (dict "image" $o.image "ctx" .) }}
  imagePullPolicy: {{ $o.image.pullPolicy }}
  command:
    {{- toYaml $o.command | nindent 4 }}
  args:
    {{- toYaml $o.args | nindent 4 }}
  env:
    - name: MODEL_REPOSITORY_URL
      value: {{ $o.url | quote }}
    - name: MODEL_REPOSITORY_DIR
      value: /models-sync
    - name: HOME
      value: /tmp
    {{- with $o.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $o.credentialsSecret }}
  envFrom:
    - secretRef:
        name: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.service.containerSecurityContext | nindent 4 }}
  {{- with $o.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: model-repository
      mountPath: /models-sync
    - name: tmp
      mountPath: /tmp
{{- end -}}

{{/* The model repository's mount in the container that reads it (Triton, or the service). */}}
{{- define "talkinghead.modelRepository.mount" -}}
{{- if and (include "talkinghead.tritonManaged" .) .Values.triton.buildEngines.enabled -}}
- name: model-repository-built
  mountPath: {{ .Values.modelRepository.mountPath }}
  readOnly: true
{{- else -}}
- name: model-repository
  mountPath: {{ .Values.modelRepository.mountPath }}
  readOnly: true
  {{- with .Values.modelRepository.subPath }}
  subPath: {{ . }}
  {{- end }}
{{- end -}}
{{- end -}}

{{/* Triton's init containers: sync from object storage, then build TensorRT engines. */}}
{{- define "talkinghead.triton.initContainers" -}}
{{- if eq .Values.modelRepository.source "objectStorage" }}
{{ include "talkinghead.modelRepository.syncContainer" . }}
{{- end }}
{{- if .Values.triton.buildEngines.enabled }}
{{- $b := .Values.triton.buildEngines }}
{{- /* export.to_tensorrt copies --repository into --out, then builds a model.plan beside each
model.onnx whose config.pbtxt asks for tensorrt_plan (exit 3 when TensorRT is missing). */}}
- name: build-engines
  image: {{ include "talkinghead.image" (dict "image" .Values.triton.image "ctx" .) }}
  imagePullPolicy: {{ .Values.triton.image.pullPolicy }}
  command: ["python3", "-m", "export.to_tensorrt"]
  args:
    - --repository=/models-src
    - --out={{ .Values.modelRepository.mountPath }}
    - {{ ternary "--fp16" "--no-fp16" $b.fp16 }}
    {{- range $b.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  env:
    - name: HOME
      value: /tmp
  securityContext:
    {{- toYaml .Values.triton.containerSecurityContext | nindent 4 }}
  resources:
    {{- $res := deepCopy ($b.resources | default dict) }}
    {{- if gt (int .Values.triton.gpus) 0 }}
    {{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" (int .Values.triton.gpus)) ($res.limits | default dict)) }}
    {{- end }}
    {{- toYaml $res | nindent 4 }}
  volumeMounts:
    - name: model-repository
      mountPath: /models-src
      readOnly: true
      {{- with .Values.modelRepository.subPath }}
      subPath: {{ . }}
      {{- end }}
    - name: model-repository-built
      mountPath: {{ .Values.modelRepository.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end -}}

{{/* The Triton container (its own Deployment, or a sidecar of the service pods). */}}
{{- define "talkinghead.triton.container" -}}
{{- $t := .Values.triton -}}
- name: triton
  image: {{ include "talkinghead.image" (dict "image" $t.image "ctx" .) }}
  imagePullPolicy: {{ $t.image.pullPolicy }}
  command: ["tritonserver"]
  args:
    - --model-repository={{ .Values.modelRepository.mountPath }}
    - --model-control-mode={{ $t.modelControlMode }}
    {{- if eq $t.modelControlMode "explicit" }}
    {{- range $t.loadModels }}
    - --load-model={{ . }}
    {{- end }}
    {{- else if eq $t.modelControlMode "poll" }}
    - --repository-poll-secs={{ $t.repositoryPollSeconds }}
    {{- end }}
    - --http-port={{ $t.ports.http }}
    - --grpc-port={{ $t.ports.grpc }}
    - --metrics-port={{ $t.ports.metrics }}
    - --allow-metrics=true
    - --log-verbose={{ $t.logVerbose }}
    {{- range $t.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  env:
    - name: HOME
      value: /tmp
    {{- with $t.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: http
      containerPort: {{ $t.ports.http }}
      protocol: TCP
    - name: grpc-triton
      containerPort: {{ $t.ports.grpc }}
      protocol: TCP
    - name: metrics-triton
      containerPort: {{ $t.ports.metrics }}
      protocol: TCP
  {{- if $t.startupProbe.enabled }}
  startupProbe:
    httpGet:
      path: /v2/health/ready
      port: http
    {{- include "talkinghead.probeTiming" $t.startupProbe | nindent 4 }}
  {{- end }}
  {{- if $t.livenessProbe.enabled }}
  livenessProbe:
    httpGet:
      path: /v2/health/live
      port: http
    {{- include "talkinghead.probeTiming" $t.livenessProbe | nindent 4 }}
  {{- end }}
  {{- if $t.readinessProbe.enabled }}
  readinessProbe:
    httpGet:
      path: /v2/health/ready
      port: http
    {{- include "talkinghead.probeTiming" $t.readinessProbe | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $t.containerSecurityContext | nindent 4 }}
  resources:
    {{- $res := deepCopy ($t.resources | default dict) }}
    {{- if gt (int $t.gpus) 0 }}
    {{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" (int $t.gpus)) ($res.limits | default dict)) }}
    {{- end }}
    {{- toYaml $res | nindent 4 }}
  volumeMounts:
    {{- include "talkinghead.modelRepository.mount" . | nindent 4 }}
    - name: dshm
      mountPath: /dev/shm
    - name: tmp
      mountPath: /tmp
{{- end -}}

{{/* Volumes only Triton needs (the model repository volumes come from modelRepository.volumes). */}}
{{- define "talkinghead.triton.volumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.triton.shmSize }}
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
