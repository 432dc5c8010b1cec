{{/* Names and labels. */}}
{{- define "token-ledger.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "token-ledger.fullname" -}}
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

{{- define "token-ledger.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "token-ledger.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one component: consumer, relay or migrate. */}}
{{- define "token-ledger.selectorLabels" -}}
app.kubernetes.io/name: {{ include "token-ledger.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "token-ledger.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "token-ledger.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "token-ledger.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* KEDA's name for the SASL mechanism. */}}
{{- define "token-ledger.kedaSasl" -}}
{{- $names := dict "PLAIN" "plaintext" "SCRAM-SHA-256" "scram_sha256" "SCRAM-SHA-512" "scram_sha512" }}
{{- get $names .Values.kafka.sasl.mechanism }}
{{- end }}

{{- define "token-ledger.tls" -}}
{{- if has .Values.kafka.securityProtocol (list "SSL" "SASL_SSL") }}true{{ end }}
{{- end }}

{{/* The settings every workload shares: the ConfigMap, then the Secrets. */}}
{{- define "token-ledger.env" -}}
{{- if and .Values.kafka.sasl.mechanism (not .Values.kafka.sasl.existingSecret) }}
{{- fail "kafka.sasl.mechanism is set: kafka.sasl.existingSecret must name the Secret with the SASL username and password" }}
{{- end }}
{{- $sasl := has .Values.kafka.securityProtocol (list "SASL_PLAINTEXT" "SASL_SSL") }}
{{- if and $sasl (not .Values.kafka.sasl.mechanism) }}
{{- fail (printf "kafka.securityProtocol is %s: kafka.sasl.mechanism must name PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512" .Values.kafka.securityProtocol) }}
{{- end }}
{{- if and .Values.kafka.sasl.mechanism (not $sasl) }}
{{- fail (printf "kafka.sasl.mechanism is set but kafka.securityProtocol is %s: use SASL_PLAINTEXT or SASL_SSL" .Values.kafka.securityProtocol) }}
{{- end }}
{{- if and .Values.keda.enabled (eq (.Values.keda.minReplicas | int) 0) (not .Values.relay.standalone) }}
{{- fail "keda.minReplicas is 0 while the billing relay runs inside the consumers: nothing would publish usage revisions at zero; set relay.standalone" }}
{{- end }}
- name: LEDGER_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "database.existingSecret: the Secret holding LEDGER_DATABASE_URL" .Values.database.existingSecret }}
      key: {{ .Values.database.urlKey }}
{{- if .Values.kafka.sasl.existingSecret }}
- name: LEDGER_KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.sasl.existingSecret }}
      key: {{ .Values.kafka.sasl.usernameKey }}
- name: LEDGER_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.sasl.existingSecret }}
      key: {{ .Values.kafka.sasl.passwordKey }}
{{- end }}
{{- end }}

{{/* The CA volume, when kafka.ssl.caSecret is set. */}}
{{- define "token-ledger.caVolume" -}}
{{- if .Values.kafka.ssl.caSecret }}
- name: kafka-ca
  secret:
    secretName: {{ .Values.kafka.ssl.caSecret }}
    items:
      - key: {{ .Values.kafka.ssl.caKey }}
        path: ca.crt
{{- end }}
{{- end }}

{{- define "token-ledger.caMount" -}}
{{- if .Values.kafka.ssl.caSecret }}
- name: kafka-ca
  mountPath: /etc/token-ledger/kafka-ca
  readOnly: true
{{- end }}
{{- end }}

{{/* The pod's security and the writable /tmp every container gets. */}}
{{- define "token-ledger.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- end }}

{{/* Liveness on /healthz and readiness on `ready` (default /readyz), on the port named `port`
(default metrics): the usage API has only /healthz, on its own port. */}}
{{- define "token-ledger.probes" -}}
{{- $port := .port | default "metrics" }}
livenessProbe:
  httpGet: {path: /healthz, port: {{ $port }}}
  {{- toYaml .root.Values.probes.liveness | nindent 2 }}
readinessProbe:
  httpGet: {path: {{ .ready | default "/readyz" }}, port: {{ $port }}}
  {{- toYaml .root.Values.probes.readiness | nindent 2 }}
{{- end }}

{{- define "token-ledger.scrapeAnnotations" -}}
{{- if .root.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}
