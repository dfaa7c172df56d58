{{- define "newapi.fullname" -}}
{{- printf "%s-newapi" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "newapi.selectorLabels" -}}
app.kubernetes.io/name: newapi
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "newapi.labels" -}}
{{ include "newapi.selectorLabels" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

