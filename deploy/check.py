#!/usr/bin/env python3
"""The checks of deploy/check.sh that need Python (PyYAML and jsonschema, both dependencies of
kubernetes-validate). One subcommand per check; each prints nothing and exits 0 when the check
passes, or prints what is wrong and exits 1.

  check.py builtin RENDERED OUT     write the objects of built-in kinds to OUT (for
                                    kubernetes-validate); fail on an object without a kind
  check.py crds RENDERED            validate ServiceMonitor, PrometheusRule and
                                    SecurityContextConstraints objects by structure
  check.py consistency RENDERED     the objects agree with each other (selectors, ports,
                                    service account, SCC grants, the agent API's port, token
                                    Secret and viewer Role)
  check.py privilege RENDERED       least privilege: no Secrets or wildcards in RBAC, the SCC's
                                    volume types exactly the DaemonSet's, its host paths the
                                    known ones, a NetworkPolicy on every agent port
  check.py groups RENDERED RULES    the PrometheusRule's groups equal the rules file's groups
  check.py promql RULES             the rules use only meshguard metrics, labels and values
                                    that the agent exports
  check.py dashboard JSON           the Grafana dashboard parses, uses ${DS_PROMETHEUS}, and
                                    queries only metrics the agent exports
"""

import json
import re
import sys

import jsonschema
import yaml

# --- The agent's metrics (its interface; keep in step with the agent) ---------------------------

FLOW_LABELS = {"verdict", "reason", "direction", "src_namespace", "src_workload",
               "dst_namespace", "dst_workload"}
METRICS = {
    "meshguard_flows_total": FLOW_LABELS,
    "meshguard_flow_bytes_total": FLOW_LABELS,
    "meshguard_events_lost_total": {"source"},
    "meshguard_map_entries": {"map"},
    "meshguard_map_capacity": {"map"},
    "meshguard_flows_tracked": set(),
    "meshguard_flows_recovered_total": set(),
    "meshguard_store_evicted_total": {"store"},
    "meshguard_programs_attached": set(),
    "meshguard_degraded": set(),
    "meshguard_reconcile_passes_total": {"trigger"},
    "meshguard_reconcile_anomalies_total": {"kind"},
    "meshguard_kernel_repairs_total": {"action"},
    "meshguard_connections_refused_total": {"listener", "reason"},
    "meshguard_policy_violations_total": {"dst_namespace", "dst_workload", "policy_mode", "reason"},
    "meshguard_enforcement_actions_total": {"mode", "enforced_namespace", "enforced_workload",
                                            "reason"},
    "meshguard_inventory_age_seconds": set(),
    "meshguard_build_info": {"version"},
}
# Label values the agent documents; other labels take free values.
LABEL_VALUES = {
    "verdict": {"mtls", "bypass-plaintext", "bypass-tls", "plaintext", "unmeshed", "expected",
                "in-pod", "pending"},
    "source": {"ringbuf_full", "flow_map_full", "flow_evicted", "flow_evicted_unseen",
               "undecodable", "agent_table_evicted"},
    "map": {"flows"},
    "store": {"recent", "flagged", "bypass"},
    "policy_mode": {"STRICT", "PERMISSIVE", "DISABLE"},
    "mode": {"audit", "enforce"},
}
# Labels that Prometheus and the ServiceMonitor (its node relabeling) add to every series.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "endpoint", "container",
                 "node"}

# Kinds that have no schema in kubernetes-validate: validated by structure here instead.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("security.openshift.io/v1", "SecurityContextConstraints"),
}


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def fail(problems):
    for p in problems:
        print(p)
    return 1 if problems else 0


def name_of(doc):
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


# --- builtin -------------------------------------------------------------------------------------

def cmd_builtin(rendered, out):
    docs = load_all(rendered)
    problems = [f"object without apiVersion/kind: {d}" for d in docs
                if not d.get("apiVersion") or not d.get("kind")]
    builtin = [d for d in docs if (d.get("apiVersion"), d.get("kind")) not in CRD_KINDS]
    with open(out, "w") as f:
        yaml.safe_dump_all(builtin, f, sort_keys=False)
    return fail(problems)


