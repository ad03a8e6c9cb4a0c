# Sourced by the benchmark and runbook scripts: free loopback ports.
# free_port: a TCP port on 127.0.0.1 that is free now.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
# free_pair: a free port P whose P+1 is free too (OpenBao's cluster listener).
free_pair() {
	python3 - <<'PY'
import socket
while True:
    a = socket.socket(); a.bind(("127.0.0.1", 0)); p = a.getsockname()[1]
    b = socket.socket()
    try:
        b.bind(("127.0.0.1", p + 1)); print(p); break
    except OSError:
        pass
    finally:
        a.close(); b.close()
PY
}

# jb_ready URL TEXT: wait (up to 10 s) until URL answers with TEXT in its body.
jb_ready() {
	for _ in $(seq 1 100); do curl -fsS "$1" 2>/dev/null | grep -q "$2" && return 0; sleep 0.1; done
	echo "not ready: $1" >&2
	return 1
}

# jb_prepare_dev JITBROKER DIR: make a dev data directory (one short start of `jitbroker dev`) whose
# configuration lifts the per-address and per-identity request rates: a load generator is one
# address and a few identities, and measures the broker, not its flood limits.
jb_prepare_dev() {
	local jb=$1 dir=$2 api ops pid
	if [[ ! -f $dir/jitbroker.toml ]]; then
		api=$(free_port)
		ops=$(free_port)
		RUST_LOG=warn "$jb" dev --data-dir "$dir" --listen "127.0.0.1:$api" --ops-listen "127.0.0.1:$ops" >/dev/null 2>&1 &
		pid=$!
		jb_ready "http://127.0.0.1:$ops/readyz" ready || true
		kill "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
	fi
	grep -q '^\[server\]' "$dir/jitbroker.toml" ||
		printf '\n[server]\nrequests_per_remote_per_second = 1000000\nrequests_per_identity_per_second = 1000000\n' >>"$dir/jitbroker.toml"
}

# jb_stop: stop the process whose pid is in the caller's `pid` (if any) and clear it.
jb_stop() {
	if [[ -n ${pid:-} ]]; then
		kill "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
		pid=
	fi
}
