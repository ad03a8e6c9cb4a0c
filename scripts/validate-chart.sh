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
#   6. jitbroker check-config on every rendered jitbroker.toml + policy.cedar (when JITBROKER_BIN
#      is set; skipped otherwise)
#
# Environment:
#   JITBROKER_BIN           path of a jitbroker binary (step 6)
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

# ---- 6. jitbroker check-config -------------------------------------------------------------------

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
fi

# ---- summary ------------------------------------------------------------------------------------

section "summary"
printf '%s\n' "${RESULTS[@]}" | grep -v '^PASS' || true
echo "chart: $CHART (helm $("$HELM" version --short 2>/dev/null), Kubernetes ${KUBE_VERSIONS[*]})"
echo "validate-chart: $PASSED passed, $FAILED failed, $SKIPPED skipped"
[[ $FAILED -eq 0 ]]