# --- crds: structural schemas --------------------------------------------------------------------
# Subsets of the CRDs' OpenAPI schemas: the fields these manifests may use, with their types, and
# additionalProperties false so that a misspelt field fails instead of being ignored.

def obj(props, required=(), extra=False):
    return {"type": "object", "properties": props, "required": list(required),
            "additionalProperties": extra}


STR = {"type": "string", "minLength": 1}
BOOL = {"type": "boolean"}
INT = {"type": "integer"}
STRS = {"type": "array", "items": STR}
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
LABEL_NAME = {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}
# The Prometheus Operator's Duration pattern.
DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
                                         r"(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
METADATA = obj({"name": STR, "namespace": STR, "labels": STR_MAP, "annotations": STR_MAP},
               ["name"])
LABEL_SELECTOR = obj({
    "matchLabels": STR_MAP,
    "matchExpressions": {"type": "array", "items": obj({
        "key": STR, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
        "values": STRS}, ["key", "operator"])},
})
RELABEL = obj({
    "sourceLabels": {"type": "array", "items": LABEL_NAME}, "separator": {"type": "string"},
    "targetLabel": LABEL_NAME, "regex": {"type": "string"}, "modulus": INT,
    "replacement": {"type": "string"},
    "action": {"enum": ["replace", "keep", "drop", "hashmod", "labelmap", "labeldrop",
                        "labelkeep", "lowercase", "uppercase", "keepequal", "dropequal"]},
})


def kind_schema(api_version, kind, top, required=()):
    props = {"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": METADATA}
    props.update(top)
    return obj(props, ["apiVersion", "kind", "metadata", *required])


SERVICE_MONITOR = kind_schema("monitoring.coreos.com/v1", "ServiceMonitor", {"spec": obj({
    "selector": LABEL_SELECTOR,
    "namespaceSelector": obj({"any": BOOL, "matchNames": STRS}),
    "jobLabel": STR, "targetLabels": STRS, "podTargetLabels": STRS,
    "endpoints": {"type": "array", "minItems": 1, "items": obj({
        "port": STR, "targetPort": {"type": ["string", "integer"]}, "path": STR,
        "scheme": {"enum": ["http", "https"]}, "interval": DURATION, "scrapeTimeout": DURATION,
        "honorLabels": BOOL, "honorTimestamps": BOOL,
        "relabelings": {"type": "array", "items": RELABEL},
        "metricRelabelings": {"type": "array", "items": RELABEL},
    }, ["port"])},
}, ["selector", "endpoints"])}, ["spec"])

RULE = obj({"alert": STR, "record": STR, "expr": {"type": ["string", "integer"]},
            "for": DURATION, "keep_firing_for": DURATION, "labels": STR_MAP,
            "annotations": STR_MAP}, ["expr"])
RULE["oneOf"] = [{"required": ["alert"]}, {"required": ["record"]}]
RULE_GROUPS = {"type": "array", "minItems": 1, "items": obj({
    "name": STR, "interval": DURATION, "limit": INT,
    "rules": {"type": "array", "minItems": 1, "items": RULE},
}, ["name", "rules"])}
PROMETHEUS_RULE = kind_schema("monitoring.coreos.com/v1", "PrometheusRule",
                              {"spec": obj({"groups": RULE_GROUPS}, ["groups"])}, ["spec"])

# Capability names without the CAP_ prefix, as the SCC API wants them.
CAPS = {"type": "array", "items": {"type": "string", "pattern": "^((?!CAP_)[A-Z_]+|\\*)$"}}
GROUP_STRATEGY = obj({"type": {"enum": ["MustRunAs", "RunAsAny"]},
                      "ranges": {"type": "array", "items": obj({"min": INT, "max": INT})}},
                     ["type"])
VOLUME_TYPES = ["*", "none", "awsElasticBlockStore", "azureDisk", "azureFile", "cephFS", "cinder",
                "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "fc", "flexVolume",
                "flocker", "gcePersistentDisk", "gitRepo", "glusterfs", "hostPath", "iscsi",
                "nfs", "persistentVolumeClaim", "photonPersistentDisk", "portworxVolume",
                "projected", "quobyte", "rbd", "scaleIO", "secret", "storageOS",
                "vsphere", "image"]
