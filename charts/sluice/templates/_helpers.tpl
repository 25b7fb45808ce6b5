{{/* The base name of the release's objects. */}}
{{- define "sluice.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The operator's name: Deployment, ServiceAccount, Service, roles. */}}
{{- define "sluice.operator" -}}
{{- printf "%s-operator" (include "sluice.fullname" .) -}}
{{- end -}}

{{/* Labels every object of the chart carries. */}}
{{- define "sluice.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: sluice
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{ include "sluice.selectorLabels" . }}
{{- end -}}

{{/* Labels that pick the operator's pods. */}}
{{- define "sluice.selectorLabels" -}}
app.kubernetes.io/name: sluice-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* An image reference from {repository, tag}; the tag defaults to the appVersion. */}}
{{- define "sluice.image" -}}
{{- $tag := .image.tag | default .root.Chart.AppVersion -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}

{{/* The Secret holding the external metrics API's certificate. */}}
{{- define "sluice.tlsSecret" -}}
{{- if eq .Values.externalMetrics.certificate.source "secret" -}}
{{- required "externalMetrics.certificate.secretName is required with source: secret" .Values.externalMetrics.certificate.secretName -}}
{{- else -}}
{{- printf "%s-tls" (include "sluice.operator" .) -}}
{{- end -}}
{{- end -}}

{{/* Whether the operator serves a certificate mounted from a Secret (every source but
insecure and operator, where it makes its own). */}}
{{- define "sluice.tlsFromSecret" -}}
{{- if and .Values.externalMetrics.enabled (not (has .Values.externalMetrics.certificate.source (list "insecure" "operator"))) -}}
true
{{- end -}}
{{- end -}}

{{/* Pod and container security: Pod Security "restricted". */}}
{{- define "sluice.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "sluice.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
