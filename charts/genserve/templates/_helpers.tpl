{{/* Chart name, overridable. */}}
{{- define "genserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart>, or the release name when it already contains the chart name. */}}
{{- define "genserve.fullname" -}}
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

{{- define "genserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "genserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "genserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "genserve.labels" -}}
helm.sh/chart: {{ include "genserve.chart" . }}
{{ include "genserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: genserve
{{- end }}

{{- define "genserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "genserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "genserve.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Least privilege: exactly the calls the operator makes (tests/operator/operator_api_calls.py, recorded
from the real operator and compared with these rules by tests/operator/test_operator_rbac.py). Children
are server-side applied (patch; create when the apply creates one), read by name and deleted when no
longer wanted; kopf lists and watches the kinds it follows. No update: nothing is PUT.
Shared by the ClusterRole (all namespaces) and the per-namespace Roles. */}}
{{- define "genserve.rbacRules" -}}
- apiGroups: ["genserve.dev"]
  resources: ["textgenerationservices"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["genserve.dev"]
  resources: ["textgenerationservices/status"]
  verbs: ["patch"]
# followed by kopf: a child edited or deleted by hand is restored at once
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["ingresses"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# the Job that fills a shared model cache before the pods start (spec.cache.mode shared)
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "create", "patch", "delete"]
{{- if .Values.rbac.inferenceExtension }}
# spec.routing.inferencePool: the pool over the server pods and the route from a Gateway to it
- apiGroups: ["inference.networking.k8s.io"]
  resources: ["inferencepools"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["gateway.networking.k8s.io"]
  resources: ["httproutes"]
  verbs: ["get", "create", "patch", "delete"]
{{- end }}
- apiGroups: ["monitoring.coreos.com"]
  resources: ["servicemonitors", "podmonitors"]
  verbs: ["get", "create", "patch", "delete"]
# the autoscaler's scrape targets
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
# read-only and by name: to report a missing token, API-key or S3 Secret (pods get them via secretKeyRef)
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if and .Values.operator.peering .Values.watchNamespaces }}
# peering inside each watched namespace (with all namespaces kopf uses the cluster-wide object instead)
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["list", "watch", "patch"]
{{- end }}
{{- end }}

{{/* Cluster-scoped calls kopf makes: CRD discovery (list, watch) in every mode; with watchNamespaces its
namespace observer (list, watch); with peering and all namespaces the cluster-wide peering object. */}}
{{- define "genserve.clusterRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if .Values.watchNamespaces }}
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- else if .Values.operator.peering }}
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["list", "watch", "patch"]
{{- end }}
{{- end }}