SCC_BOOLS = ["allowHostDirVolumePlugin", "allowHostIPC", "allowHostNetwork", "allowHostPID",
             "allowHostPorts", "allowPrivilegedContainer", "readOnlyRootFilesystem"]
SECURITY_CONTEXT_CONSTRAINTS = kind_schema("security.openshift.io/v1", "SecurityContextConstraints", {
    **{b: BOOL for b in SCC_BOOLS},
    "allowPrivilegeEscalation": BOOL, "defaultAllowPrivilegeEscalation": BOOL,
    "allowedCapabilities": CAPS, "defaultAddCapabilities": CAPS, "requiredDropCapabilities": CAPS,
    "allowedFlexVolumes": {"type": "array"}, "allowedUnsafeSysctls": STRS, "forbiddenSysctls": STRS,
    "volumes": {"type": "array", "items": {"enum": VOLUME_TYPES}},
    "runAsUser": obj({"type": {"enum": ["MustRunAs", "MustRunAsRange", "MustRunAsNonRoot",
                                        "RunAsAny"]},
                      "uid": INT, "uidRangeMin": INT, "uidRangeMax": INT}, ["type"]),
    "seLinuxContext": obj({"type": {"enum": ["MustRunAs", "RunAsAny"]},
                           "seLinuxOptions": obj({"user": STR, "role": STR, "type": STR,
                                                  "level": STR})}, ["type"]),
    "fsGroup": GROUP_STRATEGY, "supplementalGroups": GROUP_STRATEGY,
    "seccompProfiles": STRS, "priority": {"type": ["integer", "null"]},
    "users": STRS, "groups": STRS,
}, SCC_BOOLS)

SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
    ("security.openshift.io/v1", "SecurityContextConstraints"): SECURITY_CONTEXT_CONSTRAINTS,
}


def cmd_crds(rendered):
    problems = []
    for doc in load_all(rendered):
        schema = SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
        if schema is None:
            continue
        validator = jsonschema.Draft202012Validator(schema)
        for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.path)):
            path = ".".join(str(p) for p in err.path) or "(top)"
            problems.append(f"{name_of(doc)}: {path}: {err.message}")
        if doc["kind"] == "SecurityContextConstraints":
            overlap = (set(doc.get("allowedCapabilities") or [])
                       & set(doc.get("requiredDropCapabilities") or []))
            if overlap:
                problems.append(f"{name_of(doc)}: capabilities both allowed and dropped: "
                                f"{sorted(overlap)}")
    return fail(problems)


# --- consistency ---------------------------------------------------------------------------------

def subset(small, big):
    return all(big.get(k) == v for k, v in (small or {}).items())


