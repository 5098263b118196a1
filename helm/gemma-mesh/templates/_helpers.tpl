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

{{/* GEMMA_MESH_<COMPONENT>_* variables of (list $ component), one "KEY: value" line each, sorted:
     the ConfigMap's data and the pod's checksum/config (a component rolls only when its own
     environment changes). Chart-owned keys first, then <component>.settings (upper-cased keys;
     lists and maps as JSON). */}}
{{- define "gemma-mesh.configData" -}}
{{- $root := index . 0 -}}
{{- $c := index . 1 -}}
{{- $v := index $root.Values $c -}}
{{- $env := dict "HOST" "0.0.0.0" "PORT" (toString $v.port) -}}
{{- if ne $c "gateway" -}}
{{- $_ := set $env "METRICS_PORT" (toString $v.metricsPort) -}}
{{- if include "gemma-mesh.usesGpu" (list $root $c) -}}
{{- $_ := set $env "PROVIDERS" (toJson (list "CUDAExecutionProvider" "CPUExecutionProvider")) -}}
{{- else -}}
{{- $_ := set $env "PROVIDERS" (toJson (list "CPUExecutionProvider")) -}}
{{- end -}}
{{- if $root.Values.bundle.enabled -}}
{{- $_ := set $env "BUNDLE" (printf "/bundle/%s" $root.Values.bundle.subPath | trimSuffix "/") -}}
{{- end -}}
{{- $_ := set $env "SHUTDOWN_GRACE_S" (include "gemma-mesh.drainSeconds" (list $root $c)) -}}
{{- else -}}
{{- $_ := set $env "METRICS_PORT" (toString $v.metricsPort) -}}
{{- $_ := set $env "DRAIN_GRACE_S" (include "gemma-mesh.drainSeconds" (list $root $c)) -}}
{{- range $b := splitList " " (include "gemma-mesh.backends" $root) -}}
{{- $_ := set $env (printf "%s_TARGET" (upper $b)) (include "gemma-mesh.grpcTarget" (list $root $b)) -}}
{{- end -}}
{{- if and $root.Values.redis.enabled (not (include "gemma-mesh.redisAuth" $root)) -}}
{{- $_ := set $env "REDIS_URL" (include "gemma-mesh.redisUrl" (list $root "")) -}}
{{- end -}}
{{- end -}}
{{- range $k, $val := $v.settings -}}
{{- $_ := set $env (upper $k) (include "gemma-mesh.envValue" $val) -}}
{{- end -}}
{{- range $k, $val := $env }}
{{ printf "%s%s" (include "gemma-mesh.envPrefix" $c) $k }}: {{ $val | quote }}
{{- end -}}
{{- end }}

{{/* Seconds (list $ component) gets to drain after SIGTERM: terminationGracePeriodSeconds less
     the preStop sleep and DRAIN_MARGIN_S for the process to exit (the gateway also spends up to
     3 s on HTTP requests after its sessions: gateway/server.py DRAIN_HTTP_MARGIN_S). */}}
{{- define "gemma-mesh.drainSeconds" -}}
{{- $root := index . 0 -}}
{{- $c := index . 1 -}}
{{- $v := index $root.Values $c -}}
{{- $margin := ternary 5 2 (eq $c "gateway") -}}
{{- $s := sub (sub (int $v.terminationGracePeriodSeconds) (int $v.preStopSleepSeconds)) $margin -}}
{{- if le (int $s) 0 -}}
{{- fail (printf "%s.terminationGracePeriodSeconds (%v) must exceed preStopSleepSeconds (%v) + %d s" $c $v.terminationGracePeriodSeconds $v.preStopSleepSeconds $margin) -}}
{{- end -}}
{{- $s -}}
{{- end }}

{{/* preStop of (list $ component): keep serving while Service endpoints and the gateway's DNS
     forget the pod, then SIGTERM starts the drain. An exec sleep (the images have coreutils'
     sleep; the sleep action needs Kubernetes 1.30). */}}
{{- define "gemma-mesh.preStop" -}}
{{- $v := index (index . 0).Values (index . 1) -}}
{{- if gt (int $v.preStopSleepSeconds) 0 }}
lifecycle:
  preStop:
    exec:
      command: ["sleep", "{{ int $v.preStopSleepSeconds }}"]
{{- end }}
{{- end }}

{{/* GPU resource name of (list $ component): <component>.gpuResourceName (a MIG slice such as
     nvidia.com/mig-1g.10gb for the encoders) or gpu.resourceName. */}}
{{- define "gemma-mesh.gpuResourceName" -}}
{{- $root := index . 0 -}}
{{- default $root.Values.gpu.resourceName (index $root.Values (index . 1)).gpuResourceName -}}
{{- end }}

{{/* progressDeadlineSeconds for a startup probe's values: its whole budget plus 10 minutes (image
     pull, scheduling on a scaled-up GPU node), at least Kubernetes' default of 600. */}}
{{- define "gemma-mesh.progressDeadline" -}}
{{- $budget := add (int (default 0 .initialDelaySeconds)) (mul (int (default 10 .periodSeconds)) (int (default 3 .failureThreshold))) -}}
{{- max 600 (add $budget 600) -}}
{{- end }}

{{/* Whether the bundled Redis requires a password (redis.auth.existingSecret or password set). */}}
{{- define "gemma-mesh.redisAuth" -}}
{{- $a := .Values.redis.auth -}}
{{- if or $a.existingSecret $a.password }}true{{ end -}}
{{- end }}

{{- define "gemma-mesh.redisSecretName" -}}
{{- default (printf "%s-redis-auth" (include "gemma-mesh.fullname" .)) .Values.redis.auth.existingSecret }}
{{- end }}

{{- define "gemma-mesh.redisSecretKey" -}}
{{- ternary .Values.redis.auth.existingSecretKey "redis-password" (not (empty .Values.redis.auth.existingSecret)) }}
{{- end }}

{{/* URL of the bundled Redis for (list $ userinfo): userinfo ":$(REDIS_PASSWORD)@" when it needs a
     password (the kubelet expands $(REDIS_PASSWORD) from the env variable defined before it). */}}
{{- define "gemma-mesh.redisUrl" -}}
{{- $root := index . 0 -}}
{{- printf "redis://%s%s-redis.%s.svc.%s:6379/0" (index . 1) (include "gemma-mesh.fullname" $root) $root.Release.Namespace $root.Values.clusterDomain }}
{{- end }}
