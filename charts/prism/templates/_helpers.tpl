{{/* Name of the release's objects: the release name, or "<release>-prism" when it lacks "prism". */}}
{{- define "prism.fullname" -}}
{{- if contains "prism" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-prism" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "prism.serviceAccountName" -}}
{{- default (include "prism.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "prism.selectorLabels" -}}
app.kubernetes.io/name: prism-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "prism.labels" -}}
{{ include "prism.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: prism
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}