def cmd_consistency(rendered):
    docs = load_all(rendered)
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    problems = []

    def one(kind):
        found = by_kind.get(kind, [])
        if len(found) != 1:
            problems.append(f"expected one {kind}, found {len(found)}")
            return None
        return found[0]

    ns_obj, ds, svc, sm = one("Namespace"), one("DaemonSet"), one("Service"), one("ServiceMonitor")
    sa, crb = one("ServiceAccount"), one("ClusterRoleBinding")
    if None in (ns_obj, ds, svc, sm, sa, crb):
        return fail(problems)
    ns = ns_obj["metadata"]["name"]

    for d in docs:
        if d["kind"] in ("Namespace", "ClusterRole", "ClusterRoleBinding",
                         "SecurityContextConstraints"):
            continue
        if d["metadata"].get("namespace") != ns:
            problems.append(f"{name_of(d)} is in namespace {d['metadata'].get('namespace')!r}, "
                            f"not {ns!r}")

    pod = ds["spec"]["template"]
    pod_labels = pod["metadata"].get("labels", {})
    spec = pod["spec"]
    if not subset(ds["spec"]["selector"].get("matchLabels"), pod_labels):
        problems.append("the DaemonSet's selector does not match its pod template's labels")
    if not svc["spec"].get("selector") or not subset(svc["spec"]["selector"], pod_labels):
        problems.append("the Service's selector does not select the DaemonSet's pods")
    if not subset(sm["spec"]["selector"].get("matchLabels"), svc["metadata"].get("labels", {})):
        problems.append("the ServiceMonitor's selector does not select the Service")

    containers = spec["containers"]
    container_ports = {p.get("name") for c in containers for p in c.get("ports", [])}
    svc_ports = {p.get("name") for p in svc["spec"]["ports"]}
    for p in svc["spec"]["ports"]:
        if isinstance(p.get("targetPort"), str) and p["targetPort"] not in container_ports:
            problems.append(f"Service port {p['name']} targets unknown container port "
                            f"{p['targetPort']}")
    for ep in sm["spec"]["endpoints"]:
        if ep["port"] not in svc_ports:
            problems.append(f"ServiceMonitor scrapes port {ep['port']}, which the Service lacks")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for c in containers:
        if not re.search(r"[:@]", c["image"]):
            problems.append(f"container {c['name']} image {c['image']!r} has no tag or digest "
                            "(kustomize images: not applied?)")
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            port = c.get(probe, {}).get("httpGet", {}).get("port")
            if isinstance(port, str) and port not in container_ports:
                problems.append(f"{c['name']} {probe} uses unknown port {port}")
        for m in c.get("volumeMounts", []):
            if m["name"] not in volumes:
                problems.append(f"{c['name']} mounts unknown volume {m['name']}")

    sa_name = spec.get("serviceAccountName", "default")
    if sa["metadata"]["name"] != sa_name:
        problems.append(f"the DaemonSet runs as {sa_name}, the ServiceAccount is "
                        f"{sa['metadata']['name']}")
    if {"kind": "ServiceAccount", "name": sa_name, "namespace": ns} not in crb.get("subjects", []):
        problems.append(f"the ClusterRoleBinding does not bind {ns}/{sa_name}")

    for scc in by_kind.get("SecurityContextConstraints", []):
        problems += scc_admits(scc, docs, ds, ns, sa_name)
    problems += api_access(docs, containers, volumes)
    return fail(problems)


