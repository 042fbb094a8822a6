{{/*
checkov skips for the Deployment, as annotations. Each is emitted only when
the values make the check inapplicable, and says why; tests/deploy runs
checkov over every render and fails on a skip without a reason.
*/}}
{{- define "memgate.checkovSkips" -}}
{{- $local := .local -}}
{{- with .root -}}
{{- if not .Values.image.digest }}
checkov.io/skip1: "CKV_K8S_43=The tag is fixed (the chart's appVersion); set image.digest to pin the image by digest."
{{- end }}
{{- if and (not .Values.image.digest) (ne .Values.image.pullPolicy "Always") }}
checkov.io/skip2: "CKV_K8S_15=The tag is fixed, so IfNotPresent only skips a registry round trip per start and lets pods restart during a registry outage; set image.pullPolicy Always where nodes are shared with untrusted tenants."
{{- end }}
{{- if not .Values.resources.limits.cpu }}
checkov.io/skip3: "CKV_K8S_11=No CPU limit by default on purpose: CFS throttling slows the hashing and copying of large payloads and protects nothing the memory guard needs. Set resources.limits.cpu if your cluster requires one."
{{- end }}
{{- if not .Values.networkPolicy.enabled }}
checkov.io/skip4: "CKV2_K8S_6=The NetworkPolicy is opt-in (networkPolicy.enabled) because the allowed clients are site-specific."
{{- end }}
{{- if not $local }}
checkov.io/skip5: "CKV_K8S_35=The S3 client reads AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from the environment; they come from the Secret by secretKeyRef and never appear in the manifest or the ConfigMap."
{{- end }}
{{- if kindIs "invalid" .Values.securityContext.runAsUser }}
checkov.io/skip6: "CKV_K8S_40=securityContext.runAsUser is null, so the platform assigns the UID (OpenShift's restricted SCC picks a high one from the namespace's range)."
{{- end }}
{{- end -}}
{{- end -}}
