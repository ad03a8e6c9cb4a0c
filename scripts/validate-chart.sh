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
#   7. several replicas on PostgreSQL (storage.engine postgres): lint; strict schemas, restricted
#      Pod Security, no secret material and labels for each Kubernetes version (the checker's
#      other checks, which assume one sled replica, are replaced by these); a PodDisruptionBudget,
#      soft anti-affinity by hostname, the DSN and CA Secret mounted read-only, the [store] keys,
#      /readyz, the audit archive's volume; variants (CloudNativePG-style Secrets, a shared archive
#      claim, loopback without a CA, one replica); the sled defaults unchanged; NOTES.txt; these
#      checks must catch broken charts too
#   8. jitbroker check-config on every rendered jitbroker.toml + policy.cedar, the OAuth one
#      included (when JITBROKER_BIN is set; skipped otherwise; not the PostgreSQL renders, whose
#      dsn_file exists only in a pod)
#
# Environment:
#   JITBROKER_BIN           path of a jitbroker binary (step 8)
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
expect_refused "replicaCount=2 with sled storage" 'replicaCount \(2\) must be 0 or 1 with storage.engine "sled".*storage.engine "postgres"' "${K[@]}" --set replicaCount=2
expect_refused "an unknown storage engine (schema)" "storage.engine" "${K[@]}" --set storage.engine=mysql
PGV=(--set storage.engine=postgres --set replicaCount=3 --set storage.postgres.existingSecret=jitbroker-pg)
expect_refused "storage.engine postgres without storage.postgres.existingSecret" "storage.postgres.existingSecret is required with storage.engine \"postgres\"" "${K[@]}" "${PGV[@]:0:4}"
expect_refused "an empty storage.postgres.dsnKey" "dsnKey" "${K[@]}" "${PGV[@]}" --set storage.postgres.dsnKey=
expect_refused "a postgres poolSize of 0" "poolSize" "${K[@]}" "${PGV[@]}" --set storage.postgres.poolSize=0
expect_refused "a postgres leaseTtlSeconds under 5" "leaseTtlSeconds" "${K[@]}" "${PGV[@]}" --set storage.postgres.leaseTtlSeconds=2
expect_refused "a string maxClockSkewMs" "maxClockSkewMs" "${K[@]}" "${PGV[@]}" --set-string storage.postgres.maxClockSkewMs=1000
expect_refused "a database password as a value" "propert(y|ies) '?password'? (is )?not allowed" "${K[@]}" "${PGV[@]}" --set storage.postgres.password=hunter2
expect_refused "storage.postgres.caSecret without caKey" "caSecret is set but storage.postgres.caKey is empty" "${K[@]}" "${PGV[@]}" --set storage.postgres.caSecret=pg-ca --set storage.postgres.caKey=
expect_refused "podDisruptionBudget.minAvailable not below replicaCount" "podDisruptionBudget.minAvailable \(3\) must be below replicaCount \(3\)" "${K[@]}" "${PGV[@]}" --set podDisruptionBudget.minAvailable=3
expect_refused "a podDisruptionBudget.minAvailable that is neither a count nor a percentage" "minAvailable" "${K[@]}" "${PGV[@]}" --set podDisruptionBudget.minAvailable=half
expect_refused "an unknown unhealthyPodEvictionPolicy" "unhealthyPodEvictionPolicy" "${K[@]}" "${PGV[@]}" --set podDisruptionBudget.unhealthyPodEvictionPolicy=Never
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

# ---- 7. several replicas on PostgreSQL ----------------------------------------------------------