def flag(args, name):
    """The value of `name` in a container's args (`name VALUE` or `name=VALUE`), or None."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


VIEWER_ROLE = "meshguard-viewer"


def api_access(docs, containers, volumes):
    """What `meshguard flows --cluster` relies on: the agent serves its TCP API on the container
    port named `api`, reads its token from a mounted Secret, and the meshguard-viewer Role grants
    exactly `list` pods and `get` pods/proxy (the token reaches people by --token-file, not by
    a Role that lets them read the Secret)."""
    problems, secrets = [], set()
    for c in containers:
        args = c.get("args", [])
        addr = flag(args, "--api-addr")
        if addr is None:
            continue
        port = int(addr.rsplit(":", 1)[1])
        api_ports = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == "api"]
        if api_ports != [port]:
            problems.append(f"{c['name']} serves its API on port {port}, but its container "
                            f"ports named api are {api_ports}")
        token_file = flag(args, "--api-token-file") or ""
        found = [volumes[m["name"]]["secret"]["secretName"] for m in c.get("volumeMounts", [])
                 if token_file.startswith(m["mountPath"].rstrip("/") + "/")
                 and "secret" in volumes.get(m["name"], {})]
        if not found:
            problems.append(f"{c['name']}: --api-token-file {token_file!r} is not in a mounted "
                            "Secret")
        secrets.update(found)
    if not secrets:
        return problems
    roles = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == VIEWER_ROLE]
    if len(roles) != 1:
        return problems + [f"expected one Role {VIEWER_ROLE}, found {len(roles)}"]
    granted = {(res, verb, tuple(sorted(r.get("resourceNames", []))))
               for r in roles[0].get("rules", []) if r.get("apiGroups") == [""]
               for res in r.get("resources", []) for verb in r.get("verbs", [])}
    others = [r for r in roles[0].get("rules", []) if r.get("apiGroups") != [""]]
    wanted = {("pods", "list", ()), ("pods/proxy", "get", ())}
    if granted != wanted or others:
        problems.append(f"Role {VIEWER_ROLE} must grant exactly {sorted(wanted)}; it grants "
                        f"{sorted(granted)}" + (f" and {others}" if others else ""))
    return problems


def scc_admits(scc, docs, ds, ns, sa_name):
    """What the SCC must allow for the DaemonSet's pods (a subset of OpenShift's admission)."""
    problems = []
    name = scc["metadata"]["name"]
    user = f"system:serviceaccount:{ns}:{sa_name}"
    granted = user in (scc.get("users") or [])
    roles = {d["metadata"]["name"] for d in docs
             if d["kind"] in ("ClusterRole", "Role") and any(
                 "use" in r.get("verbs", []) and "securitycontextconstraints" in r.get("resources", [])
                 and name in r.get("resourceNames", [name]) for r in d.get("rules", []))}
    bound = any(d["roleRef"]["name"] in roles and any(
                    s.get("kind") == "ServiceAccount" and s.get("name") == sa_name
                    and s.get("namespace") == ns for s in d.get("subjects", []))
                for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding"))
    if not (granted and bound):
        problems.append(f"SCC {name}: {user} must be both listed in users and bound to a role "
                        f"with `use` on it (listed: {granted}, bound: {bound})")
    spec = ds["spec"]["template"]["spec"]
    allowed_caps = set(scc.get("allowedCapabilities") or [])
    allowed_volumes = set(scc.get("volumes") or [])
    # The service account token is mounted as a projected volume.
    used_volumes = {"projected"} | {k for v in spec.get("volumes", []) for k in v if k != "name"}
    if "*" not in allowed_volumes and not used_volumes <= allowed_volumes:
        problems.append(f"SCC {name}: volumes {sorted(used_volumes - allowed_volumes)} not allowed")
    if "hostPath" in used_volumes and not scc.get("allowHostDirVolumePlugin"):
        problems.append(f"SCC {name}: hostPath volumes need allowHostDirVolumePlugin")
    for flag, field in (("hostNetwork", "allowHostNetwork"), ("hostPID", "allowHostPID"),
                        ("hostIPC", "allowHostIPC")):
        if spec.get(flag) and not scc.get(field):
            problems.append(f"SCC {name}: the pod uses {flag}")
    for c in spec["containers"]:
        sc = c.get("securityContext", {})
        caps = set(sc.get("capabilities", {}).get("add", []))
        if "*" not in allowed_caps and not caps <= allowed_caps:
            problems.append(f"SCC {name}: capabilities {sorted(caps - allowed_caps)} not allowed")
        if "ALL" in (scc.get("requiredDropCapabilities") or []) and \
                "ALL" not in sc.get("capabilities", {}).get("drop", []):
            problems.append(f"SCC {name}: container {c['name']} must drop ALL")
        if sc.get("privileged") and not scc.get("allowPrivilegedContainer"):
            problems.append(f"SCC {name}: container {c['name']} is privileged")
        if sc.get("allowPrivilegeEscalation", True) and scc.get("allowPrivilegeEscalation") is False:
            problems.append(f"SCC {name}: container {c['name']} must set "
                            "allowPrivilegeEscalation: false")
        if scc.get("readOnlyRootFilesystem") and not sc.get("readOnlyRootFilesystem"):
            problems.append(f"SCC {name}: container {c['name']} needs readOnlyRootFilesystem")
        uid = sc.get("runAsUser", spec.get("securityContext", {}).get("runAsUser"))
        strategy = scc.get("runAsUser", {})
        if uid == 0 and not (strategy.get("type") == "RunAsAny" or
                             (strategy.get("type") == "MustRunAs" and strategy.get("uid") == 0)):
            problems.append(f"SCC {name}: runAsUser strategy does not admit uid 0")
        seccomp = sc.get("seccompProfile", spec.get("securityContext", {}).get("seccompProfile"))
        profiles = set(scc.get("seccompProfiles") or [])
        wanted = {"Unconfined": "unconfined", "RuntimeDefault": "runtime/default"}.get(
            (seccomp or {}).get("type"))
        if wanted and profiles and not ({"*", wanted} & profiles):
            problems.append(f"SCC {name}: seccomp profile {wanted} not in {sorted(profiles)}")
    return problems


# --- privilege -----------------------------------------------------------------------------------

# The host paths the agent mounts, and whether read-only. An SCC cannot restrict host paths (it
# has no allowedHostPaths, unlike the PodSecurityPolicy it replaced): a new one must be added
# here, reviewed, and named in the SCC's description.
HOST_PATHS = {
    "/sys/fs/cgroup": True,
    "/sys/fs/bpf": False,
    "/sys/kernel/btf": True,
    "/sys/kernel/tracing": True,
    "/run/meshguard": False,
}
# What the agent's own ClusterRole may grant: read, on what the inventory watches.
AGENT_READS = {("", "pods", "get"), ("", "pods", "list"), ("", "pods", "watch"),
               ("", "namespaces", "list"), ("", "namespaces", "watch"),
               ("", "services", "list"), ("", "services", "watch"),
               ("security.istio.io", "peerauthentications", "list"),
               ("security.istio.io", "peerauthentications", "watch"),
               ("networking.istio.io", "destinationrules", "list"),
               ("networking.istio.io", "destinationrules", "watch")}
# Its one write: enforcement's decisions as Events (a repeated one is patched to count it).
AGENT_WRITES = {("events.k8s.io", "events", "create"), ("events.k8s.io", "events", "patch")}


def rbac_problems(docs):
    """No rule grants Secrets or a wildcard; the agent's ClusterRole only reads what the
    inventory watches, and writes Events."""
    problems = []
    for d in docs:
        if d["kind"] not in ("Role", "ClusterRole"):
            continue
        for r in d.get("rules", []):
            for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                if any("*" in v for v in r.get(field, [])):
                    problems.append(f"{name_of(d)}: wildcard in {field}: {r}")
            if "secrets" in r.get("resources", []):
                problems.append(f"{name_of(d)}: grants access to secrets: {r}")
    crb = [d for d in docs if d["kind"] == "ClusterRoleBinding"]
    agent_roles = {b["roleRef"]["name"] for b in crb if b["roleRef"]["kind"] == "ClusterRole"}
    for d in docs:
        if d["kind"] == "ClusterRole" and d["metadata"]["name"] in agent_roles:
            granted = {(group, res, verb) for r in d.get("rules", [])
                       for group in r.get("apiGroups", []) for res in r.get("resources", [])
                       for verb in r.get("verbs", [])}
            allowed = AGENT_READS | AGENT_WRITES
            if not granted <= allowed:
                problems.append(f"{name_of(d)} grants {sorted(granted - allowed)} beyond "
                                f"what the inventory reads and the Events it writes "
                                f"({sorted(allowed)})")
    return problems


def host_path_problems(spec):
    """The DaemonSet's host paths are exactly HOST_PATHS, each mounted read-only as listed."""
    problems = []
    volumes = {v["name"]: v["hostPath"]["path"] for v in spec.get("volumes", []) if "hostPath" in v}
    if set(volumes.values()) != set(HOST_PATHS):
        problems.append(f"the DaemonSet's host paths {sorted(volumes.values())} are not exactly "
                        f"the reviewed ones {sorted(HOST_PATHS)}")
    for c in spec.get("initContainers", []) + spec["containers"]:
        for m in c.get("volumeMounts", []):
            path = volumes.get(m["name"])
            if HOST_PATHS.get(path) and not m.get("readOnly"):
                problems.append(f"{c['name']} mounts host path {path} writable; it must be "
                                "read-only")
    return problems


