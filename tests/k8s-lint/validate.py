#!/usr/bin/env python3
"""Offline validation of Kubernetes YAML for tests/k8s-lint.sh.

    validate.py resources [--crds DIR] [-k VERSION]... [--service-monitor-check CMD] FILE...
    validate.py crds DIR

`resources` checks every document of every FILE ("-" is standard input) and prints one line
per document:

- built-in kinds: kubernetes-validate's strict schemas (unknown fields are errors), for each
  Kubernetes version given with -k;
- kinds of a CRD found in --crds (warren.dev): the openAPIV3Schema of the served version, read
  the way the API server reads it (defaults applied first; unknown fields are errors unless
  x-kubernetes-preserve-unknown-fields; nullable; x-kubernetes-int-or-string; the implicit
  apiVersion/kind/metadata of a resource), metadata against ObjectMeta, then the CEL rules
  (x-kubernetes-validations) with cel-python, as on create and, for transition rules, as on
  re-applying the same object (oldSelf = self); a rule that needs Kubernetes' own CEL libraries
  is reported as not evaluated;
- monitoring.coreos.com/v1 ServiceMonitor: kubernetes-validate has no schema for it, so it is
  handed to --service-monitor-check (the prometheus-operator models; see servicemonitor.mjs),
  and its selector and port are checked against the Service it is meant to scrape;
- any other kind is an error: nothing is waved through for want of a schema.

Pod templates are also held to the Pod Security Standard "restricted", plus the chart's own
rules (read-only root filesystem, memory limit, probes).

`crds` checks that each CRD file is named after the CRD and that the CRD is a warren.dev one
with a served, stored version and a schema.
"""

import argparse
import copy
import json
import os
import re
import subprocess
import sys
from functools import lru_cache

import celpy
import jsonschema
import kubernetes_validate
import kubernetes_validate.utils as kv_utils
import yaml

# kubernetes-validate reads its 1.8 MB definitions file once per resource; read it once.
kv_utils.schema_contents = lru_cache(maxsize=None)(kv_utils.schema_contents)

DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
WARREN_GROUP = "warren.dev"
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}


class Problem(Exception):
    pass


class StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """YAML as the API server's decoder reads it: a key twice in one mapping is an error
    (PyYAML would keep the last one silently, hiding a template bug)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_documents(path):
    text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    try:
        docs = [d for d in yaml.load_all(text, Loader=StrictLoader) if d is not None]
    except yaml.YAMLError as e:
        raise Problem(f"not YAML: {e}")
    for d in docs:
        if not isinstance(d, dict):
            raise Problem(f"a document is a {type(d).__name__}, not a Kubernetes object")
    return docs


def plural(n, word):
    return f"{n} {word}{'' if n == 1 else 's'}"


def describe(doc):
    name = (doc.get("metadata") or {}).get("name", "?")
    ns = (doc.get("metadata") or {}).get("namespace")
    return f"{doc.get('kind', '?')}/{ns + '/' if ns else ''}{name}"


def json_path(path):
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out or "(root)"


# ---------------------------------------------------------------- CRDs

@lru_cache(maxsize=None)
def load_crds(crd_dir):
    """{(group, version, kind): (crd, version entry)} of every CRD file in crd_dir."""
    crds = {}
    if not crd_dir or not os.path.isdir(crd_dir):
        return crds
    for fname in sorted(os.listdir(crd_dir)):
        if not fname.endswith((".yaml", ".yml")):
            continue
        for crd in load_documents(os.path.join(crd_dir, fname)):
            if crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd.get("spec", {})
            for v in spec.get("versions", []):
                crds[(spec.get("group"), v.get("name"), spec.get("names", {}).get("kind"))] = (crd, v)
    return crds


def check_crd_files(crd_dir):
    """Consistency of the CRD files themselves; returns a list of problems."""
    problems = []
    files = sorted(f for f in os.listdir(crd_dir) if f.endswith((".yaml", ".yml")))
    for fname in files:
        try:
            docs = load_documents(os.path.join(crd_dir, fname))
        except Problem as e:
            problems.append(f"{fname}: {e}")
            continue
        if len(docs) != 1 or docs[0].get("kind") != "CustomResourceDefinition":
            problems.append(f"{fname}: must hold exactly one CustomResourceDefinition")
            continue
        crd = docs[0]
        spec = crd.get("spec", {})
        name = crd.get("metadata", {}).get("name", "")
        plural = spec.get("names", {}).get("plural", "")
        group = spec.get("group", "")
        if name != f"{plural}.{group}":
            problems.append(f"{fname}: metadata.name {name!r} is not <plural>.<group> ({plural}.{group})")
        if fname != f"{name}.yaml":
            problems.append(f"{fname}: file name should be {name}.yaml")
        if group != WARREN_GROUP:
            problems.append(f"{fname}: group {group!r} is not {WARREN_GROUP}")
        if spec.get("scope") != "Namespaced":
            problems.append(f"{fname}: scope {spec.get('scope')!r}, expected Namespaced")
        versions = spec.get("versions", [])
        if sum(1 for v in versions if v.get("storage")) != 1:
            problems.append(f"{fname}: exactly one version must be the storage version")
        for v in versions:
            if v.get("served") and not (v.get("schema") or {}).get("openAPIV3Schema"):
                problems.append(f"{fname}: served version {v.get('name')} has no openAPIV3Schema")
    return problems, len(files)


def to_jsonschema(node, root=False, junctor=False):
    """A structural CRD schema (OpenAPI v3.0 subset) as a draft-4 JSON schema that rejects what
    the API server rejects with strict field validation (kubectl's default)."""
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "default", "example", "externalDocs"):
            continue
        if key == "properties":
            out[key] = {k: to_jsonschema(v) for k, v in value.items()}
        elif key in ("items", "not") or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = to_jsonschema(value, junctor=junctor or key == "not")
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_jsonschema(v, junctor=True) for v in value]
        else:
            out[key] = value
    if root or node.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if node.get("x-kubernetes-int-or-string") and "type" not in node:
        out["anyOf"] = out.get("anyOf", []) + [{"type": "integer"}, {"type": "string"}]
    is_object = node.get("type") == "object" or "properties" in node
    if (is_object and not junctor and not node.get("x-kubernetes-preserve-unknown-fields")
            and "additionalProperties" not in node):
        out["additionalProperties"] = False
    if node.get("nullable"):
        out = {"anyOf": [{"type": "null"}, out]}
    return out


def explain(error):
    """Messages of a schema error; through a `nullable` wrapper (anyOf null or the schema), the
    errors of the schema itself rather than "not valid under any of the given schemas"."""
    branches = error.schema.get("anyOf") if isinstance(error.schema, dict) else None
    if error.validator == "anyOf" and branches and branches[0] == {"type": "null"}:
        inner = [c for c in error.context if c.schema_path and c.schema_path[0] == 1]
        if inner:
            return [m for c in inner for m in explain(c)]
    return [f"{json_path(error.absolute_path)}: {error.message}"]


