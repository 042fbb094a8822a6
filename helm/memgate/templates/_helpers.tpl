{{/*
Names, labels, the image, the rendered memgate config, and the checks that
refuse values which would deploy something broken. Every template includes
"memgate.validate" through "memgate.labels", so a refused value fails any
render.
*/}}

{{- define "memgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* "<release>-memgate", or the release name alone when it already says memgate. */}}
{{- define "memgate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "memgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "memgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "memgate.labels" -}}
{{- include "memgate.validate" . -}}
{{ include "memgate.selectorLabels" . }}
{{ include "memgate.commonLabels" . }}
{{- end -}}

{{- define "memgate.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/*
The `helm test` Pod's labels: not the selector labels, or the Service would
send it traffic and the PodDisruptionBudget would count it.
*/}}
{{- define "memgate.testLabels" -}}
app.kubernetes.io/name: {{ include "memgate.name" . }}-test
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: test
{{- end -}}

{{- define "memgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "memgate.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository:tag, or repository@digest when a digest pins it. */}}
{{- define "memgate.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Where the ConfigMap is mounted; the container's --config argument. */}}
{{- define "memgate.configDir" -}}/etc/memgate{{- end -}}
{{- define "memgate.configPath" -}}{{ include "memgate.configDir" . }}/memgate.toml{{- end -}}

{{/*
Where the Secrets are mounted, each as a whole directory (never subPath, which
would freeze the files at pod start): the kubelet swaps the files in place when
a Secret changes, and memgate re-reads them ([tls] and [auth] reload_interval).
The file names are fixed; the Secret volumes' items map the configured keys to them.
*/}}
{{- define "memgate.tlsDir" -}}{{ include "memgate.configDir" . }}/tls{{- end -}}
{{- define "memgate.clientCADir" -}}{{ include "memgate.configDir" . }}/client-ca{{- end -}}
{{- define "memgate.authDir" -}}{{ include "memgate.configDir" . }}/auth{{- end -}}

{{/*
The Secret whose tokens file the pod mounts: auth.existingSecret, or the one the
chart generates (templates/auth-secrets.yaml) when that is empty. The generated
client token lives apart, in memgate.clientTokenSecretName, so that access to it
can be granted without access to anything the server mounts.
*/}}
{{- define "memgate.generatesToken" -}}
{{- if and .Values.auth.enabled (not .Values.auth.existingSecret) -}}true{{- end -}}
{{- end -}}
{{- define "memgate.tokensSecretName" -}}
{{- default (printf "%s-tokens" (include "memgate.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}
{{- define "memgate.clientTokenSecretName" -}}
{{- printf "%s-client-token" (include "memgate.fullname" .) -}}
{{- end -}}

{{/*
The port the kubelet's gRPC probes and the `helm test` Pod dial. With TLS on
the gRPC port only speaks TLS, which the kubelet's native gRPC probe cannot, so
they ask the same health services over plaintext h2c on the admin port.
*/}}
{{- define "memgate.healthPort" -}}
{{- if .Values.tls.enabled -}}{{ .Values.ports.admin }}{{- else -}}{{ .Values.ports.grpc }}{{- end -}}
{{- end -}}

{{/*
memgate.toml: values.config merged under the keys the chart owns (listen
addresses from ports, data_dir and the S3 location from storage, shutdown
timings in seconds, the mounted TLS and tokens files from tls and auth).
[auth] enabled is always written, so the file says whether calls need
credentials; [tls] only when TLS is on (or values.config tunes it). Values
arrive as float64, so integer keys are converted back to integers; sizes and
durations are strings, as memgate expects.
*/}}
{{- define "memgate.configToml" -}}
{{- $cfg := deepCopy (default (dict) .Values.config) -}}
{{- with $cfg.memory -}}
{{- if hasKey . "queue_max" }}{{ $_ := set . "queue_max" (int .queue_max) }}{{ end -}}
{{- end -}}
{{- $storage := dict "backend" .Values.storage.backend "data_dir" .Values.storage.dataDir -}}
{{- if eq .Values.storage.backend "s3" -}}
{{- $s3 := .Values.storage.s3 -}}
{{- $_ := set $storage "s3" (dict
      "endpoint" $s3.endpoint
      "region" $s3.region
      "bucket" $s3.bucket
      "prefix" $s3.prefix
      "path_style" $s3.pathStyle
      "part_size" $s3.partSize
      "parts_in_flight" (int $s3.partsInFlight)) -}}
{{- end -}}
{{- with $cfg.storage -}}{{- with .s3 -}}
{{- if hasKey . "max_retries" }}{{ $_ := set . "max_retries" (int .max_retries) }}{{ end -}}
{{- end -}}{{- end -}}
{{- $owned := dict
      "server" (dict "grpc_addr" (printf "0.0.0.0:%d" (int .Values.ports.grpc)))
      "admin" (dict "addr" (printf "0.0.0.0:%d" (int .Values.ports.admin)))
      "storage" $storage
      "shutdown" (dict
        "drain_delay" (printf "%ds" (int .Values.shutdown.drainDelaySeconds))
        "grace" (printf "%ds" (int .Values.shutdown.graceSeconds))) -}}
{{- if .Values.tls.enabled -}}
{{- $tls := dict
      "cert_file" (printf "%s/tls.crt" (include "memgate.tlsDir" .))
      "key_file" (printf "%s/tls.key" (include "memgate.tlsDir" .)) -}}
{{- if .Values.tls.clientCA.existingSecret -}}
{{- $_ := set $tls "client_ca_file" (printf "%s/ca.crt" (include "memgate.clientCADir" .)) -}}
{{- end -}}
{{- $_ := set $owned "tls" $tls -}}
{{- end -}}
{{- if .Values.auth.enabled -}}
{{- $_ := set $owned "auth" (dict "enabled" true "tokens_file" (printf "%s/tokens.toml" (include "memgate.authDir" .))) -}}
{{- else -}}
{{- $_ := set $owned "auth" (dict "enabled" false) -}}
{{- end -}}
{{- toToml (mergeOverwrite $cfg $owned) -}}
{{- end -}}

{{/*
Refuses values that would render something that cannot work, with a message
that names the value to change.
*/}}
{{- define "memgate.validate" -}}
{{- $v := .Values -}}
{{- if eq $v.storage.backend "local" -}}
{{- if gt (int $v.replicaCount) 1 -}}
{{- fail (printf "replicaCount is %d, but storage.backend \"local\" keeps blobs on one pod's disk, so it runs exactly one replica: set storage.backend to \"s3\" to run more" (int $v.replicaCount)) -}}
{{- end -}}
{{- if $v.autoscaling.enabled -}}
{{- fail "autoscaling.enabled needs more than one replica, but storage.backend \"local\" keeps blobs on one pod's disk: set storage.backend to \"s3\" or disable autoscaling" -}}
{{- end -}}
{{- else -}}
{{- if not $v.storage.s3.bucket -}}
{{- fail "storage.backend is \"s3\": set storage.s3.bucket" -}}
{{- end -}}
{{- if not $v.storage.s3.existingSecret -}}
{{- fail "storage.backend is \"s3\": set storage.s3.existingSecret to a Secret holding the credentials (keys storage.s3.accessKeyIdKey and storage.s3.secretAccessKeyKey); the chart never puts credentials in values or the ConfigMap" -}}
{{- end -}}
{{- if $v.persistence.enabled -}}
{{- fail "persistence.enabled is for storage.backend \"local\"; with \"s3\" the blobs live in the bucket and the pods need no volume claim" -}}
{{- end -}}
{{- end -}}
{{- $drain := int $v.shutdown.drainDelaySeconds -}}
{{- $grace := int $v.shutdown.graceSeconds -}}
{{- if le (int $v.terminationGracePeriodSeconds) (add $drain $grace) -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed shutdown.drainDelaySeconds + shutdown.graceSeconds (%d + %d), or the kubelet kills memgate before its drain ends: set it to at least %d" (int $v.terminationGracePeriodSeconds) $drain $grace (add $drain $grace 1)) -}}
{{- end -}}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) -}}
{{- fail (printf "autoscaling.minReplicas (%d) is above autoscaling.maxReplicas (%d)" (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) -}}
{{- end -}}
{{- if and $v.autoscaling.enabled (not $v.autoscaling.targetCPUUtilizationPercentage) (not $v.autoscaling.targetMemoryUtilizationPercentage) -}}
{{- fail "autoscaling.enabled: set autoscaling.targetCPUUtilizationPercentage or autoscaling.targetMemoryUtilizationPercentage" -}}
{{- end -}}
{{- if and $v.podDisruptionBudget.enabled (kindIs "invalid" $v.podDisruptionBudget.minAvailable) (kindIs "invalid" $v.podDisruptionBudget.maxUnavailable) -}}
{{- fail "podDisruptionBudget.enabled: set podDisruptionBudget.minAvailable or podDisruptionBudget.maxUnavailable" -}}
{{- end -}}
{{- if and $v.tls.enabled (not $v.tls.existingSecret) -}}
{{- fail "tls.enabled: set tls.existingSecret to a kubernetes.io/tls Secret holding tls.crt and tls.key (e.g. the spec.secretName of a cert-manager Certificate); the chart never takes keys or certificates in values" -}}
{{- end -}}
{{- if and $v.tls.clientCA.existingSecret (not $v.tls.enabled) -}}
{{- fail "tls.clientCA.existingSecret is set but tls.enabled is false: client certificates (mTLS) are only asked for over TLS, so set tls.enabled and tls.existingSecret too, or clear tls.clientCA.existingSecret" -}}
{{- end -}}
{{- end -}}

{{/*
A probe: the override when one is given, else a native gRPC probe of the
named health service with the tunable timings.
*/}}
{{- define "memgate.probe" -}}
{{- $p := .probe -}}
{{- if $p.override -}}
{{- toYaml $p.override -}}
{{- else -}}
grpc:
  port: {{ .port }}
  service: {{ .service | quote }}
initialDelaySeconds: {{ $p.initialDelaySeconds }}
periodSeconds: {{ $p.periodSeconds }}
timeoutSeconds: {{ $p.timeoutSeconds }}
failureThreshold: {{ $p.failureThreshold }}
{{- if hasKey $p "successThreshold" }}
successThreshold: {{ $p.successThreshold }}
{{- end }}
{{- end -}}
{{- end -}}

{{/* The hardened container security context, shared by memgate and the test Pod. */}}
{{- define "memgate.containerSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
runAsNonRoot: true
{{- with .Values.securityContext.runAsUser }}
runAsUser: {{ . }}
{{- end }}
{{- with .Values.securityContext.runAsGroup }}
runAsGroup: {{ . }}
{{- end }}
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "memgate.podSecurityContext" -}}
runAsNonRoot: true
{{- with .Values.securityContext.runAsUser }}
runAsUser: {{ . }}
{{- end }}
{{- with .Values.securityContext.runAsGroup }}
runAsGroup: {{ . }}
{{- end }}
{{- with .Values.securityContext.fsGroup }}
fsGroup: {{ . }}
fsGroupChangePolicy: OnRootMismatch
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}