def scc_problems(scc, spec, ns, sa_name):
    """The SCC allows exactly the DaemonSet's volume types and no one but its service account."""
    name = scc["metadata"]["name"]
    problems = []
    if "allowedHostPaths" in scc:
        problems.append(f"SCC {name}: allowedHostPaths is not an SCC field (the API server "
                        "drops it): it restricts nothing")
    used = {"projected"} | {k for v in spec.get("volumes", []) for k in v if k != "name"}
    allowed = set(scc.get("volumes") or [])
    if allowed != used:
        problems.append(f"SCC {name}: volumes {sorted(allowed)} are not exactly the DaemonSet's "
                        f"{sorted(used)}")
    if scc.get("users") != [f"system:serviceaccount:{ns}:{sa_name}"] or scc.get("groups"):
        problems.append(f"SCC {name}: granted to {scc.get('users')} and groups "
                        f"{scc.get('groups')}, not to the agent's service account alone")
    description = scc["metadata"].get("annotations", {}).get("kubernetes.io/description", "")
    missing = [p for p in HOST_PATHS if p not in description]
    if missing:
        problems.append(f"SCC {name}: its description does not name the host paths {missing}")
    return problems


def network_policy_problems(docs, spec, pod_labels):
    """Some NetworkPolicy selects the agent's pods and limits every port they serve: each
    ingress rule names its ports and its sources."""
    problems = []
    if spec.get("hostNetwork"):
        problems.append("the agent runs in the host network, where NetworkPolicy does not apply")
    ports = {(p.get("name"), p["containerPort"]) for c in spec["containers"]
             for p in c.get("ports", [])}
    covered = set()
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"
                and subset(d["spec"]["podSelector"].get("matchLabels"), pod_labels)]
    for np in policies:
        if "Ingress" not in np["spec"].get("policyTypes", ["Ingress"]):
            continue
        for rule in np["spec"].get("ingress", []):
            if not rule.get("ports") or not rule.get("from"):
                problems.append(f"{name_of(np)}: an ingress rule without ports or sources "
                                f"allows everyone or every port: {rule}")
                continue
            for p in rule["ports"]:
                covered |= {(n, num) for n, num in ports if p.get("port") in (n, num)}
    if ports - covered:
        problems.append(f"no NetworkPolicy limits who reaches the agent's ports "
                        f"{sorted(num for _, num in ports - covered)}")
    return problems


