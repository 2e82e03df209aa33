{{/*
Names, labels and the pieces shared by the head and worker pods.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "tuneloop.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every resource name. Kept to 40 characters because KubeRay appends its own
suffixes (-raycluster-xxxxx, -head-svc) and Kubernetes caps names at 63.
*/}}
{{- define "tuneloop.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "tuneloop.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object of the release. */}}
{{- define "tuneloop.labels" -}}
helm.sh/chart: {{ include "tuneloop.chart" . }}
{{ include "tuneloop.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tuneloop
{{- end }}

{{/* Labels that select the release's pods; never change them on upgrade. */}}
{{- define "tuneloop.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tuneloop.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector of the Ray pods, head and workers alike. */}}
{{- define "tuneloop.raySelectorLabels" -}}
{{ include "tuneloop.selectorLabels" . }}
app.kubernetes.io/component: ray
{{- end }}

{{/* Selector of the bundled PostgreSQL pod. */}}
{{- define "tuneloop.databaseSelectorLabels" -}}
{{ include "tuneloop.selectorLabels" . }}
app.kubernetes.io/component: database
{{- end }}

{{- define "tuneloop.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* GPU workers need a CUDA build of torch, hence their own image, "<tag>-gpu" by default. */}}
{{- define "tuneloop.gpuImage" -}}
{{- $gpu := .Values.ray.workers.gpu.image }}
{{- $tag := printf "%s-gpu" (.Values.image.tag | default .Chart.AppVersion) }}
{{- printf "%s:%s" ($gpu.repository | default .Values.image.repository) ($gpu.tag | default $tag) }}
{{- end }}

{{- define "tuneloop.apiServiceName" -}}
{{- printf "%s-api" (include "tuneloop.fullname" .) }}
{{- end }}

{{/* KubeRay names a RayService's head Service <rayservice>-head-svc. */}}
{{- define "tuneloop.headServiceName" -}}
{{- printf "%s-head-svc" (include "tuneloop.fullname" .) }}
{{- end }}

{{- define "tuneloop.databaseName" -}}
{{- printf "%s-postgresql" (include "tuneloop.fullname" .) }}
{{- end }}

{{- define "tuneloop.apiTokensSecretName" -}}
{{- $generated := printf "%s-api-tokens" (include "tuneloop.fullname" .) }}
{{- .Values.apiTokens.existingSecret | default $generated }}
{{- end }}

{{- define "tuneloop.claimName" -}}
{{- $created := printf "%s-shared" (include "tuneloop.fullname" .) }}
{{- .Values.persistence.existingClaim | default $created }}
{{- end }}

{{/*
A value kept across upgrades: the existing Secret's key when the release already has one, else a
fresh value, by default 32 random letters and digits. Offline rendering (helm template) always
gets a fresh one.
Arguments: list of the root context, the Secret's name, the key and, optionally, the fresh value.
*/}}
{{- define "tuneloop.keptRandom" -}}
{{- $root := index . 0 }}
{{- $existing := lookup "v1" "Secret" $root.Release.Namespace (index . 1) }}
{{- if and $existing (hasKey (default dict $existing.data) (index . 2)) }}
{{- index $existing.data (index . 2) | b64dec }}
{{- else if gt (len .) 3 }}
{{- index . 3 }}
{{- else }}
{{- randAlphaNum 32 }}
{{- end }}
{{- end }}

{{/*
Refuse values that cannot work together. Included once, by rayservice.yaml, so every install and
every `helm template` runs it; each message names the values to change.
*/}}
{{- define "tuneloop.validateValues" -}}
{{- $db := .Values.database }}
{{- if and $db.bundled.enabled $db.external.enabled }}
{{- fail (print "database.bundled.enabled and database.external.enabled are both true; "
  "set exactly one of them") }}
{{- end }}
{{- if not (or $db.bundled.enabled $db.external.enabled) }}
{{- fail (print "no database: set database.bundled.enabled=true, or "
  "database.external.enabled=true with database.external.existingSecret") }}
{{- end }}
{{- if and $db.external.enabled (not $db.external.existingSecret) }}
{{- fail (print "database.external.existingSecret must name a Secret holding the database URL "
  "when database.external.enabled is true") }}
{{- end }}
{{- $s3 := .Values.artifacts.s3 }}
{{- if and $s3.enabled (not $s3.bucket) }}
{{- fail "artifacts.s3.bucket must be set when artifacts.s3.enabled is true" }}
{{- end }}
{{- if not (or $s3.enabled .Values.persistence.enabled) }}
{{- fail (print "artifacts have nowhere to go: set artifacts.s3.enabled=true "
  "(with artifacts.s3.bucket) or persistence.enabled=true") }}
{{- end }}
{{- $p := .Values.persistence }}
{{- if and $p.enabled (not $p.existingClaim) (not (has "ReadWriteMany" $p.accessModes)) }}
{{- $why := "since the head and the workers mount the volume together" }}
{{- $modes := $p.accessModes }}
{{- fail (printf "persistence.accessModes must include ReadWriteMany, %s; got %v" $why $modes) }}
{{- end }}
{{- range $group := list "cpu" "gpu" }}
{{- $w := index $.Values.ray.workers $group }}
{{- if and $w.enabled (gt (int $w.minReplicas) (int $w.maxReplicas)) }}
{{- fail (printf "ray.workers.%s.minReplicas (%v) is greater than ray.workers.%s.maxReplicas (%v)"
  $group $w.minReplicas $group $w.maxReplicas) }}
{{- end }}
{{- end }}
{{- if eq .Values.apiTokens.adminKey .Values.apiTokens.metricsKey }}
{{- fail (printf "apiTokens.adminKey and apiTokens.metricsKey are both %q; the two tokens need a key each"
  .Values.apiTokens.adminKey) }}
{{- end }}
{{- if and .Values.ingress.enabled (not .Values.ingress.hosts) }}
{{- fail "ingress.hosts must list at least one host when ingress.enabled is true" }}
{{- end }}
{{- end }}

{{/* TUNELOOP_ARTIFACT_ROOT: the bucket, or a folder of the shared volume. */}}
{{- define "tuneloop.artifactRoot" -}}
{{- $s3 := .Values.artifacts.s3 }}
{{- if $s3.enabled }}
{{- printf "s3://%s/%s" $s3.bucket ($s3.prefix | trimAll "/") | trimSuffix "/" }}
{{- else }}
{{- printf "%s/artifacts" .Values.persistence.mountPath }}
{{- end }}
{{- end }}

{{/* Environment of every Ray container: tuneloop's settings and the secrets they need. */}}
{{- define "tuneloop.env" -}}
- name: TUNELOOP_DATABASE_URL
  valueFrom:
    secretKeyRef:
      {{- if .Values.database.external.enabled }}
      name: {{ .Values.database.external.existingSecret }}
      key: {{ .Values.database.external.urlKey }}
      {{- else }}
      name: {{ include "tuneloop.databaseName" . }}
      key: url
      {{- end }}
- name: TUNELOOP_ARTIFACT_ROOT
  value: {{ include "tuneloop.artifactRoot" . | quote }}
{{- /* Every Ray pod: the API's replicas may run on any of them and read these at start. */}}
- name: TUNELOOP_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "tuneloop.apiTokensSecretName" . }}
      key: {{ .Values.apiTokens.adminKey }}
- name: TUNELOOP_METRICS_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "tuneloop.apiTokensSecretName" . }}
      key: {{ .Values.apiTokens.metricsKey }}
- name: TUNELOOP_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
{{- if .Values.persistence.enabled }}
- name: TUNELOOP_HOME
  value: {{ .Values.persistence.mountPath | quote }}
- name: TUNELOOP_DATA_ROOT
  value: {{ printf "%s/data" .Values.persistence.mountPath | quote }}
{{- end }}
{{- $s3 := .Values.artifacts.s3 }}
{{- if $s3.enabled }}
{{- with $s3.endpointUrl }}
- name: TUNELOOP_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with $s3.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- with $s3.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $s3.secretAccessKeyKey }}
{{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Volumes of every Ray pod. Argument: dict with "root" and "shmSize". */}}
{{- define "tuneloop.volumes" -}}
{{- $root := .root -}}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize }}
{{- if $root.Values.persistence.enabled }}
- name: shared
  persistentVolumeClaim:
    claimName: {{ include "tuneloop.claimName" $root }}
{{- end }}
{{- end }}

