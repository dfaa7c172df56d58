{{- /*
The meter's part of a Pod, Service and NetworkPolicy, for this chart's own workload and for a
gateway chart that runs the meter next to its gateway (see deploy/helm/newapi-example):

  containers:
    - name: newapi ...
    {{- include "edgemeter.container" (dict "values" .Values.meteringSidecar "top" $ "gatewayPort" .Values.newapi.port) | nindent 8 }}
  volumes:
    {{- include "edgemeter.volumes" (dict "values" .Values.meteringSidecar "top" $) | nindent 8 }}

Each takes the dict described in _helpers.tpl; edgemeter.container also "gatewayPort", the port
the gateway listens on inside the Pod (the meter forwards to 127.0.0.1:<gatewayPort>).
*/ -}}

{{- define "edgemeter.env" -}}
{{- $v := .values -}}
{{- $upstream := $v.upstream -}}
{{- if and (not $upstream) .gatewayPort -}}
{{- $upstream = printf "http://127.0.0.1:%v" .gatewayPort -}}
{{- end -}}
- name: EDGEMETER_UPSTREAM
  value: {{ required "upstream: the URL of the gateway to meter (e.g. http://newapi.newapi:3000)" $upstream | quote }}
- name: EDGEMETER_LISTEN_PORT
  value: {{ $v.port | quote }}
- name: EDGEMETER_ADMIN_LISTEN
  value: {{ printf "0.0.0.0:%v" $v.adminPort | quote }}
- name: EDGEMETER_NATS_URL
  value: {{ $v.natsURL | default "nats://nats-jetstream.nats-system.svc.cluster.local:4222" | quote }}
- name: EDGEMETER_PUBLISH_TIMEOUT_MS
  value: {{ include "edgemeter.durationMs" $v.natsPublishTimeout | quote }}
- name: EDGEMETER_SUBJECT
  value: {{ $v.subject | quote }}
- name: EDGEMETER_PRICE_MICRO_PER_TOKEN
  value: {{ $v.priceMicroOMRPerToken | int64 | toString | quote }}
- name: EDGEMETER_CURRENCY
  value: {{ $v.currency | quote }}
- name: EDGEMETER_TENANT_HEADER
  value: {{ $v.tenantIDHeader | quote }}
- name: EDGEMETER_CUSTOMER_HEADER
  value: {{ $v.customerIDHeader | quote }}
- name: EDGEMETER_PATHS
  value: {{ $v.paths | quote }}
- name: EDGEMETER_STREAM_USAGE
  value: {{ $v.streamUsage | quote }}
- name: EDGEMETER_SPOOL_DIR
  value: {{ printf "%s/spool" (trimSuffix "/" $v.spoolDir) | quote }}
- name: MITMPROXY_CONFDIR
  value: {{ printf "%s/mitmproxy" (trimSuffix "/" $v.spoolDir) | quote }}
- name: EDGEMETER_SPOOL_MAX_MB
  value: {{ $v.spool.maxMB | int64 | toString | quote }}
- name: EDGEMETER_SPOOL_SYNC
  value: {{ $v.spool.sync | quote }}
- name: EDGEMETER_ON_SPOOL_FULL
  value: {{ $v.spool.onFull | quote }}
- name: EDGEMETER_SHUTDOWN_GRACE_MS
  value: {{ $v.shutdown.graceMs | int64 | toString | quote }}
- name: EDGEMETER_SHUTDOWN_DRAIN_MS
  value: {{ $v.shutdown.drainMs | int64 | toString | quote }}
- name: EDGEMETER_READY_BROKER_DOWN_S
  value: {{ $v.readiness.brokerDownS | int64 | toString | quote }}
- name: EDGEMETER_READY_SPOOL_AGE_S
  value: {{ $v.readiness.spoolAgeS | int64 | toString | quote }}
- name: EDGEMETER_METRICS_MAX_MODELS
  value: {{ $v.metrics.maxModels | int64 | toString | quote }}
{{- if $v.runner }}
- name: EDGEMETER_RUNNER
  value: {{ $v.runner | quote }}
{{- end }}
{{- if gt (int $v.workers) 1 }}
{{- if ne $v.runner "serve" }}
{{- fail (printf "workers: %d needs runner: serve (the lean runner's --workers)" (int $v.workers)) }}
{{- end }}
- name: EDGEMETER_WORKERS
  value: {{ $v.workers | int | toString | quote }}
{{- end }}
{{- with $v.nats }}
{{- if .credentials.secretName }}
- name: EDGEMETER_NATS_CREDS
  value: {{ printf "/etc/edgemeter/nats-creds/%s" .credentials.key | quote }}
{{- end }}
{{- if .token.secretName }}
- name: EDGEMETER_NATS_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .token.secretName }}
      key: {{ .token.key }}
{{- end }}
{{- if .user }}
- name: EDGEMETER_NATS_USER
  value: {{ .user | quote }}
{{- end }}
{{- if .password.secretName }}
- name: EDGEMETER_NATS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .password.secretName }}
      key: {{ .password.key }}
{{- end }}
{{- if .tls.secretName }}
{{- if .tls.ca }}
- name: EDGEMETER_NATS_TLS_CA
  value: {{ printf "/etc/edgemeter/nats-tls/%s" .tls.ca | quote }}
{{- end }}
{{- if .tls.cert }}
- name: EDGEMETER_NATS_TLS_CERT
  value: {{ printf "/etc/edgemeter/nats-tls/%s" .tls.cert | quote }}