def cmd_privilege(rendered):
    docs = load_all(rendered)
    ds = [d for d in docs if d["kind"] == "DaemonSet"]
    if len(ds) != 1:
        return fail([f"expected one DaemonSet, found {len(ds)}"])
    pod = ds[0]["spec"]["template"]
    spec, ns = pod["spec"], ds[0]["metadata"]["namespace"]
    problems = rbac_problems(docs) + host_path_problems(spec)
    for scc in (d for d in docs if d["kind"] == "SecurityContextConstraints"):
        problems += scc_problems(scc, spec, ns, spec.get("serviceAccountName", "default"))
    problems += network_policy_problems(docs, spec, pod["metadata"].get("labels", {}))
    return fail(problems)


# --- groups --------------------------------------------------------------------------------------

def first_difference(a, b, path="groups"):
    if type(a) is not type(b):
        return f"{path}: {a!r} != {b!r}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{path}.{k}: only in {'the PrometheusRule' if k in a else 'rules.yaml'}"
            d = first_difference(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list):
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None if len(a) == len(b) else f"{path}: {len(a)} items != {len(b)} items"
    return None if a == b else f"{path}: {a!r} != {b!r}"


def cmd_groups(rendered, rules_path):
    rules = [d for d in load_all(rendered) if d.get("kind") == "PrometheusRule"]
    if len(rules) != 1:
        return fail([f"expected one PrometheusRule, found {len(rules)}"])
    with open(rules_path) as f:
        canonical = yaml.safe_load(f)["groups"]
    diff = first_difference(rules[0]["spec"]["groups"], canonical)
    return fail([f"PrometheusRule differs from {rules_path}: {diff}"] if diff else [])


# --- promql / dashboard --------------------------------------------------------------------------

SELECTOR = re.compile(r"\b(meshguard_[a-zA-Z0-9_]*)\s*(\{[^}]*\})?")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
ALL_LABELS = set().union(*METRICS.values()) | TARGET_LABELS


def check_expr(expr, where):
    """Problems with one PromQL expression's use of meshguard metrics, labels and values."""
    problems = []
    for name, matchers in SELECTOR.findall(expr):
        if name not in METRICS:
            problems.append(f"{where}: unknown metric {name}")
            continue
        for label, op, value in MATCHER.findall(matchers or ""):
            if label not in METRICS[name] | TARGET_LABELS:
                problems.append(f"{where}: {name} has no label {label}")
            elif label in LABEL_VALUES and "$" not in value:
                known = LABEL_VALUES[label]
                if op == "=" and value not in known:
                    problems.append(f"{where}: {label}={value!r} is not a value the agent exports")
                elif op == "=~" and not any(re.fullmatch(value, v) for v in known):
                    problems.append(f"{where}: {label}=~{value!r} matches no value the agent "
                                    "exports")
    for group in GROUPING.findall(expr):
        for label in filter(None, (l.strip() for l in group.split(","))):
            if label not in ALL_LABELS:
                problems.append(f"{where}: unknown label {label} in grouping")
    return problems