def apply_defaults(value, schema):
    """The API server's defaulting (before validation): a missing property with a default
    gets it, at every level that exists."""
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if "default" in sub and (key not in value or (value[key] is None and not sub.get("nullable"))):
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                apply_defaults(value[key], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, sub_value in value.items():
                if key not in (schema.get("properties") or {}):
                    apply_defaults(sub_value, extra)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(item, schema["items"])


def check_names(doc):
    """What the API server checks of any object's name and namespace (schemas do not)."""
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        raise Problem("metadata is missing")
    name = meta.get("name")
    if not name and not meta.get("generateName"):
        raise Problem("metadata.name is missing")
    if name and (len(name) > 253 or not DNS1123_SUBDOMAIN.match(name)):
        raise Problem(f"metadata.name {name!r} is not a DNS-1123 subdomain")
    ns = meta.get("namespace")
    if ns is not None and (len(ns) > 63 or not DNS1123_LABEL.match(ns)):
        raise Problem(f"metadata.namespace {ns!r} is not a DNS-1123 label")


def check_metadata(doc, versions):
    check_names(doc)
    meta = doc["metadata"]
    # ObjectMeta's own schema, borrowed from a ConfigMap that has nothing but metadata.
    for version in versions:
        validate_builtin({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta}, version)


@lru_cache(maxsize=None)
def crd_validator(group, version, kind, crd_dir):
    crd, entry = load_crds(crd_dir)[(group, version, kind)]
    schema = entry["schema"]["openAPIV3Schema"]
    validator = jsonschema.Draft4Validator(to_jsonschema(schema, root=True))
    return schema, validator


@lru_cache(maxsize=None)
def cel_environment():
    return celpy.Environment()  # builds a parser: a second's work, so only when needed


@lru_cache(maxsize=None)
def cel_program(rule):
    return cel_environment().program(cel_environment().compile(rule))


def cel_rules(value, schema, path, found):
    """(path, value, rule) of every x-kubernetes-validations rule whose value is present."""
    for rule in schema.get("x-kubernetes-validations") or []:
        found.append((path, value, rule))
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key, sub in props.items():
            if key in value and value[key] is not None:
                cel_rules(value[key], sub, path + [key], found)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, sub_value in value.items():
                if key not in props and sub_value is not None:
                    cel_rules(sub_value, extra, path + [key], found)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            cel_rules(item, schema["items"], path + [i], found)
    return found


def check_cel(doc, schema):
    """Evaluates the CRD's CEL rules with cel-python: as on create, and for transition rules
    (those using oldSelf) as on re-applying the same object (oldSelf = self). Kubernetes' CEL
    libraries (strings, lists, regex, quantity, …) are not in cel-python: a rule using them is
    reported as not evaluated. Returns (evaluated, not evaluated) and raises Problem on a
    violated rule."""
    root = dict(doc)
    root["metadata"] = {k: v for k, v in (doc.get("metadata") or {}).items() if k in ("name", "generateName")}
    evaluated, skipped, broken = 0, [], []
    for path, value, rule in cel_rules(root, schema, [], []):
        expr = rule.get("rule", "")
        cel_value = celpy.json_to_cel(value)
        activation = {"self": cel_value}
        if "oldSelf" in expr:
            activation["oldSelf"] = cel_value
        try:
            result = cel_program(expr).evaluate(activation)
        except Exception as e:  # noqa: BLE001 - cel-python raises several kinds
            skipped.append(f"{json_path(path)}: {expr} ({type(e).__name__})")
            continue
        if not isinstance(result, celpy.celtypes.BoolType):
            skipped.append(f"{json_path(path)}: {expr} (gave {result!r})")
            continue
        evaluated += 1
        if not result:
            broken.append(f"{json_path(path)}: {rule.get('message') or 'failed rule: ' + expr}")
    if broken:
        raise Problem("CEL: " + "; ".join(broken))
    return evaluated, skipped


def validate_custom(doc, crd_dir, crds, versions):
    group, _, version = doc["apiVersion"].rpartition("/")
    key = (group, version, doc["kind"])
    if key not in crds:
        known = ", ".join(sorted(f"{g}/{v} {k}" for g, v, k in crds)) or "none"
        raise Problem(f"no CRD in {crd_dir} defines {doc['apiVersion']} {doc['kind']} (known: {known})")
    _, entry = crds[key]
    if not entry.get("served"):
        raise Problem(f"version {version} of {doc['kind']} is not served")
    check_metadata(doc, versions)
    schema, validator = crd_validator(group, version, doc["kind"], crd_dir)
    defaulted = copy.deepcopy(doc)
    apply_defaults(defaulted, schema)
    errors = sorted(validator.iter_errors(defaulted), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        raise Problem("; ".join(m for e in errors for m in explain(e)))
    evaluated, skipped = check_cel(defaulted, schema)
    how = f"CRD schema {doc['apiVersion']}, {plural(evaluated, 'CEL rule')} held"
    if skipped:
        how += f", {len(skipped)} not evaluated: " + ", ".join(skipped)
    return how


def validate_builtin(doc, version):
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise Problem(f"{json_path(e.path)}: {e.message} (Kubernetes {e.version})")
    except kubernetes_validate.SchemaNotFoundError:
        raise LookupError()


# ---------------------------------------------------------------- policy

def pod_spec_of(doc):
    spec = doc.get("spec") or {}
    if doc["kind"] == "Pod":
        return spec
    if doc["kind"] == "CronJob":
        return (((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}).get("spec") or {}
    return (spec.get("template") or {}).get("spec") or {}


def check_pod_policy(doc):
    """Pod Security Standard "restricted" (v1.29+ rules), plus the chart's own rules."""
    pod = pod_spec_of(doc)
    psc = pod.get("securityContext") or {}
    problems = []
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            problems.append(f"{flag} is set")
    for vol in pod.get("volumes") or []:
        if "hostPath" in vol:
            problems.append(f"volume {vol.get('name')} is a hostPath")
    containers = [("initContainers", c) for c in pod.get("initContainers") or []] + \
                 [("containers", c) for c in pod.get("containers") or []]
    for field, c in containers:
        sc = c.get("securityContext") or {}
        where = f"{field} {c.get('name')}"
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root is not True:
            problems.append(f"{where}: runAsNonRoot is not true")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            problems.append(f"{where}: runs as uid 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{where}: seccompProfile is not RuntimeDefault or Localhost")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            problems.append(f"{where}: privileged")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"{where}: capabilities do not drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            problems.append(f"{where}: adds capabilities {sorted(set(caps['add']) - {'NET_BIND_SERVICE'})}")
        # The chart's own rules.
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: root filesystem is not read-only")
        if not ((c.get("resources") or {}).get("limits") or {}).get("memory"):
            problems.append(f"{where}: no memory limit")
        if field == "containers" and not (c.get("livenessProbe") and c.get("readinessProbe")):
            problems.append(f"{where}: liveness or readiness probe missing")
    if problems:
        raise Problem("pod security: " + "; ".join(problems))


def check_service_monitor_targets(doc, all_docs):
    """The ServiceMonitor must select a Service of the same rendering, by labels, in a namespace
    it looks in, and scrape a port that Service has."""
    spec = doc.get("spec") or {}
    wanted = (spec.get("selector") or {}).get("matchLabels") or {}
    ns_sel = spec.get("namespaceSelector") or {}
    own_ns = (doc.get("metadata") or {}).get("namespace")
    namespaces = set(ns_sel.get("matchNames") or ([own_ns] if not ns_sel.get("any") else []))
    services = [d for d in all_docs if d.get("kind") == "Service" and wanted and all(
        ((d.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in wanted.items())
        and (ns_sel.get("any") or (d.get("metadata") or {}).get("namespace") in namespaces)]
    if len(services) != 1:
        raise Problem(f"selects {len(services)} Services of this rendering, expected exactly 1")
    ports = {p.get("name") for p in services[0]["spec"].get("ports", [])}
    for ep in spec.get("endpoints") or []:
        if ep.get("port") not in ports:
            raise Problem(f"endpoint port {ep.get('port')!r} is not a port of Service "
                          f"{services[0]['metadata']['name']} ({sorted(p for p in ports if p)})")


def run_service_monitor_check(command, docs):
    result = subprocess.run(command, shell=True, input=json.dumps(docs), capture_output=True, text=True)
    if result.returncode != 0:
        raise Problem((result.stdout + result.stderr).strip() or f"{command} failed")


# ---------------------------------------------------------------- main

def check_document(doc, docs, args, crds, versions):
    """Validates one object; returns what was checked (a list), or raises Problem."""
    if not doc.get("apiVersion") or not doc.get("kind"):
        raise Problem("apiVersion or kind is missing")
    check_names(doc)
    group = doc["apiVersion"].rpartition("/")[0]
    if group == WARREN_GROUP:
        how = [validate_custom(doc, args.crds, crds, versions)]
    elif doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "ServiceMonitor":
        if not args.service_monitor_check:
            raise Problem("no ServiceMonitor checker given")
        check_metadata(doc, versions)
        run_service_monitor_check(args.service_monitor_check, doc)
        check_service_monitor_targets(doc, docs)
        how = ["ServiceMonitor: prometheus-operator's schema, selects one Service and its port"]
    else:
        try:
            for version in versions:
                validate_builtin(doc, version)
        except LookupError:
            raise Problem(f"no schema for {doc['apiVersion']} {doc['kind']} "
                          f"(not a built-in kind of Kubernetes {', '.join(versions)})")
        how = [f"strict schemas of Kubernetes {' and '.join(versions)}"]
    if doc["kind"] in WORKLOADS:
        check_pod_policy(doc)
        how.append("pod security restricted")
    return how


def cmd_resources(args):
    """One line per file: `ok   LABEL: ...` or `FAIL LABEL: ...`, details indented below it.
    With --expect-invalid a file passes when at least one of its objects is refused."""
    crds = load_crds(args.crds)
    versions = args.kubernetes_version or [kv_utils.latest_version()]
    labels = args.label or []
    failed = 0
    for i, path in enumerate(args.files):
        label = labels[i] if i < len(labels) else path
        results = []  # (description, how or None, problem or None)
        try:
            docs = load_documents(path)
            if not docs:
                raise Problem("no Kubernetes objects")
        except (Problem, OSError) as e:
            docs, results = [], [("file", None, str(e))]
        for doc in docs:
            try:
                results.append((describe(doc), check_document(doc, docs, args, crds, versions), None))
            except Problem as e:
                results.append((describe(doc), None, str(e)))
        bad = [r for r in results if r[2]]
        ok = bool(bad) if args.expect_invalid else not bad
        failed += not ok
        if args.expect_invalid:
            summary = "refused as it should be" if ok else "accepted, but it is invalid"
        else:
            hows = sorted({h for _, hs, _ in results for h in hs or []})
            summary = (f"{plural(len(results), 'object')} valid ({'; '.join(hows)})" if ok
                       else f"{len(bad)} of {plural(len(results), 'object')} invalid")
        print(f"{'ok  ' if ok else 'FAIL'} {label}: {summary}")
        for what, _, problem in results:
            if problem:
                print(f"       {what}: {problem}".replace("\n", "\n         "))
    return 1 if failed else 0


def cmd_crds(args):
    problems, count = check_crd_files(args.dir)
    for p in problems:
        print(f"FAIL {args.dir}/{p}")
    print(f"{count} CRD files, {len(problems)} problems")
    return 1 if problems else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    res = sub.add_parser("resources", help="validate Kubernetes objects")
    res.add_argument("--crds", help="folder of CRD YAML for custom kinds")
    res.add_argument("-k", "--kubernetes-version", action="append")
    res.add_argument("--label", action="append", help="name to print for the next file (repeatable)")
    res.add_argument("--expect-invalid", action="store_true", help="pass when each file is refused")
    res.add_argument("--service-monitor-check", help="command that validates a ServiceMonitor (JSON on stdin)")
    res.add_argument("files", nargs="+")
    res.set_defaults(run=cmd_resources)
    crd = sub.add_parser("crds", help="check CRD files for consistency")
    crd.add_argument("dir")
    crd.set_defaults(run=cmd_crds)
    args = parser.parse_args()
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
