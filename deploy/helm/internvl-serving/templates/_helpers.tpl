{{/* Names ------------------------------------------------------------------------------------------------------ */}}

{{- define "internvl-serving.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-<chart>" (or fullnameOverride), trimmed so that "-vision-encoder" still fits in 63 characters. */}}
{{- define "internvl-serving.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "internvl-serving.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "internvl-serving.gateway.fullname" -}}{{ include "internvl-serving.fullname" . }}-gateway{{- end }}
{{- define "internvl-serving.visionEncoder.fullname" -}}{{ include "internvl-serving.fullname" . }}-vision-encoder{{- end }}
{{- define "internvl-serving.llmDecoder.fullname" -}}{{ include "internvl-serving.fullname" . }}-llm-decoder{{- end }}
{{- define "internvl-serving.redis.fullname" -}}{{ include "internvl-serving.fullname" . }}-redis{{- end }}

{{- define "internvl-serving.gateway.serviceAccountName" -}}
{{- default (include "internvl-serving.gateway.fullname" .) .Values.gateway.serviceAccount.name }}
{{- end }}

{{/* Labels ----------------------------------------------------------------------------------------------------- */}}

{{- define "internvl-serving.selectorLabels" -}}
app.kubernetes.io/name: {{ include "internvl-serving.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "internvl-serving.labels" -}}
helm.sh/chart: {{ include "internvl-serving.chart" . }}
{{ include "internvl-serving.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: internvl-serving
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: include with (dict "root" $ "component" "gateway"). */}}
{{- define "internvl-serving.componentSelectorLabels" -}}
{{ include "internvl-serving.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "internvl-serving.componentLabels" -}}
{{ include "internvl-serving.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Values ----------------------------------------------------------------------------------------------------- */}}

{{/* image: (dict "root" $ "image" .Values.gateway.image) */}}
{{- define "internvl-serving.image" -}}
{{- printf "%s:%s" .image.repository (toString (default .root.Chart.AppVersion .image.tag)) }}
{{- end }}

{{/* Where MODEL points: the PVC mount when the checkpoint comes from a claim, else the hub id. */}}
{{- define "internvl-serving.modelPath" -}}
{{- if .Values.model.existingClaim }}{{ .Values.model.mountPath }}{{ else }}{{ required "model.id or model.existingClaim is required" .Values.model.id }}{{ end }}
{{- end }}

{{/* "true" when the pods download from the hub (the model is a hub id). */}}
{{- define "internvl-serving.hubEgress" -}}
{{- $v := .Values.networkPolicy.hubEgress.enabled }}
{{- if kindIs "bool" $v }}{{ ternary "true" "" $v }}{{ else }}{{ ternary "" "true" (not (empty .Values.model.existingClaim)) }}{{ end }}
{{- end }}

{{/* "true" when the services get a REDIS_URL. */}}
{{- define "internvl-serving.redisConfigured" -}}
{{- if or .Values.redis.enabled .Values.redis.external.url .Values.redis.external.existingSecret }}true{{ end }}
{{- end }}

{{- define "internvl-serving.redisSecretName" -}}
{{- default (include "internvl-serving.redis.fullname" .) .Values.redis.auth.existingSecret }}
{{- end }}

{{/* startupProbe failureThreshold from a budget in seconds: (dict "budget" N "period" P) */}}
{{- define "internvl-serving.failureThreshold" -}}
{{- $n := div (add (int .budget) (sub (int .period) 1)) (int .period) }}{{ max 1 $n }}
{{- end }}

{{/* Pod spec pieces ---------------------------------------------------------------------------------------- */}}

{{- define "internvl-serving.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
fsGroupChangePolicy: {{ .Values.securityContext.fsGroupChangePolicy }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The restricted profile on a container: (dict "user" N "group" N) */}}
{{- define "internvl-serving.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .user }}
runAsGroup: {{ .group }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* REDIS_URL (and the password it is built from), when a Redis is configured. */}}
{{- define "internvl-serving.redisEnv" -}}
{{- if .Values.redis.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "internvl-serving.redisSecretName" . }}
      key: {{ .Values.redis.auth.existingSecretKey }}
- name: REDIS_URL
  value: "redis://:$(REDIS_PASSWORD)@{{ include "internvl-serving.redis.fullname" . }}:{{ .Values.redis.port }}/0"
{{- else if .Values.redis.external.existingSecret }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.existingSecret }}
      key: {{ .Values.redis.external.existingSecretKey }}
{{- else if .Values.redis.external.url }}
- name: REDIS_URL
  value: {{ .Values.redis.external.url | quote }}
{{- end }}
{{- end }}

{{/* Model source, hub token and the writable cache directories, shared by the three services. */}}
{{- define "internvl-serving.modelEnv" -}}
- name: MODEL
  value: {{ include "internvl-serving.modelPath" . | quote }}
{{- if .Values.model.existingClaim }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}
{{- with .Values.model.hfToken.existingSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.model.hfToken.key }}
{{- end }}
- name: HOME
  value: /tmp
- name: HF_HOME
  value: {{ .Values.model.hubCache.mountPath | quote }}
- name: XDG_CACHE_HOME
  value: /var/cache/app
- name: TRITON_CACHE_DIR
  value: /var/cache/app/triton
- name: TORCHINDUCTOR_CACHE_DIR
  value: /var/cache/app/torchinductor
{{- end }}

{{- define "internvl-serving.modelVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /var/cache/app
- name: hf-home
  mountPath: {{ .Values.model.hubCache.mountPath }}
{{- if .Values.model.existingClaim }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  {{- with .Values.model.subPath }}
  subPath: {{ . }}
  {{- end }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "internvl-serving.modelVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
- name: cache
  emptyDir:
    sizeLimit: {{ .Values.cacheSizeLimit }}
- name: hf-home
  {{- if .Values.model.hubCache.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.hubCache.existingClaim }}
  {{- else }}
  emptyDir:
    sizeLimit: {{ .Values.model.hubCache.emptyDirSizeLimit }}
  {{- end }}
{{- if .Values.model.existingClaim }}
- name: model
  persistentVolumeClaim:
    claimName: {{ .Values.model.existingClaim }}
    readOnly: true
{{- end }}
{{- end }}

{{/* Scheduling: (dict "root" $ "c" .Values.gateway "component" "gateway") */}}
{{- define "internvl-serving.scheduling" -}}
{{- with .c.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .c.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- if .c.topologySpreadConstraints }}
topologySpreadConstraints:
{{- range .c.topologySpreadConstraints }}
  {{- $tsc := . }}
  {{- if not .labelSelector }}
  {{- $tsc = merge (dict "labelSelector" (dict "matchLabels" (include "internvl-serving.componentSelectorLabels" (dict "root" $.root "component" $.component) | fromYaml))) . }}
  {{- end }}
  - {{- toYaml $tsc | nindent 4 }}
{{- end }}
{{- end }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* PodDisruptionBudget: (dict "root" $ "pdb" .Values.gateway.pdb "component" "gateway" "name" NAME) */}}
{{- define "internvl-serving.pdb" -}}
{{- if .pdb.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ .name }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "internvl-serving.componentLabels" (dict "root" .root "component" .component) | nindent 4 }}
spec:
  {{- if not (kindIs "invalid" .pdb.minAvailable) }}
  minAvailable: {{ .pdb.minAvailable }}
  {{- else }}
  maxUnavailable: {{ if kindIs "invalid" .pdb.maxUnavailable }}1{{ else }}{{ .pdb.maxUnavailable }}{{ end }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "internvl-serving.componentSelectorLabels" (dict "root" .root "component" .component) | nindent 6 }}
{{- end }}
{{- end }}

{{/* mTLS between the gateway and the pools: the Secret's files (internalTLS). */}}
{{- define "internvl-serving.internalTLS.dir" -}}/etc/internvl-serving/tls{{- end }}

{{- define "internvl-serving.internalTLS.volumeMount" -}}
{{- if .Values.internalTLS.enabled }}
- name: internal-tls
  mountPath: {{ include "internvl-serving.internalTLS.dir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "internvl-serving.internalTLS.volume" -}}
{{- if .Values.internalTLS.enabled }}
- name: internal-tls
  secret:
    secretName: {{ .Values.internalTLS.secretName }}
    defaultMode: 0440
{{- end }}
{{- end }}
