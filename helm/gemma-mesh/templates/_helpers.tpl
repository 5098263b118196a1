{{/* Names ---------------------------------------------------------------------------------------- */}}
{{- define "gemma-mesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gemma-mesh.fullname" -}}
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

{{- define "gemma-mesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gemma-mesh.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels: (list $ "decoder") ---------------------------------------------------------------- */}}
{{- define "gemma-mesh.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "gemma-mesh.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "gemma-mesh.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ printf "%s-%s" $root.Chart.Name $root.Chart.Version | replace "+" "_" }}
{{ include "gemma-mesh.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: gemma-mesh
{{- end }}

{{/* The gRPC backends and every component. */}}
{{- define "gemma-mesh.backends" -}}decoder audio vision{{- end }}
{{- define "gemma-mesh.components" -}}decoder audio vision gateway{{- end }}

{{/* Whether (list $ component) runs on GPUs. */}}
{{- define "gemma-mesh.usesGpu" -}}
{{- $root := index . 0 -}}
{{- $c := index . 1 -}}
{{- if and $root.Values.gpu.enabled (ne $c "gateway") (gt (int (index $root.Values $c).gpus) 0) }}true{{ end }}
{{- end }}

{{/* Image of (list $ target): <registry>/<repository>/<target>:<tag>, or <component>.image. */}}
{{- define "gemma-mesh.image" -}}
{{- $root := index . 0 -}}
{{- $target := index . 1 -}}
{{- $component := trimSuffix "-cuda" $target -}}
{{- $override := "" -}}
{{- if hasKey $root.Values $component }}{{ $override = (index $root.Values $component).image }}{{ end -}}
{{- if $override }}
{{- $override }}
{{- else }}
{{- $repo := $root.Values.image.repository }}
{{- if $root.Values.image.registry }}{{ $repo = printf "%s/%s" (trimSuffix "/" $root.Values.image.registry) $repo }}{{ end }}
{{- printf "%s/%s:%s" $repo $target (default $root.Chart.AppVersion $root.Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Target of (list $ component): <component>-cuda on GPUs. */}}
{{- define "gemma-mesh.target" -}}
{{- $c := index . 1 -}}
{{- if include "gemma-mesh.usesGpu" . }}{{ printf "%s-cuda" $c }}{{ else }}{{ $c }}{{ end }}
{{- end }}

{{/* Environment prefix of a component: GEMMA_MESH_DECODER_ ... */}}
{{- define "gemma-mesh.envPrefix" -}}
{{- printf "GEMMA_MESH_%s_" (upper .) }}
{{- end }}

{{/* A settings value as an environment string: lists and maps as JSON (pydantic-settings parses
     complex values as JSON); whole numbers without an exponent (values files reach templates as
     float64, and 2147483648 would print as 2.147483648e+09); everything else as text. */}}
{{- define "gemma-mesh.envValue" -}}
{{- if or (kindIs "slice" .) (kindIs "map" .) }}{{ toJson . }}
{{- else if and (kindIs "float64" .) (eq (float64 (int64 .)) .) }}{{ int64 . }}
{{- else }}{{ . }}{{ end }}
{{- end }}

{{/* gRPC target of (list $ backend) for the gateway: DNS over the headless Service, so the client
     sees every ready pod and balances round_robin over them. */}}
{{- define "gemma-mesh.grpcTarget" -}}
{{- $root := index . 0 -}}
{{- $c := index . 1 -}}
{{- printf "dns:///%s-%s-headless.%s.svc.%s:%d" (include "gemma-mesh.fullname" $root) $c $root.Release.Namespace $root.Values.clusterDomain (int (index $root.Values $c).port) }}
{{- end }}

{{- define "gemma-mesh.authSecretName" -}}
{{- default (printf "%s-gateway-auth" (include "gemma-mesh.fullname" .)) .Values.gateway.auth.existingSecret }}
{{- end }}

{{- define "gemma-mesh.bundleClaimName" -}}
{{- default (printf "%s-bundle" (include "gemma-mesh.fullname" .)) .Values.bundle.persistence.existingClaim }}
{{- end }}

{{/* The /tmp emptyDir (read-only root filesystems write nowhere else). */}}
{{- define "gemma-mesh.tmpVolume" -}}
- name: tmp
  emptyDir:
    medium: Memory
    sizeLimit: {{ . }}
{{- end }}