section "several replicas on PostgreSQL (storage.engine postgres)"
# The checker's broker contract assumes the single sled replica (one replica, the store's keys);
# a PostgreSQL render goes through its other checks (pg_validate) and through pg_check, which holds
# the PostgreSQL contract and, for the defaults, what the sled render must keep.
PG_SECRET=jitbroker-pg
PG=(--set storage.engine=postgres --set replicaCount=3 --set "storage.postgres.existingSecret=$PG_SECRET")
# CloudNativePG-style: the DSN under "uri" of the application Secret, the CA from "<cluster>-ca",
# other pool and lease values, minAvailable, a shared archive claim and an affinity of one's own.
PG_AFFINITY='{"podAntiAffinity":{"requiredDuringSchedulingIgnoredDuringExecution":[{"topologyKey":"topology.kubernetes.io/zone","labelSelector":{"matchLabels":{"app.kubernetes.io/name":"jitbroker"}}}]}}'
PG_CNPG=(--set storage.engine=postgres --set replicaCount=3 --set storage.postgres.existingSecret=pg-app
	--set storage.postgres.dsnKey=uri --set storage.postgres.caSecret=pg-ca
	--set storage.postgres.poolSize=8 --set storage.postgres.leaseTtlSeconds=30 --set storage.postgres.maxClockSkewMs=500
	--set podDisruptionBudget.minAvailable=2 --set storage.postgres.auditArchive.existingClaim=jitbroker-audit
	--set-json "affinity=$PG_AFFINITY")
# The database on loopback (a proxy sidecar): no CA; one replica, so no PodDisruptionBudget.
PG_LOCAL=(--set storage.engine=postgres --set replicaCount=1 --set "storage.postgres.existingSecret=$PG_SECRET" --set storage.postgres.caKey=)
PG_STORE='{"engine": "postgres", "dsn_file": "/etc/jitbroker/store/dsn", "ca_file": "/etc/jitbroker/store/ca.crt", "pool_size": 16, "lease_ttl_seconds": 15, "max_clock_skew_ms": 1000}'
PG_EXPECT='{"replicas": 3, "pdb": {"maxUnavailable": 1, "unhealthyPodEvictionPolicy": "AlwaysAllow"}, "affinity": "default",
 "store": '"$PG_STORE"',
 "files": {"/etc/jitbroker/store/dsn": ["secret", "'"$PG_SECRET"'", "dsn"], "/etc/jitbroker/store/ca.crt": ["secret", "'"$PG_SECRET"'", "ca.crt"]},
 "archive": "per-replica"}'
PG_CNPG_EXPECT='{"replicas": 3, "pdb": {"minAvailable": 2, "unhealthyPodEvictionPolicy": "AlwaysAllow"}, "affinity": '"$PG_AFFINITY"',
 "store": {"engine": "postgres", "dsn_file": "/etc/jitbroker/store/dsn", "ca_file": "/etc/jitbroker/store/ca.crt", "pool_size": 8, "lease_ttl_seconds": 30, "max_clock_skew_ms": 500},
 "files": {"/etc/jitbroker/store/dsn": ["secret", "pg-app", "uri"], "/etc/jitbroker/store/ca.crt": ["secret", "pg-ca", "ca.crt"]},
 "archive": "jitbroker-audit"}'
PG_LOCAL_EXPECT='{"replicas": 1, "pdb": null, "affinity": "default",
 "store": {"engine": "postgres", "dsn_file": "/etc/jitbroker/store/dsn", "pool_size": 16, "lease_ttl_seconds": 15, "max_clock_skew_ms": 1000},
 "files": {"/etc/jitbroker/store/dsn": ["secret", "'"$PG_SECRET"'", "dsn"]}, "archive": "per-replica"}'
SLED_EXPECT='{"replicas": 1, "pdb": null, "affinity": null, "store": {"cache_mb": 256, "min_free_mb": 64}, "files": {},
 "archive": "per-replica"}'

