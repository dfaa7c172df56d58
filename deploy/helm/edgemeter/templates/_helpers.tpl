{{- /*
Helpers shared by the chart's own templates and by a gateway chart that embeds the meter.
Each takes a dict: "values" (this chart's values: .Values standalone, the gateway's
.Values.meteringSidecar as a dependency) and "top" (the root context, for the release).
*/ -}}

{{- define "edgemeter.fullname" -}}
{{- $v := .values -}}
{{- if $v.fullnameOverride -}}
{{- $v.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains "edgemeter" .top.Release.Name -}}
{{- .top.Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-edgemeter" .top.Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "edgemeter.selectorLabels" -}}
app.kubernetes.io/name: {{ .values.nameOverride | default "edgemeter" }}
app.kubernetes.io/instance: {{ .top.Release.Name }}
{{- end -}}

{{- define "edgemeter.labels" -}}
{{ include "edgemeter.selectorLabels" . }}
app.kubernetes.io/version: {{ .values.image.tag | toString | quote }}
app.kubernetes.io/managed-by: {{ .top.Release.Service }}
app.kubernetes.io/component: usage-meter
helm.sh/chart: {{ printf "%s-%s" .top.Chart.Name .top.Chart.Version | replace "+" "_" | trunc 63 }}
{{- end -}}

{{- define "edgemeter.image" -}}
{{- $img := .values.image -}}
{{- printf "%s:%s" $img.repository ($img.tag | toString) -}}
{{- end -}}

{{- /* A Go duration of whole hours, minutes, seconds or milliseconds, in milliseconds. */ -}}
{{- define "edgemeter.durationMs" -}}
{{- $d := toString . | trim -}}
{{- if regexMatch "^[0-9]+ms$" $d -}}{{ trimSuffix "ms" $d }}
{{- else if regexMatch "^[0-9]+s$" $d -}}{{ mul (trimSuffix "s" $d | atoi) 1000 }}
{{- else if regexMatch "^[0-9]+m$" $d -}}{{ mul (trimSuffix "m" $d | atoi) 60000 }}
{{- else if regexMatch "^[0-9]+$" $d -}}{{ $d }}
{{- else -}}{{ fail (printf "natsPublishTimeout %q: give whole milliseconds (1500ms), seconds (5s) or minutes (1m)" $d) }}
{{- end -}}
{{- end -}}

{{- define "edgemeter.terminationGracePeriodSeconds" -}}
{{- $s := .values.shutdown -}}
{{- add (div (add $s.graceMs $s.drainMs 999) 1000) $s.marginSeconds -}}
{{- end -}}

{{- /* The volume at spoolDir: an emptyDir with a size limit, or a claim. */ -}}
{{- define "edgemeter.dataVolume" -}}
{{- $p := .values.persistence -}}
- name: edgemeter-data
{{- if eq $p.type "emptyDir" }}
  emptyDir:
    sizeLimit: {{ $p.sizeLimit }}
{{- else if eq $p.type "pvc" }}
{{- if not $p.existingClaim }}
{{- fail "persistence.type=pvc needs persistence.existingClaim here (standalone, the chart makes one claim per replica)" }}
{{- end }}
  persistentVolumeClaim:
    claimName: {{ $p.existingClaim }}
{{- else }}
{{- fail (printf "persistence.type %q: emptyDir or pvc" $p.type) }}
{{- end }}
{{- end -}}