def cmd_promql(rules_path):
    with open(rules_path) as f:
        groups = yaml.safe_load(f)["groups"]
    problems = []
    for g in groups:
        for r in g["rules"]:
            where = f"{g['name']}/{r.get('alert') or r.get('record')}"
            problems += check_expr(str(r["expr"]), where)
            if "meshguard" not in str(r["expr"]):
                problems.append(f"{where}: expression is not about meshguard")
    return fail(problems)


def walk(node, path=""):
    """Yields (path, dict) for every dict in a JSON document."""
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")


def cmd_dashboard(path):
    try:
        with open(path) as f:
            dash = json.load(f)
    except (OSError, ValueError) as e:
        return fail([f"{path} does not parse: {e}"])
    problems = []
    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    ds_var = variables.get("DS_PROMETHEUS")
    if not ds_var or ds_var.get("type") != "datasource" or ds_var.get("query") != "prometheus":
        problems.append("no templating variable DS_PROMETHEUS of type datasource (prometheus)")
    ids, exprs = [], 0
    for where, node in walk(dash):
        if "gridPos" in node and "type" in node:
            ids.append(node.get("id"))
            title = node.get("title", "?")
            ds = node.get("datasource") or {}
            if node["type"] != "row":
                if ds.get("uid") != "${DS_PROMETHEUS}":
                    problems.append(f"panel {title!r}: datasource is not ${{DS_PROMETHEUS}}")
                if not node.get("targets"):
                    problems.append(f"panel {title!r}: no queries")
            for t in node.get("targets", []):
                if (t.get("datasource") or ds).get("uid") != "${DS_PROMETHEUS}":
                    problems.append(f"panel {title!r} query {t.get('refId')}: datasource is not "
                                    "${DS_PROMETHEUS}")
        if isinstance(node.get("expr"), str):
            exprs += 1
            problems += check_expr(node["expr"], f"dashboard{where}")
    for name, v in variables.items():
        query = v.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        if v.get("type") == "query" and isinstance(query, str):
            problems += check_expr(query, f"variable {name}")
    if len(ids) != len(set(ids)):
        problems.append("panel ids are not unique")
    if exprs == 0:
        problems.append("no queries found")
    return fail(problems)


def cmd_uninstall(rendered):
    """The removal DaemonSet runs `meshguard uninstall` with the host's bpffs, and carries no
    label that would make `flows --cluster` (or the agents' Service) take it for an agent."""
    problems = []
    docs = [d for d in load_all(rendered) if d.get("kind") == "DaemonSet"]
    if len(docs) != 1:
        return fail([f"expected one DaemonSet, found {len(docs)}"])
    ds = docs[0]
    pod = ds["spec"]["template"]
    labels = pod["metadata"].get("labels", {})
    if labels.get("app.kubernetes.io/name") == "meshguard":
        problems.append("its pods carry the agents' label app.kubernetes.io/name=meshguard")
    spec = pod["spec"]
    init = spec.get("initContainers", [])
    if not any(c.get("args", [])[:1] == ["uninstall"] for c in init):
        problems.append("no init container runs `meshguard uninstall`")
    paths = {v["hostPath"]["path"] for v in spec.get("volumes", []) if "hostPath" in v}
    if "/sys/fs/bpf" not in paths:
        problems.append("the host's bpffs is not mounted")
    for c in init + spec.get("containers", []):
        added = c.get("securityContext", {}).get("capabilities", {}).get("add", [])
        if added or c.get("securityContext", {}).get("privileged"):
            problems.append(f"container {c['name']} asks for privileges it does not need")
    return fail(problems)


COMMANDS = {
    "uninstall": (cmd_uninstall, 1),
    "builtin": (cmd_builtin, 2), "crds": (cmd_crds, 1), "consistency": (cmd_consistency, 1),
    "privilege": (cmd_privilege, 1),
    "groups": (cmd_groups, 2), "promql": (cmd_promql, 1), "dashboard": (cmd_dashboard, 1),
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS or \
            len(sys.argv) - 2 != COMMANDS[sys.argv[1]][1]:
        sys.exit(__doc__)
    func, _ = COMMANDS[sys.argv[1]]
    sys.exit(func(*sys.argv[2:]))