# pg_validate RENDER KUBE-VERSION NAME: the checks of tests/chart/validate_manifests.py that hold
# for any number of replicas: strict Kubernetes schemas, restricted Pod Security, no secret
# material, the standard labels.
pg_validate() {
	"$PY" - "$CHECKER" "$@" <<-'PYEOF'
		import importlib.util, sys, yaml
		checker, render, version, name = sys.argv[1:5]
		spec = importlib.util.spec_from_file_location("validate_manifests", checker)
		vm = importlib.util.module_from_spec(spec)
		spec.loader.exec_module(vm)
		docs = [d for d in yaml.safe_load_all(open(render)) if isinstance(d, dict) and "kind" in d]
		rep = vm.Report(name)
		vm.check_schemas(docs, [version], rep)
		for d in docs:
		    pod = vm.pod_spec(d)
		    if pod is not None:
		        vm.check_pod_security(d, pod, False, rep)
		vm.check_secrets(docs, [], rep)
		vm.check_labels(docs, rep)
		print(f"{name}: {len(docs)} objects: {', '.join(sorted({d['kind'] for d in docs}))}")
		for e in rep.errors:
		    print(f"  ERROR {e}")
		sys.exit(1 if rep.errors else 0)
	PYEOF
}
# pg_check RENDER EXPECT-JSON: one "PASS|what|" or "FAIL|what|why" line per part of the contract:
# replicas, the PodDisruptionBudget (or none), the affinity ("default": soft anti-affinity by
# hostname; null: none; else verbatim), [store], the files under /etc/jitbroker/store (Secret, key,
# read-only), kek_file, the readiness probe, and where the audit archive lives ("per-replica":
# data_dir on the volumeClaimTemplate; else the name of a shared claim).
pg_check() {
	"$PY" - "$1" "$2" <<-'PYEOF'
		import json, os, sys, yaml
		try:
		    import tomllib
		except ModuleNotFoundError:
		    import tomli as tomllib
		render, want = sys.argv[1], json.loads(sys.argv[2])
		docs = [d for d in yaml.safe_load_all(open(render)) if isinstance(d, dict)]
		def check(what, ok, why=""):
		    print(f"{'PASS' if ok else 'FAIL'}|{what}|{why}")
		def kind(k):
		    return [d for d in docs if d.get("kind") == k]
		sts = kind("StatefulSet")[0]
		spec = sts["spec"]
		pod = spec["template"]["spec"]
		ctr = next(c for c in pod["containers"] if c["name"] == "jitbroker")
		sel = spec["selector"]["matchLabels"]
		check(f"StatefulSet replicas = {want['replicas']}", spec.get("replicas") == want["replicas"], f"replicas {spec.get('replicas')}")
		pdbs = kind("PodDisruptionBudget")
		if want["pdb"] is None:
		    check("no PodDisruptionBudget", not pdbs, f"{len(pdbs)} rendered")
		else:
		    p = pdbs[0] if len(pdbs) == 1 else {}
		    body = {k: v for k, v in (p.get("spec") or {}).items() if k != "selector"}
		    ok = p.get("apiVersion") == "policy/v1" and body == want["pdb"] and (p.get("spec") or {}).get("selector") == {"matchLabels": sel}
		    check(f"a PodDisruptionBudget {want['pdb']} over the broker pods", ok, f"{len(pdbs)} rendered: {p.get('spec')}")
		aff = pod.get("affinity")
		if want["affinity"] == "default":
		    anti = (aff or {}).get("podAntiAffinity") or {}
		    terms = anti.get("preferredDuringSchedulingIgnoredDuringExecution") or []
		    ok = (set(aff or {}) == {"podAntiAffinity"} and set(anti) == {"preferredDuringSchedulingIgnoredDuringExecution"}
		          and len(terms) == 1 and terms[0]["podAffinityTerm"].get("topologyKey") == "kubernetes.io/hostname"
		          and terms[0]["podAffinityTerm"].get("labelSelector") == {"matchLabels": sel})
		    check("soft pod anti-affinity by kubernetes.io/hostname over the broker pods", ok, f"affinity {aff}")
		elif want["affinity"] is None:
		    check("no affinity", aff is None, f"affinity {aff}")
		else:
		    check("the affinity value verbatim, no default anti-affinity", aff == want["affinity"], f"affinity {aff}")
		mounts = {m["mountPath"]: m for m in ctr.get("volumeMounts") or []}
		vols = {v["name"]: v for v in pod.get("volumes") or []}
		files = {}
		for mpath, m in mounts.items():
		    for src in ((vols.get(m["name"]) or {}).get("projected") or {}).get("sources") or []:
		        for k, obj in src.items():
		            for it in (obj or {}).get("items") or []:
		                files[os.path.join(mpath, it["path"])] = ([k, obj.get("name"), it["key"]], m.get("readOnly") is True)
		cm = next(d for d in kind("ConfigMap") if "jitbroker.toml" in (d.get("data") or {}))
		cfg = tomllib.loads(cm["data"]["jitbroker.toml"])
		store = cfg.get("store")
		check(f"[store] is {want['store']}", store == want["store"], f"[store] {store}")
		for path, src in want["files"].items():
		    got, ro = files.get(path, (None, False))
		    check(f"{path} from {src[0]} {src[1]} key {src[2]}, read-only", got == src and ro, f"got {got}, readOnly {ro}")
		extra = sorted(p for p in files if p.startswith("/etc/jitbroker/store/") and p not in want["files"])
		check("nothing else under /etc/jitbroker/store", not extra, f"also {extra}")
		for key in ("dsn_file", "ca_file"):
		    if key in (store or {}):
		        got, ro = files.get(store[key], (None, False))
		        check(f"[store] {key} is a Secret key mounted read-only", bool(got) and got[0] == "secret" and ro, f"{store[key]}: {got}")
		got, _ = files.get(cfg.get("kek_file", ""), (None, False))
		check("kek_file from the KEK Secret (the same on every replica)", bool(got) and got[0] == "secret", f"{cfg.get('kek_file')}: {got}")
		hg = (ctr.get("readinessProbe") or {}).get("httpGet") or {}
		check("readiness probe: /readyz on the ops port", hg.get("path") == "/readyz" and hg.get("port") == "ops", f"httpGet {hg}")
		vcts = [v["metadata"]["name"] for v in spec.get("volumeClaimTemplates") or []]
		data = mounts.get("/var/lib/jitbroker") or {}
		arch = mounts.get("/var/lib/jitbroker/audit-archive")
		if want["archive"] == "per-replica":
		    check("data_dir (audit-archive/ included) on the per-replica volumeClaimTemplate",
		          cfg.get("data_dir") == "/var/lib/jitbroker" and data.get("name") in vcts and arch is None,
		          f"data_dir {cfg.get('data_dir')}, mount {data}, claims {vcts}, archive mount {arch}")
		else:
		    av = vols.get((arch or {}).get("name")) or {}
		    ok = (not vcts and "emptyDir" in (vols.get(data.get("name")) or {})
		          and (av.get("persistentVolumeClaim") or {}).get("claimName") == want["archive"])
		    check(f"audit-archive/ on the shared claim {want['archive']}, no claim per replica", ok,
		          f"claims {vcts}, data {vols.get(data.get('name'))}, archive {av}")
	PYEOF
}
# run_pg_check LABEL RENDER EXPECT-JSON: a pass or a fail for each line of pg_check.
run_pg_check() {
	local label=$1 st what why n=0
	while IFS='|' read -r st what why; do
		n=$((n + 1))
		if [[ "$st" == PASS ]]; then pass "$label: $what"; else fail "$label: $what ($why)"; fi
	done < <(pg_check "$2" "$3" 2>&1 | sed -E '/^(PASS|FAIL)\|/!s/^/FAIL|pg_check: /')
	[[ $n -gt 0 ]] || fail "$label: pg_check printed nothing"
}
# pg_render NAME KUBE-VERSION HELM-ARGS...: renders into $WORK/render-pg-NAME-VERSION.yaml, then
# pg_validate; a pass or a fail either way. Returns non-zero when it did not render.
pg_render() {
	local name=$1 v=$2 out log
	shift 2
	out="$WORK/render-pg-$name-$v.yaml"
	log="$out.log"
	if ! "$HELM" template jitbroker "$CHART" --namespace jitbroker --kube-version "$v.0" "$@" >"$out" 2>"$log"; then
		fail "render $name (k8s $v)"
		show "$log"
		return 1
	fi
	if pg_validate "$out" "$v" "$name @ k8s $v" >"$log.check" 2>&1; then
		pass "validate $name (k8s $v: $(sed -n 's/^.*: \([0-9]*\) objects: \(.*\)$/\1 objects: \2/p' "$log.check" | head -n1))"
	else
		fail "validate $name (k8s $v)"
		show "$log.check" 40
	fi
}

