"""Markdown table from the reports that scripts/bench.sh leaves in target/bench.

usage: bench_table.py DIR AGENTS K SECONDS FLOOR_SECONDS BAO_VERSION MACHINE
"""

import os
import re
import sys


def parse(path):
    """The figures of one jitbroker-load report, or None when the run did not happen."""
    if not os.path.exists(path):
        return None
    f = {}
    for line in open(path):
        line = line.strip()
        m = re.match(r"(issuances|no-op calls)/s: ([\d.]+)", line)
        if m:
            f["rate"] = float(m.group(2))
        m = re.match(r"all rpcs/s: ([\d.]+)", line)
        if m:
            f["ops"] = float(m.group(1))
        m = re.match(r".* latency ms: p50 ([\d.]+) p99 ([\d.]+) p99.9 ([\d.]+)", line)
        if m:
            f["p50"], f["p99"], f["p999"] = map(float, m.groups())
        m = re.match(r"server cpu seconds per 1000 rpcs: ([\d.]+)", line)
        if m:
            f["cpu"] = float(m.group(1))
        m = re.match(r"server peak rss MiB: ([\d.]+)", line)
        if m:
            f["rss"] = float(m.group(1))
        m = re.match(r"store bytes: (\d+)", line)
        if m:
            f["store"] = int(m.group(1)) / 1e6
    return f


def fmt(v, digits):
    return "–" if v is None else f"{v:.{digits}f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}×"


def main():
    d, agents, k, secs, floor_secs, bao_version, machine = sys.argv[1:8]
    jb, jb0 = parse(f"{d}/jb-flow.txt"), parse(f"{d}/jb-noop.txt")
    dev, dev0 = parse(f"{d}/bao-dev-flow.txt"), parse(f"{d}/bao-dev-noop.txt")
    raft = parse(f"{d}/bao-raft-flow.txt")

    def get(rep, key):
        return None if rep is None else rep.get(key)

    rows = [
        ("credentials issued /s (IssueCredential ↔ child token create)", "rate", 0, jb, dev, raft),
        (f"all operations /s (k+3 per task: {int(k) + 3})", "ops", 0, jb, dev, raft),
        ("issue latency p50 (ms)", "p50", 2, jb, dev, raft),
        ("issue latency p99 (ms)", "p99", 2, jb, dev, raft),
        ("issue latency p99.9 (ms)", "p999", 2, jb, dev, raft),
        ("server CPU s per 1000 operations", "cpu", 3, jb, dev, raft),
        ("server peak RSS (MiB)", "rss", 0, jb, dev, raft),
        ("store on disk after the run (MB)", "store", 1, jb, None, raft),
        ("no-op floor calls /s", "rate", 0, jb0, dev0, None),
        ("no-op floor latency p50 (ms)", "p50", 2, jb0, dev0, None),
        ("no-op floor latency p99 (ms)", "p99", 2, jb0, dev0, None),
        ("no-op floor server CPU s per 1000 calls", "cpu", 3, jb0, dev0, None),
    ]
    print(f"N={agents} agents, k={k}, {secs} s per flow run, {floor_secs} s per floor run; "
          f"{bao_version or 'OpenBao not run'}")
    print()
    print(f"Machine: {machine}")
    print()
    print("| figure | jitbroker (durable) | OpenBao dev (in memory) | jitbroker / OpenBao dev "
          "| OpenBao raft (durable) | jitbroker / OpenBao raft |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, key, digits, a, b, c in rows:
        va, vb, vc = get(a, key), get(b, key), get(c, key)
        print(f"| {name} | {fmt(va, digits)} | {fmt(vb, digits)} | {ratio(va, vb)} "
              f"| {fmt(vc, digits)} | {ratio(va, vc)} |")
    print()
    print("Ratios are jitbroker divided by OpenBao: above 1 means more for jitbroker (better for "
          "rates, worse for latency, CPU, memory and disk).")
    print("jitbroker is durable: every reply waits for the group-commit flush of sled. OpenBao "
          "dev mode keeps everything in memory (no disk at all); OpenBao raft fsyncs each "
          "raft commit. The no-op floor is grpc health for jitbroker, GET /v1/sys/health for "
          "OpenBao (HTTP/2, same TLS).")


if __name__ == "__main__":
    main()
