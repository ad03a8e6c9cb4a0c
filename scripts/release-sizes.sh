#!/usr/bin/env bash
# What users download: splits the release binary as the Dockerfile does (the line tables into
# jitbroker.debug, a stripped binary that names it through .gnu_debuglink), checks that the
# stripped binary runs, and prints the sizes (bytes, and gzip -6 of the stripped binary, about
# what a registry stores for that layer).
#
#   scripts/release-sizes.sh [OUT_DIR]     # default: target/release-split
# Needs target/release/jitbroker (cargo build --release --bin jitbroker) and binutils' objcopy.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/target/release/jitbroker"
out=${1:-$root/target/release-split}
[[ -x $bin ]] || { echo "no $bin: run cargo build --release --bin jitbroker first" >&2; exit 1; }
command -v objcopy >/dev/null || { echo "objcopy (binutils) is needed" >&2; exit 1; }
mkdir -p "$out"
objcopy --only-keep-debug "$bin" "$out/jitbroker.debug"
objcopy --strip-debug --strip-unneeded --add-gnu-debuglink="$out/jitbroker.debug" \
	"$bin" "$out/jitbroker"
chmod 0755 "$out/jitbroker"
"$out/jitbroker" --version >/dev/null
size() { stat -c %s "$1"; }
printf '| file | bytes |\n|---|---|\n'
printf '| release binary as built (line tables) | %s |\n' "$(size "$bin")"
printf '| stripped binary (shipped in the image) | %s |\n' "$(size "$out/jitbroker")"
printf '| stripped binary, gzip -6 | %s |\n' "$(gzip -6 -c "$out/jitbroker" | wc -c)"
printf '| jitbroker.debug (kept apart) | %s |\n' "$(size "$out/jitbroker.debug")"