for args in PG PG_CNPG; do
	declare -n hargs=$args
	log="$WORK/lint-pg-$args.log"
	if "$HELM" lint --strict "${K[@]}" "${hargs[@]}" "$CHART" >"$log" 2>&1; then
		pass "lint postgres ($args)"
	else
		fail "lint postgres ($args)"
		show "$log"
	fi
	unset -n hargs
done
for v in "${KUBE_VERSIONS[@]}"; do
	pg_render "postgres-3-replicas" "$v" "${K[@]}" "${PG[@]}"
done
pg_render "postgres-cnpg" "$V0" "${K[@]}" "${PG_CNPG[@]}"
pg_render "postgres-loopback" "$V0" "${K[@]}" "${PG_LOCAL[@]}"
pg_render "postgres-min-available-percent" "$V0" "${K[@]}" "${PG[@]}" --set podDisruptionBudget.minAvailable=50%

R="$WORK/render-pg-postgres-3-replicas-$V0.yaml"
[[ -s "$R" ]] && run_pg_check "postgres, 3 replicas" "$R" "$PG_EXPECT"
R="$WORK/render-pg-postgres-cnpg-$V0.yaml"
[[ -s "$R" ]] && run_pg_check "postgres, CloudNativePG Secrets, shared archive" "$R" "$PG_CNPG_EXPECT"
R="$WORK/render-pg-postgres-loopback-$V0.yaml"
[[ -s "$R" ]] && run_pg_check "postgres on loopback, 1 replica" "$R" "$PG_LOCAL_EXPECT"
R="$WORK/render-pg-postgres-min-available-percent-$V0.yaml"
[[ -s "$R" ]] && run_pg_check "postgres, minAvailable 50%" "$R" \
	"$(sed 's/"pdb": {"maxUnavailable": 1,/"pdb": {"minAvailable": "50%",/' <<<"$PG_EXPECT")"
