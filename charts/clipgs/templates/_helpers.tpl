{{- define "clipgs.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{- define "clipgs.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* selector labels of one component: (dict "root" $ "component" "serving") */}}
{{- define "clipgs.selector" -}}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* image reference: (dict "root" $ "gpu" true|false); a digest pins it exactly */}}
{{- define "clipgs.image" -}}
{{- $i := .root.Values.image -}}
{{- if or (eq $i.tag "latest") (eq $i.gpuTag "latest") -}}
{{- fail "image.tag / image.gpuTag: pin a version (latest is refused: nodes would run different code)" -}}
{{- end -}}
{{- if $i.digest -}}
{{ $i.repository }}@{{ $i.digest }}
{{- else -}}
{{ $i.repository }}:{{ ternary $i.gpuTag $i.tag .gpu }}
{{- end -}}
{{- end -}}

{{- define "clipgs.mlflowUri" -}}
{{- if .Values.mlflowTrackingUri -}}
{{ .Values.mlflowTrackingUri }}
{{- else if .Values.mlflow.enabled -}}
http://{{ include "clipgs.fullname" . }}-mlflow:{{ .Values.mlflow.port }}
{{- else -}}
{{ fail "set mlflowTrackingUri to your MLflow server, or mlflow.enabled=true for the chart's own" }}
{{- end -}}
{{- end -}}

{{/* Host headers the chart's MLflow server accepts: its Service by every in-cluster DNS name,
     with or without the port, localhost (probes, kubectl port-forward), private IPv4 addresses
     (MLflow's default) and mlflow.allowedHosts */}}
{{- define "clipgs.mlflowAllowedHosts" -}}
{{- $svc := printf "%s-mlflow" (include "clipgs.fullname" .) -}}
{{- $hosts := list $svc (printf "%s.%s" $svc .Release.Namespace) (printf "%s.%s.svc" $svc .Release.Namespace) (printf "%s.%s.svc.cluster.local" $svc .Release.Namespace) "localhost" "127.0.0.1" -}}
{{- $all := list -}}
{{- range $hosts }}{{ $all = append (append $all .) (printf "%s:*" .) }}{{ end -}}
{{- /* and MLflow's own default: private addresses (a ClusterIP, a pod IP) */ -}}
{{- $all = concat $all (list "10.*" "192.168.*") -}}
{{- range $i := until 16 }}{{ $all = append $all (printf "172.%d.*" (add 16 $i)) }}{{ end -}}
{{- join "," (concat $all .Values.mlflow.allowedHosts) -}}
{{- end -}}

{{/* environment every clipgs container gets: MLflow, S3 endpoint; writable HOME on /tmp */}}
{{- define "clipgs.env" -}}
- name: MLFLOW_TRACKING_URI
  value: {{ include "clipgs.mlflowUri" . | quote }}
- name: HOME
  value: /tmp
{{- if .Values.s3.endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ .Values.s3.endpointUrl | quote }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ .Values.s3.endpointUrl | quote }}
{{- end }}
{{- end -}}

{{/* S3 credentials, only ever from the referenced Secret */}}
{{- define "clipgs.s3EnvFrom" -}}
{{- if .Values.s3.credentialsSecret }}
- secretRef:
    name: {{ .Values.s3.credentialsSecret }}
{{- end }}
{{- end -}}

{{- define "clipgs.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* the work pool's base job template: files/kubernetes-work-pool.json with this release's
     defaults (worker-deployment.yaml; its hash restarts the worker when it changes) */}}
{{- define "clipgs.workPoolJson" -}}
{{- $name := include "clipgs.fullname" . -}}
{{- $pool := .Files.Get "files/kubernetes-work-pool.json" | fromJson }}
{{- $vars := $pool.variables.properties }}
{{- $_ := set (index $vars "image") "default" (include "clipgs.image" (dict "root" . "gpu" false)) }}
{{- $_ := set (index $vars "image_pull_policy") "default" .Values.image.pullPolicy }}
{{- $_ := set (index $vars "service_account_name") "default" (printf "%s-worker" $name) }}
{{- $_ := set (index $vars "namespace") "default" .Release.Namespace }}
{{- $env := dict "MLFLOW_TRACKING_URI" (include "clipgs.mlflowUri" .) "CLIPGS_NAMESPACE" .Release.Namespace "PREFECT_SERVER_ANALYTICS_ENABLED" "false" }}
{{- if .Values.s3.endpointUrl }}
{{- $_ := set $env "AWS_ENDPOINT_URL" .Values.s3.endpointUrl }}
{{- $_ := set $env "MLFLOW_S3_ENDPOINT_URL" .Values.s3.endpointUrl }}
{{- end }}
{{- $_ := set (index $vars "env") "default" $env }}
{{- $pod := $pool.job_configuration.job_manifest.spec.template.spec }}
{{- $container := index $pod.containers 0 }}
{{- if .Values.s3.credentialsSecret }}
{{- $_ := set $container "envFrom" (list (dict "secretRef" (dict "name" .Values.s3.credentialsSecret))) }}
{{- end }}
{{- with .Values.imagePullSecrets }}
{{- $_ := set $pod "imagePullSecrets" . }}
{{- end }}
{{- $_ := set $container "volumeMounts" (append $container.volumeMounts (dict "name" "release" "mountPath" "/etc/clipgs/release" "readOnly" true)) }}
{{- $_ := set $pod "volumes" (append $pod.volumes (dict "name" "release" "configMap" (dict "name" (printf "%s-release-values" $name)))) }}
{{- toPrettyJson $pool }}
{{- end -}}
