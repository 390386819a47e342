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
     with or without the port, localhost (probes, kubectl port-forward) and mlflow.allowedHosts */}}
{{- define "clipgs.mlflowAllowedHosts" -}}
{{- $svc := printf "%s-mlflow" (include "clipgs.fullname" .) -}}
{{- $hosts := list $svc (printf "%s.%s" $svc .Release.Namespace) (printf "%s.%s.svc" $svc .Release.Namespace) (printf "%s.%s.svc.cluster.local" $svc .Release.Namespace) "localhost" "127.0.0.1" -}}
{{- $all := list -}}
{{- range $hosts }}{{ $all = append (append $all .) (printf "%s:*" .) }}{{ end -}}
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