if [[ -s "$WORK/render-0-$V0.yaml" ]]; then
	run_pg_check "defaults (sled, unchanged)" "$WORK/render-0-$V0.yaml" "$SLED_EXPECT"
else
	fail "defaults (sled): the defaults did not render"
fi

log="$WORK/notes-pg.log"
if "$HELM" template jitbroker "$NOTES_CHART" --namespace jitbroker "${K[@]}" "${PG[@]}" \
	--show-only templates/zz-notes-check.yaml >"$log" 2>&1 &&
	"$PY" - "$log" "$PG_SECRET" >"$log.txt" 2>&1 <<-'PYEOF'; then
		import sys, yaml
		notes = yaml.safe_load(open(sys.argv[1]))["data"]["notes"]
		assert "PostgreSQL, 3 replica(s)" in notes, "no store line naming PostgreSQL and the replicas"
		assert f"jitbroker/{sys.argv[2]}, key \"dsn\"" in notes, "the DSN Secret is not named"
		print(notes)
	PYEOF
	pass "NOTES.txt with storage.engine postgres names the store, its Secret and the replicas"
else
	fail "NOTES.txt with storage.engine postgres"
	show "$log"
	show "$log.txt"
fi

# These checks must be able to fail: pg_check must catch each broken chart.
# pg_broken NAME SED-EXPR FILE DESCRIPTION EXPECTED-REGEX EXPECT-JSON HELM-ARGS...
pg_broken() {
	local d out name=$1 expr=$2 file=$3 desc=$4 want=$5 expect=$6
	shift 6
	if ! d=$(broken_copy "pg-$name" "$expr" "$file"); then
		fail "prepare the broken chart 'pg-$name'"
		return
	fi
	out="$WORK/broken-pg-$name.yaml"
	if ! "$HELM" template jitbroker "$d" --namespace jitbroker "$@" >"$out" 2>"$out.log"; then
		fail "catch $desc: the broken chart does not render"
		show "$out.log" 10
		return
	fi
	pg_check "$out" "$expect" >"$out.check" 2>&1
	if grep -Eq -- "^FAIL\|.*$want" "$out.check"; then
		pass "catch $desc ($(grep -E -m1 -- "^FAIL\|.*$want" "$out.check" | cut -d'|' -f2 | cut -c1-90))"
	else
		fail "catch $desc: pg_check did not report '$want'"
		show "$out.check" 10
	fi
}
pg_broken pdb 's/gt (int .Values.replicaCount) 1/gt (int .Values.replicaCount) 5/' poddisruptionbudget.yaml \
	"no PodDisruptionBudget for 3 replicas" "a PodDisruptionBudget" "$PG_EXPECT" "${K[@]}" "${PG[@]}"