- name: EDGEMETER_NATS_TLS_KEY
  value: {{ printf "/etc/edgemeter/nats-tls/%s" (required "nats.tls.key: the client certificate's key" .tls.key) | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- if include "edgemeter.tableSource" (dict "table" $v.prices "name" "prices") }}
- name: EDGEMETER_PRICES
  value: {{ printf "/etc/edgemeter/prices/%s" (include "edgemeter.tableKey" $v.prices) | quote }}
{{- end }}
- name: EDGEMETER_ATTRIBUTION
  value: {{ $v.attribution | quote }}
{{- if include "edgemeter.tableSource" (dict "table" $v.keymap "name" "keymap") }}
- name: EDGEMETER_KEYMAP
  value: {{ printf "/etc/edgemeter/keymap/%s" (include "edgemeter.tableKey" $v.keymap) | quote }}
{{- else if eq $v.attribution "keymap" }}
{{- fail "attribution=keymap needs a key map: keymap.inline, keymap.configMap.name or keymap.secret.name" }}
{{- end }}
{{- if $v.fingerprintSecret.secretName }}
- name: EDGEMETER_FINGERPRINT_SECRET_FILE
  value: {{ printf "/etc/edgemeter/fingerprint/%s" $v.fingerprintSecret.key | quote }}
{{- end }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- /* Where a price table or key map comes from: "inline", "configMap", "secret" or "". */ -}}
{{- define "edgemeter.tableSource" -}}
{{- $t := .table -}}
{{- $given := list -}}
{{- if $t.inline }}{{ $given = append $given "inline" }}{{ end -}}
{{- if $t.configMap.name }}{{ $given = append $given "configMap" }}{{ end -}}
{{- if $t.secret.name }}{{ $given = append $given "secret" }}{{ end -}}
{{- if gt (len $given) 1 -}}
{{- fail (printf "%s: give one of inline, configMap.name, secret.name (got %s)" .name (join ", " $given)) -}}
{{- end -}}
{{- first $given | default "" -}}
{{- end -}}

{{- define "edgemeter.tableKey" -}}
{{- if .secret.name }}{{ .secret.key }}{{ else }}{{ .configMap.key }}{{ end -}}
{{- end -}}

