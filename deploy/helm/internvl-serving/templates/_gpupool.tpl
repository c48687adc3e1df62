{{/*
A GPU pool: Deployment, headless Service (gRPC + metrics), PodDisruptionBudget and, when enabled, a KEDA ScaledObject.
(dict "root" $ "c" .Values.visionEncoder "component" "vision-encoder" "name" NAME "container" "vision-encoder"
      "portEnv" "VISION_PORT" "metricsEnv" "VISION_METRICS_PORT" "env" (list of EnvVar, YAML) "redis" bool)
*/}}
{{- define "internvl-serving.gpuPool" -}}
{{- $root := .root -}}
{{- $c := .c -}}
{{- $sel := include "internvl-serving.componentSelectorLabels" (dict "root" $root "component" .component) -}}
{{- $labels := include "internvl-serving.componentLabels" (dict "root" $root "component" .component) -}}
{{- $gpu := dict $root.Values.gpuResourceName (int $c.gpus) -}}
{{- $tls := $root.Values.internalTLS -}}
{{- /* With mTLS the kubelet's gRPC probes (no client certificate) go to the plaintext health-only port. */ -}}
{{- $probePort := ternary $tls.healthPort $c.service.grpcPort $tls.enabled -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- $labels | nindent 4 }}
spec:
  {{- if not $c.autoscaling.enabled }}
  replicas: {{ $c.replicas }}
  {{- end }}
  strategy:
    {{- toYaml $c.strategy | nindent 4 }}
  selector:
    matchLabels:
      {{- $sel | nindent 6 }}
  template:
    metadata:
      labels:
        {{- $labels | nindent 8 }}
        {{- with $c.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $c.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      automountServiceAccountToken: false
      terminationGracePeriodSeconds: {{ $c.terminationGracePeriodSeconds }}
      securityContext:
        {{- include "internvl-serving.podSecurityContext" $root | nindent 8 }}
      {{- with include "internvl-serving.scheduling" (dict "root" $root "c" $c "component" .component) }}{{ . | nindent 6 }}{{ end }}
      containers:
        - name: {{ .container }}
          image: {{ include "internvl-serving.image" (dict "root" $root "image" $c.image) }}
          imagePullPolicy: {{ $c.image.pullPolicy }}
          command:
            {{- toYaml $c.command | nindent 12 }}
          ports:
            - name: grpc
              containerPort: {{ $c.service.grpcPort }}
              protocol: TCP
            - name: metrics
              containerPort: {{ $c.service.metricsPort }}
              protocol: TCP
            {{- if $tls.enabled }}
            - name: health
              containerPort: {{ $tls.healthPort }}
              protocol: TCP
            {{- end }}
          env:
            {{- include "internvl-serving.modelEnv" $root | nindent 12 }}
            # On SIGTERM: NOT_SERVING at once, 5 s for readiness and the gateway's balancer to notice, then the calls
            # in flight get the rest of the termination grace period, less a margin before the kubelet's SIGKILL.
            - name: SHUTDOWN_DELAY_S
              value: "5"
            - name: SHUTDOWN_GRACE_S
              value: {{ max 1 (sub (int $c.terminationGracePeriodSeconds) 15) | quote }}
            - name: DEVICE
              value: cuda
            - name: DTYPE
              value: {{ $root.Values.model.dtype | quote }}
            - name: {{ .portEnv }}
              value: {{ $c.service.grpcPort | quote }}
            - name: {{ .metricsEnv }}
              value: {{ $c.service.metricsPort | quote }}
            {{- if .redis }}
            {{- include "internvl-serving.redisEnv" $root | nindent 12 }}
            {{- end }}
            {{- if $tls.enabled }}
            {{- $dir := include "internvl-serving.internalTLS.dir" $root }}
            # mTLS: only callers with a certificate from the Secret's CA (the gateway) reach the gRPC port.
            - name: GRPC_TLS_CERT
              value: {{ $dir }}/tls.crt
            - name: GRPC_TLS_KEY
              value: {{ $dir }}/tls.key
            - name: GRPC_TLS_CLIENT_CA
              value: {{ $dir }}/ca.crt
            - name: GRPC_HEALTH_PORT
              value: {{ $tls.healthPort | quote }}
            {{- end }}
            {{- .env | nindent 12 }}
            {{- with $c.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          # Health is SERVING only once the model is loaded: the startupProbe holds the other probes off until then.
          startupProbe:
            grpc:
              port: {{ $probePort }}
            periodSeconds: {{ $c.probes.periodSeconds }}
            timeoutSeconds: {{ $c.probes.timeoutSeconds }}
            failureThreshold: {{ include "internvl-serving.failureThreshold" (dict "budget" $c.probes.startupBudgetSeconds "period" $c.probes.periodSeconds) }}
          readinessProbe:
            grpc:
              port: {{ $probePort }}
            periodSeconds: {{ $c.probes.periodSeconds }}
            timeoutSeconds: {{ $c.probes.timeoutSeconds }}
            failureThreshold: 3
          livenessProbe:
            grpc:
              port: {{ $probePort }}
            periodSeconds: {{ $c.probes.periodSeconds }}
            timeoutSeconds: {{ $c.probes.timeoutSeconds }}
            failureThreshold: {{ $c.probes.livenessFailureThreshold }}
          resources:
            requests:
              {{- toYaml (merge (dict) $gpu ($c.resources.requests | default dict)) | nindent 14 }}
            limits:
              {{- toYaml (merge (dict) $gpu ($c.resources.limits | default dict)) | nindent 14 }}
          securityContext:
            {{- include "internvl-serving.containerSecurityContext" (dict "user" $root.Values.securityContext.runAsUser "group" $root.Values.securityContext.runAsGroup) | nindent 12 }}
          volumeMounts:
            {{- include "internvl-serving.modelVolumeMounts" $root | nindent 12 }}
            {{- include "internvl-serving.internalTLS.volumeMount" $root | nindent 12 }}
            - name: dshm
              mountPath: /dev/shm
      volumes:
        {{- include "internvl-serving.modelVolumes" $root | nindent 8 }}
        {{- include "internvl-serving.internalTLS.volume" $root | nindent 8 }}
        - name: dshm
          emptyDir:
            medium: Memory
            sizeLimit: {{ $c.shmSizeLimit }}
---
# Headless: every ready pod is an address, so the gateway balances over the pool itself.
apiVersion: v1
kind: Service
metadata:
  name: {{ .name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- $labels | nindent 4 }}
spec:
  clusterIP: None
  selector:
    {{- $sel | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $c.service.grpcPort }}
      targetPort: grpc
      protocol: TCP
      {{- if not $tls.enabled }}
      appProtocol: kubernetes.io/h2c
      {{- end }}
    - name: metrics
      port: {{ $c.service.metricsPort }}
      targetPort: metrics
      protocol: TCP
{{- include "internvl-serving.pdb" (dict "root" $root "pdb" $c.pdb "component" .component "name" .name) }}
{{- if $c.autoscaling.enabled }}
{{- $a := $c.autoscaling }}
---
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: {{ .name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- $labels | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ .name }}
  pollingInterval: {{ $a.pollingInterval }}
  cooldownPeriod: {{ $a.cooldownPeriod }}
  minReplicaCount: {{ ternary 0 $a.minReplicas $a.scaleToZero.enabled }}
  maxReplicaCount: {{ $a.maxReplicas }}
  advanced:
    horizontalPodAutoscalerConfig:
      name: {{ .name }}
      {{- with $a.behavior }}
      behavior:
        {{- toYaml . | nindent 8 }}
      {{- end }}
  triggers:
    {{- range $a.triggers }}
    - type: prometheus
      name: {{ .name }}
      metricType: {{ .metricType | default "AverageValue" }}
      metadata:
        serverAddress: {{ $a.prometheusAddress | quote }}
        query: {{ tpl .query $root | quote }}
        threshold: {{ .threshold | toString | quote }}
        {{- if hasKey . "activationThreshold" }}
        activationThreshold: {{ .activationThreshold | toString | quote }}
        {{- end }}
        ignoreNullValues: "true"
      {{- with $a.authenticationRef }}
      authenticationRef:
        name: {{ . }}
      {{- end }}
    {{- end }}
    {{- if $a.scaleToZero.enabled }}
    # A pool at zero exports nothing: the gateway's demand wakes it.
    - type: prometheus
      name: gateway-demand
      metricType: AverageValue
      metadata:
        serverAddress: {{ $a.prometheusAddress | quote }}
        query: {{ tpl $a.scaleToZero.query $root | quote }}
        threshold: {{ $a.scaleToZero.threshold | toString | quote }}
        activationThreshold: {{ $a.scaleToZero.activationThreshold | toString | quote }}
        ignoreNullValues: "true"
      {{- with $a.authenticationRef }}
      authenticationRef:
        name: {{ . }}
      {{- end }}
    {{- end }}
{{- end }}
{{- end }}