pg_broken zone 's|topologyKey: kubernetes.io/hostname|topologyKey: topology.kubernetes.io/zone|' _helpers.tpl \
	"an anti-affinity by zone instead of hostname" "anti-affinity by kubernetes.io/hostname" "$PG_EXPECT" "${K[@]}" "${PG[@]}"
pg_broken hard 's/preferredDuringSchedulingIgnoredDuringExecution:/requiredDuringSchedulingIgnoredDuringExecution:/' _helpers.tpl \
	"a hard anti-affinity (3 replicas need 3 nodes)" "anti-affinity" "$PG_EXPECT" "${K[@]}" "${PG[@]}"
pg_broken dsn 's|path: store/dsn|path: store/dsn.txt|' statefulset.yaml \
	"the DSN mounted at another path than dsn_file" "dsn_file is a Secret key" "$PG_EXPECT" "${K[@]}" "${PG[@]}"
pg_broken rw '0,/readOnly: true/{/readOnly: true/d}' statefulset.yaml \
	"the Secrets mounted writable" "read-only" "$PG_EXPECT" "${K[@]}" "${PG[@]}"
pg_broken engine '/^engine = "postgres"$/d' configmap.yaml \
	"[store] without engine = \"postgres\"" "\\[store\\] is" "$PG_EXPECT" "${K[@]}" "${PG[@]}"
pg_broken skew 's/^max_clock_skew_ms = .*$/max_clock_skew_ms = 1000000/' configmap.yaml \
	"[store] max_clock_skew_ms not from the values" "\\[store\\] is" "$PG_EXPECT" "${K[@]}" "${PG[@]}"
pg_broken claim 's/{{- if not $sharedArchive }}/{{- if true }}/' statefulset.yaml \
	"a claim per replica beside the shared archive claim" "shared claim" "$PG_CNPG_EXPECT" "${K[@]}" "${PG_CNPG[@]}"
pg_broken sledaff 's/else if eq .Values.storage.engine "postgres"/else if true/' _helpers.tpl \
	"the anti-affinity rendered for sled too (sled's render changed)" "no affinity" "$SLED_EXPECT" "${K[@]}"
pg_broken sledstore 's/^{{- if eq .Values.storage.engine "postgres" }}$/{{- if true }}/' configmap.yaml \
	"[store] of postgres rendered for sled" "\\[store\\] is" "$SLED_EXPECT" "${K[@]}"

# ---- 8. jitbroker check-config -------------------------------------------------------------------

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
