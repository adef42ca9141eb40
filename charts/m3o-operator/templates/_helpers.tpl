{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "m3o-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects. */}}
{{- define "m3o-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "m3o-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "m3o-operator.labels" -}}
helm.sh/chart: {{ include "m3o-operator.chart" . }}
{{ include "m3o-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: m3o
{{- end }}

{{/* Labels selecting the operator's pods. */}}
{{- define "m3o-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "m3o-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "m3o-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "m3o-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "m3o-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Name of the plan catalog ConfigMap. */}}
{{- define "m3o-operator.plansConfigMap" -}}
{{- printf "%s-plans" (include "m3o-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The Lease the operator elects its leader on (in $POD_NAMESPACE, the release's):
<fullname>-leader unless set, so two releases in one namespace never share one. */}}
{{- define "m3o-operator.leaseName" -}}
{{- .Values.leaderElection.leaseName | default (printf "%s-leader" (include "m3o-operator.fullname" .) | trunc 63 | trimSuffix "-") }}
{{- end }}

{{/* Labels selecting the gateway's pods (m3o-gateway-auth). */}}
{{- define "m3o-operator.gatewaySelectorLabels" -}}
app.kubernetes.io/name: {{ include "m3o-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{/* Labels of the gateway's objects. */}}
{{- define "m3o-operator.gatewayLabels" -}}
helm.sh/chart: {{ include "m3o-operator.chart" . }}
{{ include "m3o-operator.gatewaySelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: m3o
{{- end }}

{{- define "m3o-operator.gatewayName" -}}
{{- printf "%s-gateway" (include "m3o-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The label matchers selecting this release's metrics in PrometheusRule queries. */}}
{{- define "m3o-operator.metricsSelector" -}}
{{- if .Values.metrics.prometheusRule.selector }}
{{- .Values.metrics.prometheusRule.selector }}
{{- else }}
{{- printf "job=%q,namespace=%q" (printf "%s-metrics" (include "m3o-operator.fullname" .)) .Release.Namespace }}
{{- end }}
{{- end }}

{{/*
Flags of the etcd and Redis clients' TLS files (tls.redis, tls.etcd; mounted by
m3o-operator.tlsMounts) and of the etcd user (`auth`: etcdAuth or gateway.etcdAuth).
Usage: include "m3o-operator.connectArgs" (dict "root" . "auth" .Values.etcdAuth)
(`tls`: another set of TLS Secrets, e.g. gateway.tls; default tls.)
*/}}
{{- define "m3o-operator.connectArgs" -}}
{{- $tls := .tls | default .root.Values.tls -}}
{{- if $tls.redis.existingSecret }}
- --redis-ca-file=/etc/m3o-operator/tls/redis/ca.crt
{{- if $tls.redis.clientCertificate }}
- --redis-cert-file=/etc/m3o-operator/tls/redis/tls.crt
- --redis-key-file=/etc/m3o-operator/tls/redis/tls.key
{{- end }}
{{- end }}
{{- if $tls.etcd.existingSecret }}
- --etcd-ca-file=/etc/m3o-operator/tls/etcd/ca.crt
{{- if $tls.etcd.clientCertificate }}
- --etcd-cert-file=/etc/m3o-operator/tls/etcd/tls.crt
- --etcd-key-file=/etc/m3o-operator/tls/etcd/tls.key
{{- end }}
{{- end }}
{{- if .auth.username }}
- {{ printf "--etcd-username=%s" .auth.username | quote }}
- --etcd-password-file=/etc/m3o-operator/etcd-auth/password
{{- end }}
{{- end }}

{{/*
Read-only mounts of the TLS Secrets of `backends` (names under tls) and of the etcd
password (`auth`). Usage: include "m3o-operator.tlsMounts" (dict "root" . "backends"
(list "redis" "etcd") "auth" .Values.etcdAuth)
*/}}
{{- define "m3o-operator.tlsMounts" -}}
{{- $tls := .tls | default .root.Values.tls -}}
{{- range $backend := .backends }}
{{- if (get $tls $backend).existingSecret }}
- name: {{ printf "tls-%s" $backend }}
  mountPath: {{ printf "/etc/m3o-operator/tls/%s" $backend }}
  readOnly: true
{{- end }}
{{- end }}
{{- if .auth.username }}
- name: etcd-auth
  mountPath: /etc/m3o-operator/etcd-auth
  readOnly: true
{{- end }}
{{- end }}

{{/*
The volumes of m3o-operator.tlsMounts (same arguments): certificates, client keys and
the etcd password readable by the pod's group (fsGroup) only.
*/}}
{{- define "m3o-operator.tlsVolumes" -}}
{{- $tls := .tls | default .root.Values.tls -}}
{{- range $backend := .backends }}
{{- with (get $tls $backend).existingSecret }}
- name: {{ printf "tls-%s" $backend }}
  secret:
    secretName: {{ . }}
    defaultMode: 0440
{{- end }}
{{- end }}
{{- if .auth.username }}
- name: etcd-auth
  secret:
    secretName: {{ required "etcdAuth.passwordSecret (or gateway.etcdAuth.passwordSecret) is required with its username" .auth.passwordSecret }}
    defaultMode: 0440
    items:
      - key: {{ .auth.passwordKey | default "password" }}
        path: password
{{- end }}
{{- end }}

{{/* The label matchers selecting this release's gateway metrics in PrometheusRule queries. */}}
{{- define "m3o-operator.gatewayMetricsSelector" -}}
{{- if .Values.metrics.prometheusRule.gatewaySelector }}
{{- .Values.metrics.prometheusRule.gatewaySelector }}
{{- else }}
{{- printf "job=%q,namespace=%q" (include "m3o-operator.gatewayName" .) .Release.Namespace }}
{{- end }}
{{- end }}