{{- define "edgemeter.container" -}}
{{- $v := .values -}}
- name: edgemeter
  image: {{ include "edgemeter.image" . | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  {{- with $v.extraArgs }}
  args:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  env:
    {{- include "edgemeter.env" . | nindent 4 }}
  ports:
    - name: metered
      containerPort: {{ $v.port }}
      protocol: TCP
    - name: edgemeter-admin
      containerPort: {{ $v.adminPort }}
      protocol: TCP
  {{- with $v.probes }}
  startupProbe:
    httpGet:
      path: {{ .startup.path }}
      port: edgemeter-admin
    periodSeconds: {{ .startup.periodSeconds }}
    timeoutSeconds: {{ .startup.timeoutSeconds }}
    failureThreshold: {{ .startup.failureThreshold }}
  livenessProbe:
    httpGet:
      path: {{ .liveness.path }}
      port: edgemeter-admin
    periodSeconds: {{ .liveness.periodSeconds }}
    timeoutSeconds: {{ .liveness.timeoutSeconds }}
    failureThreshold: {{ .liveness.failureThreshold }}
  readinessProbe:
    httpGet:
      path: {{ .readiness.path }}
      port: edgemeter-admin
    periodSeconds: {{ .readiness.periodSeconds }}
    timeoutSeconds: {{ .readiness.timeoutSeconds }}
    failureThreshold: {{ .readiness.failureThreshold }}
  {{- end }}
  resources:
    {{- toYaml $v.resources | nindent 4 }}
  securityContext:
    {{- toYaml $v.securityContext | nindent 4 }}
  volumeMounts:
    - name: edgemeter-data
      mountPath: {{ $v.spoolDir }}
    {{- if $v.nats.credentials.secretName }}
    - name: edgemeter-nats-creds
      mountPath: /etc/edgemeter/nats-creds
      readOnly: true
    {{- end }}
    {{- if $v.nats.tls.secretName }}
    - name: edgemeter-nats-tls
      mountPath: /etc/edgemeter/nats-tls
      readOnly: true
    {{- end }}
    {{- if include "edgemeter.tableSource" (dict "table" $v.prices "name" "prices") }}
    - name: edgemeter-prices
      mountPath: /etc/edgemeter/prices
      readOnly: true
    {{- end }}
    {{- if include "edgemeter.tableSource" (dict "table" $v.keymap "name" "keymap") }}
    - name: edgemeter-keymap
      mountPath: /etc/edgemeter/keymap
      readOnly: true
    {{- end }}
    {{- if $v.fingerprintSecret.secretName }}
    - name: edgemeter-fingerprint
      mountPath: /etc/edgemeter/fingerprint
      readOnly: true
    {{- end }}
    {{- with $v.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{- /* A ConfigMap or Secret volume holding one key: the chart's own ConfigMap for inline. */ -}}
{{- define "edgemeter.tableVolume" -}}
{{- $t := .table -}}
{{- $source := include "edgemeter.tableSource" (dict "table" $t "name" .name) -}}
{{- if $source }}
- name: edgemeter-{{ .name }}
{{- if eq $source "secret" }}
  secret:
    secretName: {{ $t.secret.name }}
    defaultMode: 0440
    items:
      - key: {{ $t.secret.key }}
        path: {{ $t.secret.key }}
{{- else }}
  configMap:
    name: {{ if eq $source "inline" }}{{ include "edgemeter.fullname" .ctx }}{{ else }}{{ $t.configMap.name }}{{ end }}
    items:
      - key: {{ if eq $source "inline" }}{{ printf "%s.toml" .name }}{{ else }}{{ $t.configMap.key }}{{ end }}
        path: {{ $t.configMap.key }}
{{- end }}
{{- end }}
{{- end -}}

{{- /* The Pod's volumes for the meter; standalone with a claim template, the data volume is
the StatefulSet's (withData=false). */ -}}
{{- define "edgemeter.volumes" -}}
{{- $v := .values -}}
{{- if ne (toString .withData) "false" }}
{{- include "edgemeter.dataVolume" . }}
{{- end }}
{{- if $v.nats.credentials.secretName }}
- name: edgemeter-nats-creds
  secret:
    secretName: {{ $v.nats.credentials.secretName }}
    defaultMode: 0440
    items:
      - key: {{ $v.nats.credentials.key }}
        path: {{ $v.nats.credentials.key }}
{{- end }}
{{- if $v.nats.tls.secretName }}
- name: edgemeter-nats-tls
  secret:
    secretName: {{ $v.nats.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- include "edgemeter.tableVolume" (dict "table" $v.prices "name" "prices" "ctx" .) }}
{{- include "edgemeter.tableVolume" (dict "table" $v.keymap "name" "keymap" "ctx" .) }}
{{- if $v.fingerprintSecret.secretName }}
- name: edgemeter-fingerprint
  secret:
    secretName: {{ $v.fingerprintSecret.secretName }}
    defaultMode: 0440
    items:
      - key: {{ $v.fingerprintSecret.key }}
        path: {{ $v.fingerprintSecret.key }}
{{- end }}
{{- with $v.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- /* Pod annotations: a restart when the inline tables change, and Prometheus scraping. */ -}}
{{- define "edgemeter.podAnnotations" -}}
{{- $v := .values -}}
{{- if $v.metrics.annotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ $v.adminPort | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- if or $v.prices.inline $v.keymap.inline }}
checksum/edgemeter-tables: {{ printf "%s\n%s" $v.prices.inline $v.keymap.inline | sha256sum }}
{{- end }}
{{- end -}}

{{- /*
The gateway's Service ports with the meter in front: the clients' port goes to the meter, and
the next port straight to the gateway (the admin path that must not be metered, as bp-newapi's
:3001). Takes "servicePort" and "gatewayPort" besides "values".
*/ -}}
{{- define "edgemeter.servicePorts" -}}
- name: http
  port: {{ .servicePort }}
  targetPort: metered
  protocol: TCP
- name: {{ .values.directPortName | default "http-direct" }}
  port: {{ add .servicePort 1 }}
  targetPort: {{ .gatewayPort }}
  protocol: TCP
{{- end -}}

{{- /* NetworkPolicy ingress rules for the meter's ports. */ -}}
{{- define "edgemeter.ingressRules" -}}
{{- $np := .values.networkPolicy -}}
- ports:
    - port: {{ .values.port }}
      protocol: TCP
  {{- with $np.from }}
  from:
    {{- toYaml . | nindent 4 }}
  {{- end }}
- ports:
    - port: {{ .values.adminPort }}
      protocol: TCP
  {{- with $np.metricsFrom }}
  from:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{- /* NetworkPolicy egress rules the meter needs: the broker and DNS. */ -}}
{{- define "edgemeter.egressRules" -}}
{{- $np := .values.networkPolicy -}}
- to:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: {{ $np.nats.namespace }}
  ports:
    - port: {{ $np.nats.port }}
      protocol: TCP
- to:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: {{ $np.dns.namespace }}
  ports:
    - port: {{ $np.dns.port }}
      protocol: UDP
    - port: {{ $np.dns.port }}
      protocol: TCP
{{- end -}}
