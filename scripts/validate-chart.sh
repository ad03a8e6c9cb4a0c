#!/usr/bin/env bash
# scripts/validate-chart.sh — lints, renders and validates the Helm chart in charts/jitbroker.
#
#   scripts/validate-chart.sh            # everything; exit status 0 only if every check passed
#   JITBROKER_BIN=target/release/jitbroker scripts/validate-chart.sh
#                                        # also runs `jitbroker check-config` on each rendered config
#
# Steps:
#   1. tools: helm (scripts/tools.sh) and kubernetes-validate (a venv in the tools cache)
#   2. helm lint --strict, for the defaults (plus the required kek.existingSecret) and ci/*.yaml
#   3. helm template for the defaults and each ci/*.yaml, once per Kubernetes version; each render
#      goes through tests/chart/validate_manifests.py: strict Kubernetes schemas, the CRD schemas
#      kept in tests/chart/, restricted Pod Security, no secret material, the broker's contract
#   4. NOTES.txt renders for every values set and shows the port-forward + grpcurl steps;
#      values the chart must refuse (each must fail, for the expected reason)
#   5. a negative self-test: deliberately broken renders must fail validation
#   6. the OAuth surface (config.oauth): off by default; on, its port in both Services, the pod
#      and the NetworkPolicy, [oauth] and oauth_resource rendered, no jwt_issuer, the issuer's
#      host in the ClusterSPIFFEID, NOTES.txt; these checks must catch broken charts too
#   7. jitbroker check-config on every rendered jitbroker.toml + policy.cedar, the OAuth one
#      included (when JITBROKER_BIN is set; skipped otherwise)
#
# Environment:
#   JITBROKER_BIN           path of a jitbroker binary (step 7)
#   JITBROKER_KUBE_VERSIONS Kubernetes versions (major.minor) to validate against (default "1.29 1.31 latest",
#                           latest = the newest kubernetes-validate bundles)
#   JITBROKER_TOOLS_DIR     tools cache (see scripts/tools.sh)
#   KEEP_WORKDIR=1          keep the temporary directory with every render
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHART="$ROOT/charts/jitbroker"
CHECKER="$ROOT/tests/chart/validate_manifests.py"
KUBE_VALIDATE_VERSION=1.37.0
KEK_SECRET=jitbroker-kek
# shellcheck source=scripts/tools.sh
source "$ROOT/scripts/tools.sh"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/jitbroker-chart.XXXXXX")"
cleanup() { if [[ "${KEEP_WORKDIR:-0}" == 1 ]]; then echo "renders kept in $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT

# The checker leaves no __pycache__ in the source tree.
export PYTHONDONTWRITEBYTECODE=1
# Helm must not read or write the user's helm config, cache or plugins.
export HELM_CACHE_HOME="$WORK/helm/cache" HELM_CONFIG_HOME="$WORK/helm/config" HELM_DATA_HOME="$WORK/helm/data"

declare -a RESULTS=()
PASSED=0 FAILED=0 SKIPPED=0

pass() { RESULTS+=("PASS  $*"); PASSED=$((PASSED + 1)); echo "PASS  $*"; }
fail() { RESULTS+=("FAIL  $*"); FAILED=$((FAILED + 1)); echo "FAIL  $*"; }
skip() { RESULTS+=("SKIP  $*"); SKIPPED=$((SKIPPED + 1)); echo "SKIP  $*"; }
section() { printf '\n== %s\n' "$*"; }

# Prints a log's tail, indented, when a check fails.
show() { sed -e 's/^/    | /' "$1" | tail -n "${2:-25}"; }

# ---- 1. tools -----------------------------------------------------------------------------------

section "tools"
if ! BIN_DIR="$(jb_tools_install helm)"; then
	fail "install helm with scripts/tools.sh"
	echo "validate-chart: cannot go on without helm"
	exit 1
fi
HELM="$BIN_DIR/helm"
echo "helm: $("$HELM" version --short 2>/dev/null) ($HELM)"

VENV="$(jb_tools_dir)/venv"
PY="$VENV/bin/python"
# ensure_venv: kubernetes-validate (pinned) in a venv of the tools cache; skipped when present.
ensure_venv() {
	"$PY" - "$KUBE_VALIDATE_VERSION" <<-'PYEOF' 2>/dev/null && return 0
		import sys
		from importlib.metadata import version
		import kubernetes_validate, jsonschema, yaml
		if sys.version_info < (3, 11):
		    import tomli
		sys.exit(version("kubernetes-validate") != sys.argv[1])
	PYEOF
	echo "installing kubernetes-validate==$KUBE_VALIDATE_VERSION into $VENV"
	[[ -x "$PY" ]] || python3 -m venv "$VENV" || return 1
	local pkgs=("kubernetes-validate==$KUBE_VALIDATE_VERSION" jsonschema pyyaml)
	"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || pkgs+=(tomli)
	"$VENV/bin/pip" install --quiet --disable-pip-version-check "${pkgs[@]}"
}
if ! ensure_venv; then
	fail "install kubernetes-validate into $VENV"
	echo "validate-chart: cannot go on without kubernetes-validate"
	exit 1
fi
LATEST="$("$PY" -c 'from kubernetes_validate.utils import latest_version, major_minor; print(major_minor(latest_version()))')"
read -r -a KUBE_VERSIONS <<<"${JITBROKER_KUBE_VERSIONS:-1.29 1.31 latest}"
for i in "${!KUBE_VERSIONS[@]}"; do [[ "${KUBE_VERSIONS[$i]}" == latest ]] && KUBE_VERSIONS[i]=$LATEST; done
mapfile -t KUBE_VERSIONS < <(printf '%s\n' "${KUBE_VERSIONS[@]}" | sort -uV)
echo "kubernetes-validate $KUBE_VALIDATE_VERSION: Kubernetes schemas ${KUBE_VERSIONS[*]} (newest bundled: $LATEST)"
if [[ -n "${JITBROKER_BIN:-}" ]]; then
	echo "jitbroker: $JITBROKER_BIN"
fi

# Values sets: the defaults (plus the one required value, by --set) and each ci/*.yaml. A ci file
# may carry "# validate: allow-hostpath" and "# validate: expect-kind KIND" lines for the checker.
declare -a SET_NAMES=() SET_FILES=() SET_CHECK=()
SET_NAMES+=("defaults")
SET_FILES+=("")
SET_CHECK+=("")
for f in "$CHART"/ci/*.yaml; do
	[[ -e "$f" ]] || continue
	SET_NAMES+=("ci/$(basename "$f")")
	SET_FILES+=("$f")
	extra=""
	grep -q '^# validate: allow-hostpath' "$f" && extra+=" --allow-hostpath"
	while read -r k; do extra+=" --expect-kind $k"; done < <(sed -n 's/^# validate: expect-kind \([A-Za-z]*\).*/\1/p' "$f")
	SET_CHECK+=("$extra")
done
# set_args I: HARGS = the helm arguments of values set I.
set_args() {
	if [[ -n "${SET_FILES[$1]}" ]]; then HARGS=(-f "${SET_FILES[$1]}"); else HARGS=(--set "kek.existingSecret=$KEK_SECRET"); fi
}

# ---- 2. lint ------------------------------------------------------------------------------------

section "helm lint --strict"
for i in "${!SET_NAMES[@]}"; do
	log="$WORK/lint-$i.log"
	set_args "$i"
	if "$HELM" lint --strict "${HARGS[@]}" "$CHART" >"$log" 2>&1; then
		pass "lint ${SET_NAMES[$i]}"
	else
		fail "lint ${SET_NAMES[$i]}"
		show "$log"
	fi
done

# ---- 3. render + validate -----------------------------------------------------------------------

section "render and validate (Kubernetes ${KUBE_VERSIONS[*]})"
declare -a CONFIG_DIRS=()
for i in "${!SET_NAMES[@]}"; do
	name=${SET_NAMES[$i]}
	for v in "${KUBE_VERSIONS[@]}"; do
		out="$WORK/render-$i-$v.yaml"
		log="$WORK/render-$i-$v.log"
		set_args "$i"
		if ! "$HELM" template jitbroker "$CHART" --namespace jitbroker --kube-version "$v.0" "${HARGS[@]}" >"$out" 2>"$log"; then
			fail "render $name (k8s $v)"
			show "$log"
			continue
		fi
		extract=()
		if [[ "$v" == "${KUBE_VERSIONS[0]}" ]]; then
			extract=(--extract-config "$WORK/config-$i")
		fi
		# shellcheck disable=SC2086
		if "$PY" "$CHECKER" "$out" --name "$name @ k8s $v" --kube-version "$v" ${SET_CHECK[$i]} "${extract[@]}" >"$log.check" 2>&1; then
			pass "validate $name (k8s $v: $(sed -n 's/^.*: \([0-9]*\) objects: \(.*\)$/\1 objects: \2/p' "$log.check" | head -n1))"
			[[ ${#extract[@]} -gt 0 ]] && CONFIG_DIRS+=("$i")
		else
			fail "validate $name (k8s $v)"
			show "$log.check" 40
		fi
	done
done

# NOTES.txt is rendered by install/upgrade only, and an error in it fails the install. Render it
# through a copy of the chart in which it is wrapped into a ConfigMap.
section "NOTES.txt"
NOTES_CHART="$WORK/notes-chart"
mkdir -p "$NOTES_CHART"
cp -R "$CHART/." "$NOTES_CHART/"
{
	printf '{{- define "jitbroker.notesCheck" -}}\n'
	cat "$CHART/templates/NOTES.txt"
	printf '{{- end }}\n'
	printf 'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes-check\ndata:\n  notes: {{ include "jitbroker.notesCheck" . | toJson }}\n'
} >"$NOTES_CHART/templates/zz-notes-check.yaml"
rm -f "$NOTES_CHART/templates/NOTES.txt"
for i in "${!SET_NAMES[@]}"; do
	log="$WORK/notes-$i.log"
	set_args "$i"
	if "$HELM" template jitbroker "$NOTES_CHART" --namespace jitbroker "${HARGS[@]}" \
		--show-only templates/zz-notes-check.yaml >"$log" 2>&1 &&
		"$PY" - "$log" >"$log.txt" 2>&1 <<-'PYEOF'; then
			import sys, yaml
			notes = yaml.safe_load(open(sys.argv[1]))["data"]["notes"]
			assert "grpcurl -cacert bundle.pem -cert svid.pem -key svid.key" in notes, "no grpcurl line"
			assert "port-forward" in notes, "no port-forward line"
			print(notes)
		PYEOF
		pass "NOTES.txt renders for ${SET_NAMES[$i]} and shows port-forward + grpcurl"
	else
		fail "NOTES.txt for ${SET_NAMES[$i]}"
		show "$log"
		show "$log.txt"
	fi
done

# ---- 4. values the schema must refuse ----------------------------------------------------------

section "values the chart must refuse"
# expect_refused DESCRIPTION EXPECTED-REGEX HELM-ARGS...: helm template must fail and its message
# must match EXPECTED-REGEX (grep -Ei), so that it failed for the reason under test.
expect_refused() {
	local desc=$1 want=$2 log
	shift 2
	log="$WORK/refuse-$((PASSED + FAILED)).log"
	if "$HELM" template jitbroker "$CHART" --namespace jitbroker "$@" >"$log" 2>&1; then
		fail "refuse $desc: it rendered"
		return
	fi
	if grep -Eqi -- "$want" "$log"; then
		pass "refuse $desc"
	else
		fail "refuse $desc: failed, but without mentioning '$want'"
		show "$log" 10
	fi
}
K=(--set "kek.existingSecret=$KEK_SECRET")
expect_refused "replicaCount=2 with sled storage" "replicaCount" "${K[@]}" --set replicaCount=2
expect_refused "a missing kek.existingSecret" "existingSecret"
expect_refused "an empty kek.existingSecret" "existingSecret" --set kek.existingSecret=
expect_refused "a string API port" "apiPort" "${K[@]}" --set-string service.apiPort=8443
expect_refused "a string ops port" "opsPort" "${K[@]}" --set service.opsPort=metrics
expect_refused "a KEK value in values (kek.value)" "propert(y|ies) '?value'? (is )?not allowed" "${K[@]}" --set kek.value=00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff
expect_refused "an unknown top-level key" "propert(y|ies) '?replicas'? (is )?not allowed" "${K[@]}" --set replicas=1
expect_refused "an unknown config key" "propert(y|ies) '?maxTtl'? (is )?not allowed" "${K[@]}" --set config.maxTtl=60
expect_refused "an unknown resource kind" "resources.db.kind" "${K[@]}" --set config.resources.db.kind=postgres --set 'config.resources.db.actions={read}'
expect_refused "a resource without actions" "actions" "${K[@]}" --set config.resources.db.kind=token
expect_refused "a malformed admin SPIFFE ID" "adminIDs.0" "${K[@]}" --set 'config.adminIDs={operator}'
expect_refused "a log format other than json/plain" "logFormat" "${K[@]}" --set config.logFormat=xml
expect_refused "a store cache below 16 MiB" "cacheMb" "${K[@]}" --set config.store.cacheMb=8
expect_refused "defaultTTLSeconds above maxTTLSeconds" "defaultTTLSeconds" "${K[@]}" --set config.defaultTTLSeconds=7200
expect_refused "a resource TTL above maxTTLSeconds" "maxTTLSeconds" "${K[@]}" --set config.resources.demo-token.maxTTLSeconds=7200
expect_refused "an unknown Workload API mode" "workloadAPI.mode" "${K[@]}" --set workloadAPI.mode=socket
expect_refused "the same port for API and ops" "must differ" "${K[@]}" --set service.opsPort=8443
G=(--set 'config.gateway.ids={/ns/gateways/sa/envoy}' --set 'config.gateway.routes[0].name=demo' --set 'config.gateway.routes[0].resource=demo-token' --set 'config.gateway.routes[0].action=read')
expect_refused "a gateway route to a resource without inject" "has no inject section" "${K[@]}" "${G[@]}"
expect_refused "a gateway route to an unknown resource" "is not in config.resources" "${K[@]}" "${G[@]}" --set 'config.gateway.routes[0].resource=nope'
expect_refused "a gateway route with an action the resource lacks" "has no action" "${K[@]}" "${G[@]}" --set config.resources.demo-token.inject.header=authorization --set 'config.gateway.routes[0].action=delete'
expect_refused "gateway routes without gateway ids" "gateway.ids is empty" "${K[@]}" "${G[@]:2}"
expect_refused "a lower-case route method" "methods" "${K[@]}" "${G[@]}" --set config.resources.demo-token.inject.header=authorization --set 'config.gateway.routes[0].methods={post}'
expect_refused "mcpTools without tools/call" "mcpTools applies only" "${K[@]}" "${G[@]}" --set config.resources.demo-token.inject.header=authorization --set 'config.gateway.routes[0].mcpMethods={tools/list}' --set 'config.gateway.routes[0].mcpTools={search}'
expect_refused "an unknown tool argument type" "toolArguments" "${K[@]}" --set config.gateway.toolArguments.amount=int
expect_refused "an upper-case inject header" "header" "${K[@]}" --set config.resources.demo-token.inject.header=X-Api-Key
expect_refused "an inject format without {secret}" "format" "${K[@]}" --set config.resources.demo-token.inject.format=Bearer
expect_refused "an inject format with {secret} twice" "exactly once" "${K[@]}" --set-json 'config.resources.demo-token.inject.format="{secret}-{secret}"'
expect_refused "inject on an x509 resource" "kind token or jwt" "${K[@]}" --set config.resources.demo-token.kind=x509 --set config.resources.demo-token.inject.header=authorization
expect_refused "reuseMinRemainingSeconds not below credentialTTLSeconds" "must be below" "${K[@]}" --set 'config.gateway.ids={/ns/gateways/sa/envoy}' --set config.gateway.reuseMinRemainingSeconds=300
OA=(--set config.jwtAudience=jitbroker --set config.oauth.issuer=https://jitbroker.example.org)
expect_refused "an OAuth issuer without config.jwtAudience" "config.oauth.issuer is set but config.jwtAudience is empty" "${K[@]}" "${OA[@]:2}"
expect_refused "an http:// OAuth issuer" "config.oauth.issuer .* must start with https://" "${K[@]}" "${OA[@]}" --set config.oauth.issuer=http://jitbroker.example.org
expect_refused "an OAuth issuer ending with /" "config.oauth.issuer .* must not end with '/'" "${K[@]}" "${OA[@]}" --set config.oauth.issuer=https://jitbroker.example.org/oauth/
expect_refused "an OAuth issuer with a query" "config.oauth.issuer .* no query" "${K[@]}" "${OA[@]}" --set 'config.oauth.issuer=https://jitbroker.example.org/?tenant=a'
expect_refused "an OAuth issuer without a host" "config.oauth.issuer .* must be https://host" "${K[@]}" "${OA[@]}" --set config.oauth.issuer=https:///oauth
expect_refused "accessTokenTTLSeconds above maxTTLSeconds" "config.oauth.accessTokenTTLSeconds \(7200\) must be between 1 and config.maxTTLSeconds" "${K[@]}" "${OA[@]}" --set config.oauth.accessTokenTTLSeconds=7200
expect_refused "accessTokenTTLSeconds of 0" "accessTokenTTLSeconds" "${K[@]}" "${OA[@]}" --set config.oauth.accessTokenTTLSeconds=0
expect_refused "oauthResource on an x509 resource" "config.resources.demo-token.oauthResource: only token and jwt" "${K[@]}" --set config.resources.demo-token.kind=x509 --set config.resources.demo-token.oauthResource=https://demo.example.org
expect_refused "one oauthResource on two resources" "is also the oauthResource of config.resources.demo-token" "${K[@]}" --set config.resources.demo-token.oauthResource=https://demo.example.org --set config.resources.other.kind=jwt --set 'config.resources.other.actions={read}' --set config.resources.other.oauthResource=https://demo.example.org
expect_refused "an oauthResource with a fragment" "oauthResource" "${K[@]}" --set 'config.resources.demo-token.oauthResource=https://demo.example.org/#x'
expect_refused "a relative oauthResource" "oauthResource" "${K[@]}" --set config.resources.demo-token.oauthResource=/mcp
expect_refused "a jwtIssuer that differs from the OAuth issuer" "config.jwtIssuer .* differs from config.oauth.issuer" "${K[@]}" "${OA[@]}" --set config.jwtIssuer=/jitbroker
expect_refused "an OAuth port equal to the API port" "service.oauthPort \(8443\) must differ" "${K[@]}" "${OA[@]}" --set service.oauthPort=8443
expect_refused "an OAuth port equal to the forward-auth port" "service.oauthPort \(8444\) must differ" "${K[@]}" "${OA[@]}" --set 'config.gateway.ids={/ns/gateways/sa/envoy}' --set config.gateway.forwardAuth=true --set service.oauthPort=8444
expect_refused "a string OAuth port" "oauthPort" "${K[@]}" "${OA[@]}" --set-string service.oauthPort=8445
expect_refused "a malformed token-exchange actor" "tokenExchangeActors" "${K[@]}" "${OA[@]}" --set 'config.oauth.tokenExchangeActors={envoy}'
expect_refused "an unknown config.oauth key" "propert(y|ies) '?audience'? (is )?not allowed" "${K[@]}" "${OA[@]}" --set config.oauth.audience=jitbroker

# ---- 5. negative self-test: validation must be able to fail -------------------------------------

section "negative self-test (each broken render must be caught)"
V0=${KUBE_VERSIONS[0]}
# expect_invalid DESCRIPTION EXPECTED-REGEX CHART-DIR [--checker ARGS... --] HELM-ARGS...:
# helm template must fail or the checker must reject the render, with a message matching
# EXPECTED-REGEX (grep -Ei).
expect_invalid() {
	local desc=$1 want=$2 chart=$3 out log how
	shift 3
	local -a cargs=()
	if [[ "${1:-}" == --checker ]]; then
		shift
		while [[ $# -gt 0 && "$1" != -- ]]; do cargs+=("$1"); shift; done
		shift
	fi
	out="$WORK/broken-$((PASSED + FAILED)).yaml"
	log="$out.log"
	if ! "$HELM" template jitbroker "$chart" --namespace jitbroker --kube-version "$V0.0" "$@" >"$out" 2>"$log"; then
		how="helm template failed"
	elif ! "$PY" "$CHECKER" "$out" --name "$desc" --kube-version "$V0" "${cargs[@]}" >"$log" 2>&1; then
		how="validation failed"
	else
		fail "catch $desc: the broken render passed validation"
		show "$log" 10
		return
	fi
	if grep -Eqi -- "$want" "$log"; then
		pass "catch $desc ($how: $(grep -Ei -m1 -- "$want" "$log" | sed 's/^ *\(ERROR \)\{0,1\}//' | cut -c1-100))"
	else
		fail "catch $desc: $how, but without matching '$want'"
		show "$log" 10
	fi
}
# broken_copy NAME SED-EXPR FILE: prints the path of a copy of the chart with one template edited.
broken_copy() {
	local dir="$WORK/broken/$1"
	rm -rf "$dir"
	mkdir -p "$dir"
	cp -R "$CHART/." "$dir/"
	sed -i -e "$2" "$dir/templates/$3"
	if cmp -s "$CHART/templates/$3" "$dir/templates/$3"; then
		echo "broken_copy $1: the edit changed nothing" >&2
		return 1
	fi
	echo "$dir"
}
# broken NAME SED-EXPR FILE DESCRIPTION EXPECTED-REGEX [HELM-ARGS...]
broken() {
	local d
	if d=$(broken_copy "$1" "$2" "$3"); then
		expect_invalid "$4" "$5" "$d" "${K[@]}" "${@:6}"
	else
		fail "prepare the broken chart '$1'"
	fi
}
broken syntax 's/{{- end }}//' statefulset.yaml \
	"a template syntax error" "parse error"
broken field 's/podManagementPolicy:/podManagmentPolicy:/' statefulset.yaml \
	"a misspelt optional StatefulSet field (strict schema)" "podManagmentPolicy"
broken type 's/replicas: {{ int .Values.replicaCount }}/replicas: "one"/' statefulset.yaml \
	"a wrongly typed field (replicas: \"one\")" "replicas.*(is not of type|integer)"
broken probe 's|path: /readyz|path: /ready|' statefulset.yaml \
	"a readiness probe off /readyz" "readinessProbe"
broken csid 's/dnsNameTemplates:/dnsNames:/' clusterspiffeid.yaml \
	"a ClusterSPIFFEID field the CRD does not know" "'dnsNames' was unexpected" --set clusterSPIFFEID.enabled=true
broken tomlkey 's/^kek_file = /key_file = /' configmap.yaml \
	"an unknown key in jitbroker.toml" "unknown key 'key_file'"
broken policyid 's/^ *@id("agents-read-demo")$//' ../values.yaml \
	"a Cedar policy without @id" "policies but [0-9]+ @id"
# shellcheck disable=SC2016 # a sed script, not a shell expression
broken secret '$a ---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: leaked\n  labels: {{- include "jitbroker.labels" . | nindent 4 }}\nstringData:\n  kek: 3f9a0c1e5b7d2468ace13579bdf02468ace13579bdf02468ace13579bdf02468' configmap.yaml \
	"a KEK value rendered into a Secret" "renders a Secret"
broken envsecret 's|value: {{ include "jitbroker.socketURI" . \| quote }}|value: {{ include "jitbroker.socketURI" . \| quote }}\n            - name: JITBROKER_KEK\n              value: "c2VjcmV0LWtleS1tYXRlcmlhbC0xMjM0NTY3ODkwQUJDREVGR0g="|' statefulset.yaml \
	"a literal KEK in an env var" "JITBROKER_KEK"
expect_invalid "a container running as root" "runAsUser is 0" "$CHART" "${K[@]}" --set securityContext.runAsUser=0
expect_invalid "a writable root filesystem" "readOnlyRootFilesystem" "$CHART" "${K[@]}" --set securityContext.readOnlyRootFilesystem=false
expect_invalid "privilege escalation" "allowPrivilegeEscalation" "$CHART" "${K[@]}" --set securityContext.allowPrivilegeEscalation=true
expect_invalid "capabilities not dropped" "capabilities.drop" "$CHART" "${K[@]}" --set 'securityContext.capabilities.drop={NET_RAW}'
expect_invalid "a hostPath nobody asked for" "is a hostPath" "$CHART" "${K[@]}" --set workloadAPI.mode=hostPath
expect_invalid "a ClusterSPIFFEID expected but missing" "expected a ClusterSPIFFEID" "$CHART" --checker --expect-kind ClusterSPIFFEID -- "${K[@]}"

# ---- 6. the OAuth surface -----------------------------------------------------------------------

section "OAuth surface (config.oauth)"
# A render with the OAuth surface on (config.oauth.issuer), a resource with an oauthResource,
# token-exchange actors written both ways, and a narrowed API ingress for the NetworkPolicy check.
OAUTH_ISSUER=https://jitbroker.example.org
OAUTH_PORT=8445
OAUTH_RESOURCE=tickets
OAUTH_URI=https://tickets.example.org/mcp
OAUTH_ACTORS='["spiffe://example.org/ns/gateways/sa/envoy", "spiffe://example.org/ns/mcp/sa/tickets"]'
OAUTH=(--set config.jwtAudience=jitbroker --set "config.oauth.issuer=$OAUTH_ISSUER"
	--set 'config.oauth.tokenExchangeActors={/ns/gateways/sa/envoy,spiffe://example.org/ns/mcp/sa/tickets}'
	--set "config.resources.$OAUTH_RESOURCE.kind=jwt"
	--set "config.resources.$OAUTH_RESOURCE.actions={tickets:read,tickets:write}"
	--set "config.resources.$OAUTH_RESOURCE.verifiers={/ns/tools/sa/tickets-mcp}"
	--set "config.resources.$OAUTH_RESOURCE.oauthResource=$OAUTH_URI"
	--set clusterSPIFFEID.enabled=true
	--set-json 'networkPolicy.api.from=[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"agents"}}}]')
# oauth_check on|off RENDER: one "PASS|what|" or "FAIL|what|why" line per part of the OAuth
# contract of RENDER made with "${OAUTH[@]}" ("on"), or of a render without it ("off": no trace of
# the OAuth surface, jwt_issuer rendered).
oauth_check() {
	"$PY" - "$1" "$2" "$OAUTH_ISSUER" "$OAUTH_PORT" "$OAUTH_RESOURCE" "$OAUTH_URI" "$OAUTH_ACTORS" <<-'PYEOF'
		import json, sys, yaml
		try:
		    import tomllib
		except ModuleNotFoundError:
		    import tomli as tomllib
		mode, render, issuer, port, res, uri, actors = sys.argv[1:8]
		port, actors = int(port), json.loads(actors)
		docs = [d for d in yaml.safe_load_all(open(render)) if isinstance(d, dict)]
		def check(what, ok, why=""):
		    print(f"{'PASS' if ok else 'FAIL'}|{what}|{why}")
		def kind(k):
		    return [d for d in docs if d.get("kind") == k]
		sts = kind("StatefulSet")[0]
		ctr = next(c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "jitbroker")
		cports = {p["name"]: p["containerPort"] for p in ctr.get("ports") or []}
		ingress = kind("NetworkPolicy")[0]["spec"]["ingress"]
		rules = {tuple(p.get("port") for p in r.get("ports") or []): r for r in ingress}
		cm = next(d for d in kind("ConfigMap") if "jitbroker.toml" in (d.get("data") or {}))
		cfg = tomllib.loads(cm["data"]["jitbroker.toml"])
		if mode == "off":
		    svcs = [s["metadata"]["name"] for s in kind("Service") if any(p["name"] == "oauth" for p in s["spec"]["ports"])]
		    check("no oauth port in the Services", not svcs, f"in {svcs}")
		    check("no oauth container port", "oauth" not in cports, f"ports {cports}")
		    check("no NetworkPolicy rule for oauth", ("oauth",) not in rules, f"ingress {ingress}")
		    check("no [oauth] and a jwt_issuer in jitbroker.toml", "oauth" not in cfg and "jwt_issuer" in cfg,
		          f"oauth = {cfg.get('oauth')}, jwt_issuer = {cfg.get('jwt_issuer')}")
		    sys.exit(0)
		for s in kind("Service"):
		    p = next((p for p in s["spec"]["ports"] if p["name"] == "oauth"), None)
		    ok = p is not None and p["port"] == port and p.get("targetPort") == "oauth" and p.get("appProtocol") == "https"
		    check(f"Service {s['metadata']['name']} has port oauth {port} (https)", ok, f"ports {s['spec']['ports']}")
		check(f"container port oauth = {port}", cports.get("oauth") == port, f"ports {cports}")
		r = rules.get(("oauth",))
		api_from = rules.get(("grpc",), {}).get("from")
		check("NetworkPolicy admits the oauth port from the API's sources",
		      r is not None and api_from and r.get("from") == api_from, f"ingress {ingress}")
		o = cfg.get("oauth") or {}
		want = {"listen": f"0.0.0.0:{port}", "issuer": issuer, "access_token_ttl_seconds": 300,
		        "token_exchange_actors": actors}
		check("[oauth] listens on the oauth port with the issuer, TTL and actors (SPIFFE IDs)", o == want,
		      f"[oauth] {o}, want {want}")
		check("no jwt_issuer (every JWT carries the OAuth issuer)", "jwt_issuer" not in cfg,
		      f"jwt_issuer = {cfg.get('jwt_issuer')!r}")
		aud = (cfg.get("identity") or {}).get("jwt_audience")
		check("identity.jwt_audience rendered", aud == "jitbroker", f"jwt_audience = {aud!r}")
		got = ((cfg.get("resources") or {}).get(res) or {}).get("oauth_resource")
		check(f"resources.{res}.oauth_resource rendered", got == uri, f"oauth_resource = {got!r}")
		host = issuer.split("://", 1)[1].split("/", 1)[0].split(":", 1)[0]
		csids = kind("ClusterSPIFFEID")
		names = csids[0]["spec"].get("dnsNameTemplates") if csids else None
		check(f"the ClusterSPIFFEID's DNS names include the issuer's host {host}", bool(names) and host in names,
		      f"dnsNameTemplates {names}")
	PYEOF
}
# run_oauth_check LABEL on|off RENDER: a pass or a fail for each line of oauth_check.
run_oauth_check() {
	local label=$1 st what why n=0
	while IFS='|' read -r st what why; do
		n=$((n + 1))
		if [[ "$st" == PASS ]]; then pass "$label: $what"; else fail "$label: $what ($why)"; fi
	done < <(oauth_check "$2" "$3" 2>&1 | sed -E '/^(PASS|FAIL)\|/!s/^/FAIL|oauth_check: /')
	[[ $n -gt 0 ]] || fail "$label: oauth_check printed nothing"
}

if [[ -s "$WORK/render-0-${KUBE_VERSIONS[0]}.yaml" ]]; then
	run_oauth_check "defaults" off "$WORK/render-0-${KUBE_VERSIONS[0]}.yaml"
else
	fail "defaults: OAuth off (the defaults did not render)"
fi

# A render with the OAuth surface on passes the manifest checker like any other.
OAUTH_CONFIG=""
for v in "${KUBE_VERSIONS[@]}"; do
	out="$WORK/render-oauth-$v.yaml"
	log="$WORK/render-oauth-$v.log"
	if ! "$HELM" template jitbroker "$CHART" --namespace jitbroker --kube-version "$v.0" "${K[@]}" "${OAUTH[@]}" >"$out" 2>"$log"; then
		fail "render config.oauth on (k8s $v)"
		show "$log"
		continue
	fi
	extract=()
	[[ "$v" == "${KUBE_VERSIONS[0]}" ]] && extract=(--extract-config "$WORK/config-oauth")
	rc=0
	"$PY" "$CHECKER" "$out" --name "config.oauth on @ k8s $v" --kube-version "$v" --expect-kind ClusterSPIFFEID "${extract[@]}" >"$log.check" 2>&1 || rc=$?
	if [[ $rc -eq 0 ]]; then
		pass "validate config.oauth on (k8s $v: $(sed -n 's/^.*: \([0-9]*\) objects: \(.*\)$/\1 objects: \2/p' "$log.check" | head -n1))"
		[[ ${#extract[@]} -gt 0 && -s "$WORK/config-oauth/jitbroker.toml" ]] && OAUTH_CONFIG="$WORK/config-oauth"
	else
		fail "validate config.oauth on (k8s $v)"
		show "$log.check" 40
	fi
done
if [[ -s "$WORK/render-oauth-${KUBE_VERSIONS[0]}.yaml" ]]; then
	run_oauth_check "config.oauth on" on "$WORK/render-oauth-${KUBE_VERSIONS[0]}.yaml"
fi

log="$WORK/notes-oauth.log"
if "$HELM" template jitbroker "$NOTES_CHART" --namespace jitbroker "${K[@]}" "${OAUTH[@]}" \
	--show-only templates/zz-notes-check.yaml >"$log" 2>&1 &&
	"$PY" - "$log" "$OAUTH_ISSUER" >"$log.txt" 2>&1 <<-'PYEOF'; then
		import sys, yaml
		notes = yaml.safe_load(open(sys.argv[1]))["data"]["notes"]
		assert f"issuer {sys.argv[2]}" in notes, "no OAuth line naming the issuer"
		print(notes)
	PYEOF
	pass "NOTES.txt with config.oauth on shows the OAuth port and issuer"
else
	fail "NOTES.txt with config.oauth on"
	show "$log"
	show "$log.txt"
fi

# These checks must be able to fail: oauth_check must catch each broken chart.
# oauth_broken NAME SED-EXPR FILE DESCRIPTION EXPECTED-REGEX (matched against the FAIL lines)
oauth_broken() {
	local d out
	if ! d=$(broken_copy "oauth-$1" "$2" "$3"); then
		fail "prepare the broken chart 'oauth-$1'"
		return
	fi
	out="$WORK/broken-oauth-$1.yaml"
	if ! "$HELM" template jitbroker "$d" --namespace jitbroker "${K[@]}" "${OAUTH[@]}" >"$out" 2>"$out.log"; then
		fail "catch $4: the broken chart does not render"
		show "$out.log" 10
		return
	fi
	oauth_check on "$out" >"$out.check" 2>&1
	if grep -Eq -- "^FAIL\|.*$5" "$out.check"; then
		pass "catch $4 ($(grep -E -m1 -- "^FAIL\|.*$5" "$out.check" | cut -d'|' -f2 | cut -c1-90))"
	else
		fail "catch $4: oauth_check did not report '$5'"
		show "$out.check" 10
	fi
}
oauth_broken npol 's/- port: oauth/- port: ops/' networkpolicy.yaml \
	"a NetworkPolicy without the oauth rule" "NetworkPolicy admits the oauth port"
oauth_broken svc 's/targetPort: oauth/targetPort: grpc/' service.yaml \
	"a Service port oauth aimed at grpc" "Service .* has port oauth"
oauth_broken ctr '/- name: oauth/,+2d' statefulset.yaml \
	"no oauth container port" "container port oauth"
oauth_broken jwtiss 's/if not \$o.issuer/if true/' configmap.yaml \
	"jwt_issuer rendered with OAuth on" "no jwt_issuer"
oauth_broken listen 's/(int .Values.service.oauthPort)/(int .Values.service.apiPort)/' configmap.yaml \
	"[oauth] listening on the API port" "listens on the oauth port"
oauth_broken dns 's/{{- \$names = append \$names \$host }}//' _helpers.tpl \
	"a ClusterSPIFFEID without the issuer's host" "DNS names include the issuer"

# ---- 7. jitbroker check-config -------------------------------------------------------------------

section "jitbroker check-config"
if [[ -z "${JITBROKER_BIN:-}" ]]; then
	skip "check-config: JITBROKER_BIN is not set (set it to a jitbroker binary to check every rendered config)"
elif [[ ! -x "$JITBROKER_BIN" ]]; then
	fail "check-config: JITBROKER_BIN=$JITBROKER_BIN is not an executable file"
else
	for i in "${CONFIG_DIRS[@]}"; do
		dir="$WORK/config-$i"
		log="$dir/check.log"
		if JITBROKER_POLICY_FILE="$dir/policy.cedar" "$JITBROKER_BIN" check-config --config "$dir/jitbroker.toml" >"$log" 2>&1; then
			pass "check-config ${SET_NAMES[$i]}"
		else
			fail "check-config ${SET_NAMES[$i]}"
			show "$log" 15
		fi
	done
	# The same check must be able to fail.
	if [[ ${#CONFIG_DIRS[@]} -gt 0 ]]; then
		dir="$WORK/config-bad"
		cp -R "$WORK/config-${CONFIG_DIRS[0]}" "$dir"
		# A top-level key (prepended: appended text would land in the last [table]).
		{ echo 'not_a_broker_key = true'; cat "$WORK/config-${CONFIG_DIRS[0]}/jitbroker.toml"; } >"$dir/jitbroker.toml"
		if JITBROKER_POLICY_FILE="$dir/policy.cedar" "$JITBROKER_BIN" check-config --config "$dir/jitbroker.toml" >"$dir/check.log" 2>&1; then
			fail "check-config accepted a config with an unknown key"
		else
			pass "check-config refuses a config with an unknown key"
		fi
	fi
	# The OAuth render: the broker must accept [oauth], oauth_resource and the absent jwt_issuer, and
	# refuse the same config with a jwt_issuer that differs from the OAuth issuer.
	if [[ -n "$OAUTH_CONFIG" ]]; then
		log="$OAUTH_CONFIG/check.log"
		if JITBROKER_POLICY_FILE="$OAUTH_CONFIG/policy.cedar" "$JITBROKER_BIN" check-config --config "$OAUTH_CONFIG/jitbroker.toml" >"$log" 2>&1; then
			pass "check-config config.oauth on"
		else
			fail "check-config config.oauth on"
			show "$log" 15
		fi
		dir="$WORK/config-oauth-jwt-issuer"
		cp -R "$OAUTH_CONFIG" "$dir"
		{ echo 'jwt_issuer = "spiffe://example.org/jitbroker"'; cat "$OAUTH_CONFIG/jitbroker.toml"; } >"$dir/jitbroker.toml"
		if JITBROKER_POLICY_FILE="$dir/policy.cedar" "$JITBROKER_BIN" check-config --config "$dir/jitbroker.toml" >"$dir/check.log" 2>&1; then
			fail "check-config accepted config.oauth on with a different jwt_issuer"
		elif grep -q 'jwt_issuer' "$dir/check.log"; then
			pass "check-config refuses config.oauth on with a different jwt_issuer (why the chart leaves it out)"
		else
			fail "check-config refused config.oauth on with a jwt_issuer, without naming jwt_issuer"
			show "$dir/check.log" 10
		fi
	else
		fail "check-config config.oauth on: no validated OAuth render"
	fi
fi

# ---- summary ------------------------------------------------------------------------------------

section "summary"
printf '%s\n' "${RESULTS[@]}" | grep -v '^PASS' || true
echo "chart: $CHART (helm $("$HELM" version --short 2>/dev/null), Kubernetes ${KUBE_VERSIONS[*]})"
echo "validate-chart: $PASSED passed, $FAILED failed, $SKIPPED skipped"
[[ $FAILED -eq 0 ]]