{{- define "tuneloop.volumeMounts" -}}
- name: shm
  mountPath: /dev/shm
{{- if .Values.persistence.enabled }}
- name: shared
  mountPath: {{ .Values.persistence.mountPath }}
{{- end }}
{{- end }}

{{/*
The Ray container's ports. KubeRay copies the head's into its head Service and takes the port
named "serve" for the API Service; the PodMonitors select "serve" and "metrics" by name.
*/}}
{{- define "tuneloop.headPorts" -}}
- name: gcs-server
  containerPort: 6379
- name: dashboard
  containerPort: 8265
- name: client
  containerPort: 10001
- name: serve
  containerPort: 8000
- name: metrics
  containerPort: 8080
{{- end }}

{{- define "tuneloop.workerPorts" -}}
- name: serve
  containerPort: 8000
- name: metrics
  containerPort: 8080
{{- end }}

{{/*
One worker group. Arguments: dict with "root", "name" (cpu or gpu) and "group" (its values).
*/}}
{{- define "tuneloop.workerGroup" -}}
{{- $root := .root }}
{{- $w := .group }}
{{- $gpu := eq .name "gpu" -}}
- groupName: {{ .name }}
  replicas: {{ $w.replicas }}
  minReplicas: {{ $w.minReplicas }}
  maxReplicas: {{ $w.maxReplicas }}
  rayStartParams:
    {{- $params := merge (dict "metrics-export-port" "8080") $w.rayStartParams }}
    {{- range $key, $value := $params }}
    {{ $key }}: {{ $value | toString | quote }}
    {{- end }}
  template:
    metadata:
      labels:
        {{- include "tuneloop.raySelectorLabels" $root | nindent 8 }}
      {{- with $root.Values.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      containers:
        - name: ray-worker
          image: {{ include (ternary "tuneloop.gpuImage" "tuneloop.image" $gpu) $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          ports:
            {{- include "tuneloop.workerPorts" $root | nindent 12 }}
          env:
            {{- include "tuneloop.env" $root | nindent 12 }}
          resources:
            {{- if $gpu }}
            {{- $gpus := dict "nvidia.com/gpu" ($w.gpusPerWorker | toString) }}
            {{- $limits := merge $gpus (default dict $w.resources.limits) }}
            {{- toYaml (merge (dict "limits" $limits) $w.resources) | nindent 12 }}
            {{- else }}
            {{- toYaml $w.resources | nindent 12 }}
            {{- end }}
          volumeMounts:
            {{- include "tuneloop.volumeMounts" $root | nindent 12 }}
      volumes:
        {{- include "tuneloop.volumes" (dict "root" $root "shmSize" $w.shmSize) | nindent 8 }}
      {{- with $w.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $w.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $w.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}

{{/*
The Serve config KubeRay deploys: one application, tuneloop, at the root. Its name is fixed
because the dashboards filter Ray Serve's metrics on application="tuneloop".
*/}}
{{- define "tuneloop.serveConfig" -}}
{{- $app := dict "name" "tuneloop" "route_prefix" "/" "import_path" "server.app:build_app" }}
{{- with .Values.serve.args }}
{{- $_ := set $app "args" . }}
{{- end }}
{{- with .Values.serve.deployments }}
{{- $_ := set $app "deployments" . }}
{{- end }}
{{- toYaml (dict "http_options" (dict "host" "0.0.0.0" "port" 8000) "applications" (list $app)) }}
{{- end }}
