{{/*
Names and labels shared by every object of the chart. The operator's objects are named
"<release>-operator" when the release name contains the chart name ("warren" → "warren-operator"),
"<release>-warren-operator" otherwise, or "<fullnameOverride>-operator".
*/}}

{{- define "warren.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "warren.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The operator's Deployment, ServiceAccount, RBAC and Service. */}}
{{- define "warren.operatorName" -}}
{{- printf "%s-operator" (include "warren.fullname" .) }}
{{- end }}

{{- define "warren.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "warren.selectorLabels" -}}
app.kubernetes.io/name: {{ include "warren.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "warren.labels" -}}
helm.sh/chart: {{ include "warren.chart" . }}
{{ include "warren.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: warren
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "warren.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "warren.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "warren.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "warren.brokerImage" -}}
{{- printf "%s:%s" .Values.brokerImage.repository (default .Chart.AppVersion .Values.brokerImage.tag) }}
{{- end }}
