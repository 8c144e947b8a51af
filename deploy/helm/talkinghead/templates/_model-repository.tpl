{{/*
The model repository in the pods: its volumes, its mount, and the init container that syncs it from
object storage. Used by triton-deployment.yaml and server-deployment.yaml (backend onnxruntime, or
Triton as a sidecar); the claim itself is model-repository-pvc.yaml.
*/}}

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
    {{- toYaml .Values.server.containerSecurityContext | nindent 4 }}
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

{{/*
The pod securityContext of a pod that mounts the model repository (Triton, the worker, the server
with the in-process backend or a Triton sidecar): the component's `podSecurityContext` with fsGroup
`modelRepository.fsGroup`. kubelet chowns a volume's root to the fsGroup of each pod that mounts it
(where it changes ownership at all) and adds that group to the pod's processes: pods with different
fsGroups flipped the root's group at each start, and after a Triton pod's (1000) the worker (10001)
could no longer create generator_<avatar>/ there. Called with (dict "ctx" $ "context" <the
component's podSecurityContext>).
*/}}
{{- define "talkinghead.modelRepository.podSecurityContext" -}}
{{- toYaml (merge (dict "fsGroup" (int64 .ctx.Values.modelRepository.fsGroup)) (deepCopy (.context | default dict))) -}}
{{- end -}}

{{/* The model repository's mount in the container that reads it (Triton, or the server). */}}
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
