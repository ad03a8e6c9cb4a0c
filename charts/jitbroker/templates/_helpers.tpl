{{/*
Names
*/}}
{{- define "jitbroker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "jitbroker.fullname" -}}
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

{{- define "jitbroker.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride }}
{{- end }}

{{- define "jitbroker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "jitbroker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "jitbroker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "jitbroker.headlessServiceName" -}}
{{- printf "%s-headless" (include "jitbroker.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels
*/}}
{{- define "jitbroker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "jitbroker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "jitbroker.labels" -}}
helm.sh/chart: {{ include "jitbroker.chart" . }}
{{ include "jitbroker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: broker
app.kubernetes.io/part-of: jitbroker
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Image: registry/repository[:tag][@digest]; global.spire.image.registry wins over image.registry.
*/}}
{{- define "jitbroker.image" -}}
{{- $registry := .Values.image.registry }}
{{- with ((.Values.global).spire).image }}{{ with .registry }}{{ $registry = . }}{{ end }}{{ end }}
{{- $tag := default .Chart.AppVersion .Values.image.tag | toString }}
{{- $ref := .Values.image.repository }}
{{- if $registry }}{{ $ref = printf "%s/%s" $registry $ref }}{{ end }}
{{- if .Values.image.digest }}
{{- printf "%s:%s@%s" $ref $tag .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $ref $tag }}
{{- end }}
{{- end }}

{{/*
Trust domain: config.trustDomain, else global.spire.trustDomain.
*/}}
{{- define "jitbroker.trustDomain" -}}
{{- $td := default (((.Values.global).spire).trustDomain) .Values.config.trustDomain }}
{{- required "global.spire.trustDomain (or config.trustDomain) is required" $td }}
{{- end }}

{{/*
A SPIFFE ID from a value: "spiffe://..." as is, "/path" gets the trust domain prepended.
Call with (dict "id" $id "td" $trustDomain).
*/}}
{{- define "jitbroker.spiffeID" -}}
{{- if hasPrefix "spiffe://" .id }}
{{- .id }}
{{- else if hasPrefix "/" .id }}
{{- printf "spiffe://%s%s" .td .id }}
{{- else }}
{{- fail (printf "%q is not a SPIFFE ID: write spiffe://<trust domain>/<path> or /<path>" .id) }}
{{- end }}
{{- end }}

{{/*
A TOML inline array of SPIFFE IDs. Call with (dict "ids" $list "td" $trustDomain).
JSON strings are valid TOML basic strings, so toJson quotes safely.
*/}}
{{- define "jitbroker.spiffeIDList" -}}
{{- $out := list }}
{{- range .ids }}
{{- $out = append $out (include "jitbroker.spiffeID" (dict "id" . "td" $.td)) }}
{{- end }}
{{- $out | toJson }}
{{- end }}

{{- define "jitbroker.socketURI" -}}
{{- printf "unix://%s/%s" (.Values.workloadAPI.mountPath | trimSuffix "/") .Values.workloadAPI.socketName }}
{{- end }}

{{/*
Service DNS names the broker answers to; they go into its SVID (ClusterSPIFFEID.dnsNameTemplates).
With the OAuth surface on, the issuer's host (a DNS name, not an IP address) is one of them: OAuth
clients reach the broker there and check its certificate against it.
*/}}
{{- define "jitbroker.serviceDNSNames" -}}
{{- $svc := include "jitbroker.fullname" . }}
{{- $ns := include "jitbroker.namespace" . }}
{{- $domain := default "cluster.local" (((.Values.global).k8s).clusterDomain) }}
{{- $names := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns $domain) }}
{{- with ((.Values.config).oauth).issuer }}
{{- $host := regexReplaceAll `^https://([^/:?#]*).*$` . "${1}" | lower }}
{{- if and (regexMatch `^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$` $host) (not (regexMatch `^[0-9.]+$` $host)) }}
{{- $names = append $names $host }}
{{- end }}
{{- end }}
{{- concat $names .Values.clusterSPIFFEID.extraDNSNames | uniq | toJson }}
{{- end }}

{{/*
The rendered Cedar policy text.
*/}}
{{- define "jitbroker.policies" -}}
{{- tpl .Values.config.policies (dict "TrustDomain" (include "jitbroker.trustDomain" .) "Values" .Values "Release" .Release "Chart" .Chart "Template" .Template) }}
{{- end }}

{{/*
Cross-field checks the JSON schema cannot express.
*/}}
{{- define "jitbroker.validate" -}}
{{- $c := .Values.config }}
{{- if gt (int $c.defaultTTLSeconds) (int $c.maxTTLSeconds) }}
{{- fail (printf "config.defaultTTLSeconds (%v) must not exceed config.maxTTLSeconds (%v)" $c.defaultTTLSeconds $c.maxTTLSeconds) }}
{{- end }}
{{- range $name, $r := $c.resources }}
{{- if and (hasKey $r "maxTTLSeconds") (gt (int $r.maxTTLSeconds) (int $c.maxTTLSeconds)) }}
{{- fail (printf "config.resources.%s.maxTTLSeconds (%v) must not exceed config.maxTTLSeconds (%v)" $name $r.maxTTLSeconds $c.maxTTLSeconds) }}
{{- end }}
{{- end }}
{{- range $name, $r := $c.resources }}
{{- if kindIs "map" $r.inject }}
{{- if not (has $r.kind (list "token" "jwt")) }}
{{- fail (printf "config.resources.%s.inject: a %s credential cannot be injected into an HTTP header; inject needs kind token or jwt" $name $r.kind) }}
{{- end }}
{{- with $r.inject.format }}
{{- if ne (len (regexFindAll "\\{secret\\}" . -1)) 1 }}
{{- fail (printf "config.resources.%s.inject.format (%q) must contain {secret} exactly once" $name .) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- $g := $c.gateway | default dict }}
{{- if and $g.routes (not $g.ids) }}
{{- fail "config.gateway.routes are set but config.gateway.ids is empty: list the gateways' SPIFFE IDs (the [gateway] section is rendered only with ids)" }}
{{- end }}
{{- if $g.ids }}
{{- if ge (int $g.reuseMinRemainingSeconds) (int $g.credentialTTLSeconds) }}
{{- fail (printf "config.gateway.reuseMinRemainingSeconds (%v) must be below config.gateway.credentialTTLSeconds (%v)" $g.reuseMinRemainingSeconds $g.credentialTTLSeconds) }}
{{- end }}
{{- $seen := dict }}
{{- range $i, $rt := $g.routes }}
{{- $at := printf "config.gateway.routes[%d] (%s)" $i $rt.name }}
{{- if hasKey $seen $rt.name }}
{{- fail (printf "%s: two routes have this name" $at) }}
{{- end }}
{{- $_ := set $seen $rt.name true }}
{{- $r := index $c.resources $rt.resource }}
{{- if not $r }}
{{- fail (printf "%s: resource %q is not in config.resources" $at $rt.resource) }}
{{- end }}
{{- if not (has $rt.action $r.actions) }}
{{- fail (printf "%s: resource %s has no action %q (it has: %s)" $at $rt.resource $rt.action (join ", " $r.actions)) }}
{{- end }}
{{- if not (kindIs "map" $r.inject) }}
{{- fail (printf "%s: resource %s has no inject section saying which header carries its credential (set config.resources.%s.inject, e.g. {} for \"authorization: Bearer <credential>\")" $at $rt.resource $rt.resource) }}
{{- end }}
{{- if and $rt.mcpTools (not (has "tools/call" (default (list) $rt.mcpMethods))) }}
{{- fail (printf "%s: mcpTools applies only to a route whose mcpMethods include \"tools/call\"" $at) }}
{{- end }}
{{- end }}
{{- end }}
{{- range $name, $r := $c.resources }}
{{- with $r.oauthResource }}
{{- if not (has $r.kind (list "token" "jwt")) }}
{{- fail (printf "config.resources.%s.oauthResource: only token and jwt resources issue OAuth access tokens (this one is kind %s)" $name $r.kind) }}
{{- end }}
{{- end }}
{{- end }}
{{- $indicators := dict }}
{{- range $name, $r := $c.resources }}
{{- with $r.oauthResource }}
{{- if hasKey $indicators . }}
{{- fail (printf "config.resources.%s.oauthResource (%q) is also the oauthResource of config.resources.%s: a resource indicator names one resource" $name . (get $indicators .)) }}
{{- end }}
{{- $_ := set $indicators . $name }}
{{- end }}
{{- end }}
{{- $o := $c.oauth | default dict }}
{{- with $o.issuer }}
{{- if not $c.jwtAudience }}
{{- fail "config.oauth.issuer is set but config.jwtAudience is empty: the OAuth surface verifies JWT-SVID assertions with the bundles jwtAudience enables; set config.jwtAudience (e.g. \"jitbroker\")" }}
{{- end }}
{{- if not (hasPrefix "https://" .) }}
{{- fail (printf "config.oauth.issuer (%q) must start with https://" .) }}
{{- end }}
{{- if hasSuffix "/" . }}
{{- fail (printf "config.oauth.issuer (%q) must not end with '/': write https://host[:port][/path]" .) }}
{{- end }}
{{- if not (regexMatch `^https://[^/?#"\\[:^graph:]]+(/[^?#"\\[:^graph:]]*)?$` .) }}
{{- fail (printf "config.oauth.issuer (%q) must be https://host[:port][/path] with no query, fragment, white space, quote or backslash" .) }}
{{- end }}
{{- if and $c.jwtIssuer (ne $c.jwtIssuer .) }}
{{- fail (printf "config.jwtIssuer (%q) differs from config.oauth.issuer (%q): with the OAuth surface on, every JWT carries the OAuth issuer; unset config.jwtIssuer" $c.jwtIssuer .) }}
{{- end }}
{{- if or (lt (int $o.accessTokenTTLSeconds) 1) (gt (int $o.accessTokenTTLSeconds) (int $c.maxTTLSeconds)) }}
{{- fail (printf "config.oauth.accessTokenTTLSeconds (%v) must be between 1 and config.maxTTLSeconds (%v)" $o.accessTokenTTLSeconds $c.maxTTLSeconds) }}
{{- end }}
{{- $svc := $.Values.service }}
{{- $taken := list (int $svc.apiPort) (int $svc.opsPort) }}
{{- if and ($c.gateway | default dict).ids ($c.gateway | default dict).forwardAuth }}
{{- $taken = append $taken (int $svc.forwardAuthPort) }}
{{- end }}
{{- if has (int $svc.oauthPort) $taken }}
{{- fail (printf "service.oauthPort (%v) must differ from service.apiPort, service.opsPort and (with config.gateway.forwardAuth) service.forwardAuthPort" $svc.oauthPort) }}
{{- end }}
{{- end }}
{{- if eq (int .Values.service.apiPort) (int .Values.service.opsPort) }}
{{- fail "service.apiPort and service.opsPort must differ" }}
{{- end }}
{{- if and (eq .Values.storage.engine "sled") (gt (int .Values.replicaCount) 1) }}
{{- fail (printf "replicaCount (%d) must be 0 or 1 with storage.engine \"sled\": sled is single-writer. Several replicas need storage.engine \"postgres\" (docs/ha.md)" (int .Values.replicaCount)) }}
{{- end }}
{{- if eq .Values.storage.engine "postgres" }}
{{- $pg := .Values.storage.postgres }}
{{- if not $pg.existingSecret }}
{{- fail "storage.postgres.existingSecret is required with storage.engine \"postgres\": create a Secret holding the connection string (key storage.postgres.dsnKey, default \"dsn\") and the server's CA (key \"ca.crt\") and name it here (docs/ha.md)" }}
{{- end }}
{{- if and $pg.caSecret (not $pg.caKey) }}
{{- fail "storage.postgres.caSecret is set but storage.postgres.caKey is empty: name the key of the CA certificate in that Secret" }}
{{- end }}
{{- end }}
{{- $pdb := .Values.podDisruptionBudget }}
{{- if and $pdb.enabled (gt (int .Values.replicaCount) 1) (or (kindIs "int64" $pdb.minAvailable) (kindIs "float64" $pdb.minAvailable)) }}
{{- if ge (int $pdb.minAvailable) (int .Values.replicaCount) }}
{{- fail (printf "podDisruptionBudget.minAvailable (%d) must be below replicaCount (%d): otherwise no node drain could ever evict a broker pod" (int $pdb.minAvailable) (int .Values.replicaCount)) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The affinity of the broker pod: .Values.affinity when set; otherwise, with several replicas
possible (engine postgres), a soft anti-affinity that spreads them over nodes.
*/}}
{{- define "jitbroker.affinity" -}}
{{- if .Values.affinity }}
{{- toYaml .Values.affinity }}
{{- else if eq .Values.storage.engine "postgres" }}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "jitbroker.selectorLabels" . | nindent 12 }}
{{- end }}
{{- end }}

{{/*
With engine postgres and storage.postgres.auditArchive.existingClaim: the shared claim holding the
audit archive of every replica ("" otherwise).
*/}}
{{- define "jitbroker.sharedArchiveClaim" -}}
{{- if eq .Values.storage.engine "postgres" }}
{{- ((.Values.storage.postgres).auditArchive).existingClaim }}
{{- end }}
{{- end }}
