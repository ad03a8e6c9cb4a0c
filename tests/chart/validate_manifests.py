#!/usr/bin/env python3
"""Checks manifests rendered from charts/jitbroker (used by scripts/validate-chart.sh).

    validate_manifests.py RENDERED.yaml [--kube-version 1.29 ...] [--allow-hostpath]
                          [--expect-kind KIND ...] [--extract-config DIR] [--forbid TEXT ...]

What it checks, failing on the first class of problem it finds in any document:
  * every built-in kind validates strictly (unknown fields are errors) against the Kubernetes
    JSON schemas of each --kube-version (kubernetes-validate); an unknown kind is an error;
  * ClusterSPIFFEID and ServiceMonitor validate against the JSON schemas kept beside this file;
  * pods follow the "restricted" Pod Security Standard: non-root, read-only root filesystem,
    no privilege escalation, all capabilities dropped, RuntimeDefault seccomp, no host
    namespaces or ports, and no hostPath volume unless --allow-hostpath;
  * no secret material: no Secret object, no PEM private key, no 64-hex-char or long base64
    string outside checksums and digests, no literal value in a secret-looking env var, and
    none of the --forbid strings;
  * the broker's contract: a one-replica StatefulSet with a volumeClaimTemplate, args
    ["serve", "--config", "/etc/jitbroker/jitbroker.toml"], probes on the ops port, the
    Workload API socket, the standard labels, and a jitbroker.toml whose keys are exactly the
    broker's config keys and whose paths and ports agree with the pod spec.
Exit status: 0 when everything passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import jsonschema
import yaml

try:
    import tomllib  # Python 3.11+
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

import kubernetes_validate
from kubernetes_validate.utils import SchemaNotFoundError

HERE = Path(__file__).resolve().parent
CRD_SCHEMAS = {
    ("spire.spiffe.io/v1alpha1", "ClusterSPIFFEID"): HERE / "clusterspiffeid.schema.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): HERE / "servicemonitor.schema.json",
}
POD_KINDS = {"StatefulSet", "Deployment", "DaemonSet", "ReplicaSet", "Job", "Pod"}
RESTRICTED_VOLUME_TYPES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}
STANDARD_LABELS = (
    "app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by", "helm.sh/chart",
)

# The broker's config format (the Rust side rejects unknown keys; so does this check).
TOP_KEYS = {
    "listen", "ops_listen", "data_dir", "kek_file", "policy_file", "admin_ids", "approver_ids",
    "max_ttl_seconds", "default_ttl_seconds", "max_active_tasks_per_identity",
    "max_credentials_per_task", "approval_ttl_seconds", "max_delegation_depth", "log_format", "jwt_issuer", "identity", "resources",
    "retention", "store", "gateway", "oauth", "server",
}
REQUIRED_TOP = {"data_dir", "kek_file", "policy_file", "identity"}
IDENTITY_KEYS = {
    "source", "trust_domain", "authorized_trust_domains", "workload_api_socket", "jwt_audience",
    "svid_file", "svid_key_file", "bundle_file",
}
RESOURCE_KEYS = {"kind", "actions", "verifiers", "max_ttl_seconds", "inject", "oauth_resource"}
INJECT_KEYS = {"header", "format", "gateway_only"}
GATEWAY_KEYS = {
    "ids", "task_header", "credential_ttl_seconds", "reuse_min_remaining_seconds", "max_body_bytes",
    "strip_headers", "tool_arguments", "routes", "forward_auth_listen", "forward_auth_path",
}
ROUTE_KEYS = {"name", "host", "path_prefix", "methods", "mcp_methods", "mcp_tools", "resource", "action"}
RETENTION_KEYS = {"ended_records_seconds", "audit_entries_in_store", "audit_segment_entries"}
STORE_KEYS = {"cache_mb", "min_free_mb"}
SERVER_KEYS = {
    "max_connections",
    "max_connections_per_remote",
    "max_concurrent_streams",
    "max_concurrent_requests",
    "request_timeout_ms",
    "handshake_timeout_ms",
    "idle_timeout_ms",
    "keepalive_interval_ms",
    "keepalive_timeout_ms",
    "max_pending_reset_streams",
    "max_local_error_reset_streams",
    "max_message_bytes",
    "max_header_list_bytes",
    "requests_per_remote_per_second",
    "connections_per_remote_per_second",
    "requests_per_identity_per_second",
    "auth_failure_summary_seconds",
}
SPIFFE_ID = re.compile(r"^spiffe://[a-z0-9._-]+(/[A-Za-z0-9._-]+)+$")
EXPECTED_ARGS = ["serve", "--config", "/etc/jitbroker/jitbroker.toml"]


class Report:
    def __init__(self, name: str) -> None:
        self.name = name
        self.errors: list[str] = []
        self.notes: list[str] = []

    def err(self, where: str, msg: str) -> None:
        self.errors.append(f"{where}: {msg}")

    def note(self, msg: str) -> None:
        self.notes.append(msg)


def ident(doc: dict) -> str:
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"


# ---- schemas ------------------------------------------------------------------------------------

def check_schemas(docs: list[dict], versions: list[str], rep: Report) -> None:
    validated = {}
    for doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key in CRD_SCHEMAS:
            schema = json.loads(CRD_SCHEMAS[key].read_text())
            validator = jsonschema.Draft202012Validator(schema)
            errs = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
            for e in errs:
                path = ".".join(str(p) for p in e.path) or "(root)"
                rep.err(ident(doc), f"{CRD_SCHEMAS[key].name}: {path}: {e.message}")
            if not errs:
                validated.setdefault(f"{key[1]} (CRD schema {CRD_SCHEMAS[key].name})", 0)
            continue
        for v in versions:
            try:
                kubernetes_validate.validate(doc, v, strict=True)
                validated[f"k8s {v}"] = validated.get(f"k8s {v}", 0) + 1
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path) or "(root)"
                rep.err(ident(doc), f"Kubernetes {v} schema (strict): {path}: {e.message}")
            except SchemaNotFoundError as e:
                rep.err(ident(doc), f"no Kubernetes {v} schema: {e.message}")
    for what, n in validated.items():
        rep.note(f"schema ok: {what}" + (f" ({n} objects)" if n else ""))


# ---- pod security -------------------------------------------------------------------------------

def pod_spec(doc: dict) -> dict | None:
    kind = doc.get("kind")
    if kind == "Pod":
        return doc.get("spec") or {}
    if kind in POD_KINDS:
        tpl = (doc.get("spec") or {}).get("template") or {}
        return tpl.get("spec") or {}
    return None


def check_pod_security(doc: dict, spec: dict, allow_hostpath: bool, rep: Report) -> None:
    where = ident(doc)
    psc = spec.get("securityContext") or {}
    for f in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(f):
            rep.err(where, f"{f} is set")
    if psc.get("runAsUser") == 0:
        rep.err(where, "pod securityContext.runAsUser is 0 (root)")
    containers = list(spec.get("initContainers") or []) + list(spec.get("containers") or [])
    if not containers:
        rep.err(where, "no containers")
    for c in containers:
        cw = f"{where} container {c.get('name')}"
        sc = c.get("securityContext") or {}

        def eff(field: str):
            return sc[field] if field in sc else psc.get(field)

        if eff("runAsNonRoot") is not True:
            rep.err(cw, "runAsNonRoot is not true")
        uid = eff("runAsUser")
        if uid is None or uid == 0:
            rep.err(cw, f"runAsUser is {uid!r}: must be a non-zero uid (65532)")
        if sc.get("readOnlyRootFilesystem") is not True:
            rep.err(cw, "readOnlyRootFilesystem is not true (writable root filesystem)")
        if sc.get("allowPrivilegeEscalation") is not False:
            rep.err(cw, "allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            rep.err(cw, "privileged")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            rep.err(cw, "capabilities.drop does not include ALL")
        if caps.get("add"):
            rep.err(cw, f"capabilities.add: {caps['add']}")
        seccomp = (eff("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            rep.err(cw, f"seccompProfile.type is {seccomp!r}, not RuntimeDefault")
        for p in c.get("ports") or []:
            if p.get("hostPort"):
                rep.err(cw, f"hostPort {p['hostPort']}")
    mounts = {m["name"]: m for c in containers for m in (c.get("volumeMounts") or [])}
    for vol in spec.get("volumes") or []:
        types = set(vol) - {"name"}
        if "hostPath" in types:
            if not allow_hostpath:
                rep.err(where, f"volume {vol['name']} is a hostPath ({vol['hostPath'].get('path')}) but none was asked for")
            elif not (mounts.get(vol["name"]) or {}).get("readOnly"):
                rep.err(where, f"hostPath volume {vol['name']} is not mounted readOnly")
            continue
        bad = types - RESTRICTED_VOLUME_TYPES
        if bad:
            rep.err(where, f"volume {vol['name']} of type {sorted(bad)} is not allowed by the restricted Pod Security Standard")


# ---- secrets ------------------------------------------------------------------------------------

HEX64 = re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{64}(?![0-9a-fA-F])")
B64_LONG = re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{43,}={0,2}(?![A-Za-z0-9+/=])")
PEM_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
SECRETISH_ENV = re.compile(r"(KEY|SECRET|TOKEN|PASSW|KEK|CREDENTIAL)", re.I)


def walk_strings(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk_strings(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk_strings(v, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


def check_secrets(docs: list[dict], forbid: list[str], rep: Report) -> None:
    for doc in docs:
        where = ident(doc)
        if doc.get("kind") == "Secret":
            rep.err(where, "the chart renders a Secret: secret values must come from an existing Secret")
        for path, s in walk_strings(doc):
            allowed_hash = "checksum/" in path or path.endswith(".image")
            if PEM_KEY.search(s):
                rep.err(where, f"{path}: contains a PEM private key")
            if not allowed_hash and HEX64.search(s):
                rep.err(where, f"{path}: contains a 64-hex-character string (key material?)")
            if not allowed_hash:
                # 32 random bytes in base64 are 44 characters; random text mixes cases and digits.
                for m in B64_LONG.finditer(s):
                    t = m.group(0)
                    if re.search(r"[A-Z]", t) and re.search(r"[a-z]", t) and re.search(r"[0-9+]", t):
                        rep.err(where, f"{path}: contains a long base64-like string ({t[:6]}...)")
            for f in forbid:
                if f and f in s:
                    rep.err(where, f"{path}: contains the forbidden string {f[:6]}...")
        spec = pod_spec(doc)
        if spec is None:
            continue
        for c in list(spec.get("initContainers") or []) + list(spec.get("containers") or []):
            for e in c.get("env") or []:
                if "value" in e and SECRETISH_ENV.search(e.get("name", "")) and e["value"]:
                    rep.err(where, f"env {e['name']} carries a literal value; use valueFrom/secretKeyRef or a file")


# ---- the broker's contract ----------------------------------------------------------------------

def check_labels(docs: list[dict], rep: Report) -> None:
    for doc in docs:
        labels = (doc.get("metadata") or {}).get("labels") or {}
        missing = [l for l in STANDARD_LABELS if l not in labels]
        if missing:
            rep.err(ident(doc), f"missing labels {missing}")


def find(docs, kind):
    return [d for d in docs if d.get("kind") == kind]


def check_config_toml(text: str, rep: Report) -> dict | None:
    try:
        cfg = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        rep.err("ConfigMap jitbroker.toml", f"not valid TOML: {e}")
        return None
    w = "jitbroker.toml"
    for k in set(cfg) - TOP_KEYS:
        rep.err(w, f"unknown key {k!r}")
    for k in REQUIRED_TOP - set(cfg):
        rep.err(w, f"missing key {k!r}")
    ident_cfg = cfg.get("identity") or {}
    for k in set(ident_cfg) - IDENTITY_KEYS:
        rep.err(w, f"unknown key identity.{k}")
    if ident_cfg.get("source") != "spire":
        rep.err(w, f"identity.source is {ident_cfg.get('source')!r}, expected \"spire\"")
    for field in ("admin_ids", "approver_ids"):
        for i in cfg.get(field, []):
            if not SPIFFE_ID.match(i):
                rep.err(w, f"{field}: {i!r} is not a SPIFFE ID")
    if cfg.get("log_format") not in (None, "json", "plain"):
        rep.err(w, f"log_format {cfg.get('log_format')!r}")
    mx = cfg.get("max_ttl_seconds", 3600)
    if not 1 <= cfg.get("default_ttl_seconds", 900) <= mx <= 86400:
        rep.err(w, "TTLs out of range (1 <= default_ttl_seconds <= max_ttl_seconds <= 86400)")
    for k in set(cfg.get("retention") or {}) - RETENTION_KEYS:
        rep.err(w, f"unknown key retention.{k}")
    for k in set(cfg.get("store") or {}) - STORE_KEYS:
        rep.err(w, f"unknown key store.{k}")
    for k, v in (cfg.get("server") or {}).items():
        if k not in SERVER_KEYS:
            rep.err(w, f"unknown key server.{k}")
        elif not isinstance(v, int) or v < 1:
            rep.err(w, f"server.{k} = {v!r} must be a positive integer")
    cache = (cfg.get("store") or {}).get("cache_mb", 256)
    if not 16 <= cache <= 65536:
        rep.err(w, f"store.cache_mb {cache} out of range (16..65536)")
    for name, r in (cfg.get("resources") or {}).items():
        for k in set(r) - RESOURCE_KEYS:
            rep.err(w, f"unknown key resources.{name}.{k}")
        if r.get("kind") not in ("token", "jwt", "x509"):
            rep.err(w, f"resources.{name}.kind is {r.get('kind')!r}")
        if not r.get("actions"):
            rep.err(w, f"resources.{name}.actions is empty")
        for v in r.get("verifiers", []):
            if not SPIFFE_ID.match(v):
                rep.err(w, f"resources.{name}.verifiers: {v!r} is not a SPIFFE ID")
        inject = r.get("inject")
        if inject is not None:
            for k in set(inject) - INJECT_KEYS:
                rep.err(w, f"unknown key resources.{name}.inject.{k}")
            if r.get("kind") not in ("token", "jwt"):
                rep.err(w, f"resources.{name}.inject on kind {r.get('kind')!r} (token or jwt only)")
            if inject.get("format", "{secret}").count("{secret}") != 1:
                rep.err(w, f"resources.{name}.inject.format must hold {{secret}} exactly once")
    gw = cfg.get("gateway")
    if gw is not None:
        for k in set(gw) - GATEWAY_KEYS:
            rep.err(w, f"unknown key gateway.{k}")
        if not gw.get("ids"):
            rep.err(w, "gateway.ids is empty")
        for i in gw.get("ids", []):
            if not SPIFFE_ID.match(i):
                rep.err(w, f"gateway.ids: {i!r} is not a SPIFFE ID")
        resources = cfg.get("resources") or {}
        for rt in gw.get("routes", []):
            for k in set(rt) - ROUTE_KEYS:
                rep.err(w, f"unknown key gateway.routes.{k} (route {rt.get('name')!r})")
            res = resources.get(rt.get("resource"))
            if res is None or "inject" not in res or rt.get("action") not in res.get("actions", []):
                rep.err(w, f"gateway route {rt.get('name')!r}: {rt.get('resource')!r} is not a resource "
                        f"with an inject section and the action {rt.get('action')!r}")
    return cfg


def check_policy(text: str, rep: Report) -> None:
    body = re.sub(r"//[^\n]*", "", text)
    effects = len(re.findall(r"\b(permit|forbid)\s*\(", body))
    ids = len(re.findall(r"@id\s*\(", body))
    if effects == 0:
        rep.note("policy.cedar has no policy: every request is denied")
    if ids != effects:
        rep.err("policy.cedar", f"{effects} policies but {ids} @id annotations: give every policy an @id")


def check_contract(docs: list[dict], allow_hostpath: bool, rep: Report, extract: str | None) -> None:
    sts = find(docs, "StatefulSet")
    if len(sts) != 1:
        rep.err("chart", f"expected exactly one StatefulSet, found {len(sts)}")
        return
    st = sts[0]
    where = ident(st)
    sspec = st["spec"]
    if not isinstance(sspec.get("replicas", 1), int) or sspec.get("replicas", 1) > 1:
        rep.err(where, f"replicas = {sspec.get('replicas')}: sled is single-writer")
    vcts = sspec.get("volumeClaimTemplates") or []
    if not vcts:
        rep.err(where, "no volumeClaimTemplates: data_dir would not be persistent")
    pspec = sspec["template"]["spec"]
    containers = pspec["containers"]
    c = next((x for x in containers if x["name"] == "jitbroker"), None)
    if c is None:
        rep.err(where, "no container named jitbroker")
        return
    if c.get("args") != EXPECTED_ARGS:
        rep.err(where, f"args are {c.get('args')}, expected {EXPECTED_ARGS}")
    ports = {p["name"]: p["containerPort"] for p in c.get("ports") or []}
    for n in ("grpc", "ops"):
        if n not in ports:
            rep.err(where, f"no container port named {n}")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        hg = (c.get(probe) or {}).get("httpGet") or {}
        if hg.get("path") != path or hg.get("port") not in ("ops", ports.get("ops")):
            rep.err(where, f"{probe} is not an httpGet of {path} on the ops port")
    env = {e["name"]: e.get("value") for e in c.get("env") or []}
    sock = env.get("SPIFFE_ENDPOINT_SOCKET")
    if not sock or not sock.startswith("unix:///"):
        rep.err(where, f"SPIFFE_ENDPOINT_SOCKET is {sock!r}")
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts") or []}
    vols = {v["name"]: v for v in pspec.get("volumes") or []}
    if sock:
        sock_dir = os.path.dirname(sock[len("unix://"):])
        m = mounts.get(sock_dir)
        if not m:
            rep.err(where, f"nothing is mounted at {sock_dir}, the Workload API socket's directory")
        else:
            v = vols.get(m["name"], {})
            if "csi" in v:
                if v["csi"].get("driver") != "csi.spiffe.io":
                    rep.note(f"Workload API through CSI driver {v['csi'].get('driver')}")
            elif "hostPath" in v:
                if not allow_hostpath:
                    rep.err(where, "Workload API through a hostPath that was not asked for")
            else:
                rep.err(where, f"volume {m['name']} at {sock_dir} is neither a CSI nor a hostPath volume")
    data_mount = mounts.get("/var/lib/jitbroker")
    if not data_mount or data_mount["name"] not in {v["metadata"]["name"] for v in vcts}:
        rep.err(where, "/var/lib/jitbroker is not mounted from the volumeClaimTemplate")

    # Files under /etc/jitbroker: which ConfigMap keys / Secret keys land where.
    files: dict[str, tuple[str, str, str]] = {}
    for mpath, m in mounts.items():
        v = vols.get(m["name"], {})
        sources = []
        if "projected" in v:
            sources = v["projected"].get("sources") or []
        elif "configMap" in v:
            sources = [{"configMap": v["configMap"]}]
        elif "secret" in v:
            sources = [{"secret": v["secret"]}]
        for src in sources:
            for kind, obj in src.items():
                if kind not in ("configMap", "secret"):
                    continue
                oname = obj.get("name") or obj.get("secretName")
                for it in obj.get("items") or []:
                    files[os.path.join(mpath, it["path"])] = (kind, oname, it["key"])
        if "secret" in v:
            oname = v["secret"].get("secretName")
            for it in v["secret"].get("items") or []:
                files[os.path.join(mpath, it["path"])] = ("secret", oname, it["key"])

    cm_name = None
    cfg_file = files.get(EXPECTED_ARGS[2])
    if not cfg_file or cfg_file[0] != "configMap":
        rep.err(where, f"{EXPECTED_ARGS[2]} is not mounted from a ConfigMap")
    else:
        cm_name = cfg_file[1]
    cms = {d["metadata"]["name"]: d for d in find(docs, "ConfigMap")}
    if cm_name not in cms:
        rep.err("chart", f"ConfigMap {cm_name} holding jitbroker.toml is not rendered")
        return
    data = cms[cm_name].get("data") or {}
    toml_text = data.get(cfg_file[2], "")
    cfg = check_config_toml(toml_text, rep)
    if cfg is None:
        return
    pol = files.get(cfg.get("policy_file", ""))
    if not pol or pol[0] != "configMap" or pol[1] != cm_name:
        rep.err("jitbroker.toml", f"policy_file {cfg.get('policy_file')} is not a key of ConfigMap {cm_name} in the pod")
        pol_text = ""
    else:
        pol_text = data.get(pol[2], "")
        check_policy(pol_text, rep)
    kek = files.get(cfg.get("kek_file", ""))
    if not kek or kek[0] != "secret":
        rep.err("jitbroker.toml", f"kek_file {cfg.get('kek_file')} is not mounted from a Secret")
    else:
        rep.note(f"KEK: Secret {kek[1]} key {kek[2]} -> {cfg['kek_file']}")
    for key, pname in (("listen", "grpc"), ("ops_listen", "ops")):
        addr = cfg.get(key, "")
        if pname in ports and not addr.endswith(f":{ports[pname]}"):
            rep.err("jitbroker.toml", f"{key} = {addr!r} does not match container port {pname} ({ports[pname]})")
    if not cfg.get("listen", "").startswith("0.0.0.0:"):
        rep.err("jitbroker.toml", "listen must bind 0.0.0.0 in a pod")
    if cfg.get("data_dir") != "/var/lib/jitbroker":
        rep.err("jitbroker.toml", f"data_dir {cfg.get('data_dir')} is not the PVC mount")
    wsock = (cfg.get("identity") or {}).get("workload_api_socket")
    if wsock and wsock != sock:
        rep.err("jitbroker.toml", f"identity.workload_api_socket {wsock} != SPIFFE_ENDPOINT_SOCKET {sock}")

    # Services: API and ops ports.
    svcs = find(docs, "Service")
    if not any({p.get("name") for p in s["spec"]["ports"]} >= {"grpc", "ops"} and s["spec"].get("clusterIP") != "None" for s in svcs):
        rep.err("chart", "no ClusterIP Service exposing the grpc and ops ports")
    # ClusterSPIFFEID DNS names must cover the Service.
    for csid in find(docs, "ClusterSPIFFEID"):
        names = csid["spec"].get("dnsNameTemplates") or []
        for s in svcs:
            if s["spec"].get("clusterIP") == "None":
                continue
            want = f"{s['metadata']['name']}.{s['metadata']['namespace']}.svc"
            if want not in names:
                rep.err(ident(csid), f"dnsNameTemplates lack {want}")
        pod_labels = sspec["template"]["metadata"]["labels"]
        sel = (csid["spec"].get("podSelector") or {}).get("matchLabels") or {}
        if not sel or any(pod_labels.get(k) != v for k, v in sel.items()):
            rep.err(ident(csid), "podSelector does not select the broker pod")

    if extract:
        out = Path(extract)
        out.mkdir(parents=True, exist_ok=True)
        (out / "jitbroker.toml").write_text(toml_text)
        (out / "policy.cedar").write_text(pol_text)
        rep.note(f"extracted jitbroker.toml and policy.cedar to {out}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rendered")
    ap.add_argument("--kube-version", action="append", default=[])
    ap.add_argument("--allow-hostpath", action="store_true")
    ap.add_argument("--expect-kind", action="append", default=[])
    ap.add_argument("--extract-config")
    ap.add_argument("--forbid", action="append", default=[])
    ap.add_argument("--name", default=None)
    a = ap.parse_args()

    rep = Report(a.name or a.rendered)
    try:
        docs = [d for d in yaml.safe_load_all(Path(a.rendered).read_text()) if d]
    except yaml.YAMLError as e:
        print(f"FAIL {rep.name}: rendered output is not valid YAML: {e}")
        return 1
    if not docs:
        print(f"FAIL {rep.name}: nothing rendered")
        return 1
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "apiVersion" not in d:
            rep.err("document", f"not a Kubernetes object: {str(d)[:80]}")
    docs = [d for d in docs if isinstance(d, dict) and "kind" in d]
    kinds = sorted({d["kind"] for d in docs})
    for k in a.expect_kind:
        if k not in kinds:
            rep.err("chart", f"expected a {k}, none rendered")

    def pod_security() -> None:
        for d in docs:
            spec = pod_spec(d)
            if spec is not None:
                check_pod_security(d, spec, a.allow_hostpath, rep)

    phases = [
        ("schemas", lambda: check_schemas(docs, a.kube_version or [kubernetes_validate.utils.latest_version()], rep)),
        ("pod security", pod_security),
        ("secrets", lambda: check_secrets(docs, a.forbid, rep)),
        ("labels", lambda: check_labels(docs, rep)),
        ("broker contract", lambda: check_contract(docs, a.allow_hostpath, rep, a.extract_config)),
    ]
    for phase, run in phases:
        try:
            run()
        except Exception as e:  # a malformed render must be reported, not crash the checker
            rep.err(phase, f"cannot check ({type(e).__name__}: {e}); the render is malformed")

    print(f"{rep.name}: {len(docs)} objects: {', '.join(kinds)}")
    for n in rep.notes:
        print(f"  - {n}")
    for e in rep.errors:
        print(f"  ERROR {e}")
    if rep.errors:
        print(f"FAIL {rep.name}: {len(rep.errors)} problem(s)")
        return 1
    print(f"ok   {rep.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
