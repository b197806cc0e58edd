"""Every rendered custom object of every overlay, checked against the real
CustomResourceDefinitions of KEDA and Dapr, as the API server would check it
on `kubectl apply --server-side`, and stricter where the API server is
silent.

The CRDs come from the projects' Go modules at pinned versions (their YAML
ships in the module zips): `go mod download -json <module>@<version>` puts
them in the module cache (~/go/pkg/mod) once; later runs read the cache.
Nothing is copied into the repository.

- KEDA  github.com/kedacore/keda/v2 v2.21.0, config/crd/bases/*.yaml
  (ScaledObject, TriggerAuthentication, ... all keda.sh/v1alpha1)
- Dapr  github.com/dapr/dapr v1.18.0, charts/dapr/crds/*.yaml
  (Component, Resiliency, Configuration dapr.io/v1alpha1; Subscription
  dapr.io/v1alpha1 and v2alpha1)

Both projects' CRD schemas describe the whole object (apiVersion, kind,
metadata, spec, and for Dapr also the top-level `scopes` and, for a
Component, `auth`), so the whole object is validated, not only its `spec`.

How the Kubernetes structural-schema rules are applied (see `to_jsonschema`):
- Unknown fields: the API server PRUNES fields a structural schema does not
  define, silently: a misspelt field is dropped and its setting never takes
  effect. Here an object node without `x-kubernetes-preserve-unknown-fields`
  and without `additionalProperties` gets `additionalProperties: false`, so
  every such field fails the test.
- `x-kubernetes-preserve-unknown-fields: true`: that node keeps unknown
  fields (and, without a `type`, takes any value), as on the server.
- `x-kubernetes-int-or-string: true`: an integer or a string.
- `nullable`: without it a null is pruned by the server (the field silently
  vanishes), so a null fails here.
- `format: int32/int64/date-time` are checked; other string formats are not.
- `x-kubernetes-list-type: set` (unique items) and `map` (unique
  `x-kubernetes-list-map-keys`) are checked.
- `x-kubernetes-validations` (CEL): NOT evaluated in general (no CEL
  interpreter here). Rules whose exact text is in `CEL_RULES` are checked
  through a hand-written Python equivalent; any other rule reached by a
  rendered object is skipped with a warning.
- Root `metadata` (`type: object` in every CRD; the server validates it as
  ObjectMeta) is checked against the Kubernetes ObjectMeta schema
  (kubernetes-validate, strict) plus the custom-resource name rule.
- A version must exist and be served; `status` on an object whose CRD has
  the status subresource is ignored by the server, so it fails here.
"""

import copy
import datetime
import functools
import json
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from rendering import render

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ["hot-swap", "rolling", "workload-identity", "pubsub"]
K8S_VERSION = "1.32"

# (module, version, go.sum h1 hash of the module zip, directory of CRD YAML).
# KEDA: the newest v2 release the Go module proxy serves
# (`go list -m -versions github.com/kedacore/keda/v2`). The hashes pin the
# content even where GOSUMDB/GOFLAGS would let the go tool skip verification.
CRD_MODULES = [
    (
        "github.com/kedacore/keda/v2",
        "v2.21.0",
        "h1:R6z2HZvstK4RLUMxroNACzBj74xGxt3kG59b5Xc+Xps=",
        "config/crd/bases",
    ),
    (
        "github.com/dapr/dapr",
        "v1.18.0",
        "h1:zZ+dCnjq81r+TqTA1nMsfiLoDrNN8gBUZXWYZyixGXI=",
        "charts/dapr/crds",
    ),
]
# The CRD versions this project uses or may use: they must be there, served.
EXPECTED = [
    ("keda.sh", "ScaledObject", "v1alpha1"),
    ("keda.sh", "TriggerAuthentication", "v1alpha1"),
    ("dapr.io", "Component", "v1alpha1"),
    ("dapr.io", "Resiliency", "v1alpha1"),
    ("dapr.io", "Subscription", "v2alpha1"),
    ("dapr.io", "Configuration", "v1alpha1"),
]


# --- rendering ---------------------------------------------------------------




def one(docs, kind, name):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"no single {kind} {name}"
    return found[0]


def is_builtin(api_version):
    """Core and Kubernetes API groups: `v1`, `apps/v1`, `*.k8s.io/...`. A CRD's
    group always has a dot, and only Kubernetes' own dotted groups end in .k8s.io."""
    group = api_version.rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


# --- the CRDs, from the pinned Go modules ------------------------------------


@functools.lru_cache(maxsize=None)
def module_dir(module, version, digest):
    if shutil.which("go") is None:
        pytest.skip("go is not installed here: it fetches the KEDA and Dapr CRDs")
    # Outside any main module, so no go.mod/go.work around here interferes.
    with tempfile.TemporaryDirectory() as cwd:
        out = subprocess.run(
            ["go", "mod", "download", "-json", f"{module}@{version}"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=False,
        )
    try:
        info = json.loads(out.stdout)
    except json.JSONDecodeError:
        info = {}
    assert out.returncode == 0 and "Error" not in info, (
        f"go mod download {module}@{version} failed: {info.get('Error')} {out.stderr}"
    )
    assert info["Sum"] == digest, f"{module}@{version}: the module's hash is {info['Sum']}, pinned {digest}"
    return Path(info["Dir"])


@functools.lru_cache(maxsize=None)
def crds():
    """{(group, kind): CRD} of every CRD file in the pinned modules."""
    found = {}
    for module, version, digest, sub in CRD_MODULES:
        files = sorted((module_dir(module, version, digest) / sub).glob("*.yaml"))
        assert files, f"no CRD YAML under {sub} in {module}@{version}"
        for path in files:
            for doc in yaml.safe_load_all(path.read_text()):
                if doc and doc.get("kind") == "CustomResourceDefinition":
                    doc["source"] = f"{module}@{version}/{sub}/{path.name}"
                    found[(doc["spec"]["group"], doc["spec"]["names"]["kind"])] = doc
    return found


# --- OpenAPI v3 structural schema -> JSON Schema (draft 4) -------------------

# Keywords that mean the same in JSON Schema draft 4.
SAME = {
    "type",
    "required",
    "enum",
    "pattern",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "uniqueItems",
    "minProperties",
    "maxProperties",
    "format",
}
# Keywords that do not restrict what the API server accepts. `default` is
# applied by the server; x-kubernetes-map-type only steers server-side apply.
IGNORED = {"description", "default", "example", "title", "externalDocs", "x-kubernetes-map-type"}
# Handled in to_jsonschema.
HANDLED = {
    "properties",
    "additionalProperties",
    "items",
    "anyOf",
    "allOf",
    "oneOf",
    "not",
    "nullable",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-int-or-string",
    "x-kubernetes-embedded-resource",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-validations",
}
OBJECTMETA = "x-wasm-pc-objectmeta"


def to_jsonschema(node, where="", root=False):
    """The JSON Schema that accepts what the API server keeps unchanged.
    Fails on a keyword it does not know, so a newer CRD cannot weaken the
    check unnoticed."""
    unknown = set(node) - SAME - IGNORED - HANDLED
    assert not unknown, f"{where or '<root>'}: schema keywords {sorted(unknown)} are not handled here"
    out = {k: v for k, v in node.items() if k in SAME}
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    properties = {k: to_jsonschema(v, f"{where}.{k}") for k, v in node.get("properties", {}).items()}
    if root or node.get("x-kubernetes-embedded-resource"):
        # ObjectMeta: `type: object` in the CRD; the server validates it itself.
        properties["metadata"] = {OBJECTMETA: True}
        if node.get("x-kubernetes-embedded-resource"):
            properties.setdefault("apiVersion", {"type": "string"})
            properties.setdefault("kind", {"type": "string"})
    if properties:
        out["properties"] = properties
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = to_jsonschema(node["additionalProperties"], f"{where}.*")
    elif "additionalProperties" in node:
        out["additionalProperties"] = node["additionalProperties"]
    elif node.get("type") == "object" and not preserve:
        # The server would prune any other field without a word: fail on it.
        out["additionalProperties"] = False
    if "items" in node:
        out["items"] = to_jsonschema(node["items"], f"{where}[]")
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            out[key] = [to_jsonschema(s, f"{where}<{key}>") for s in node[key]]
    if "not" in node:
        out["not"] = to_jsonschema(node["not"], f"{where}<not>")
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    list_type = node.get("x-kubernetes-list-type")
    if list_type == "set":
        out["uniqueItems"] = True
    elif list_type == "map":
        out["x-kubernetes-list-map-keys"] = node["x-kubernetes-list-map-keys"]
    if "x-kubernetes-validations" in node:
        out["x-kubernetes-validations"] = node["x-kubernetes-validations"]
    if node.get("nullable"):
        out = {"anyOf": [{"type": "null"}, out]}
    return out


# CEL rules (x-kubernetes-validations) checked through a Python equivalent,
# keyed by their exact text (whitespace collapsed): if a newer CRD changes a
# rule, it is no longer matched and is reported as skipped instead of being
# checked by an outdated translation.
CEL_RULES = {
    # keda.sh ScaledObject .spec
    "!has(self.minReplicaCount) || self.minReplicaCount <= (has(self.maxReplicaCount) ? self.maxReplicaCount : 100)": (
        lambda s: "minReplicaCount" not in s or s["minReplicaCount"] <= s.get("maxReplicaCount", 100)
    ),
}
_skipped_rules = set()


def _cel(validator, rules, instance, schema):
    for rule in rules:
        text = " ".join(rule["rule"].split())
        check = CEL_RULES.get(text)
        if check is None:
            if text not in _skipped_rules:
                _skipped_rules.add(text)
                warnings.warn(f"CEL rule not evaluated (no Python equivalent here): {text}", stacklevel=1)
            continue
        try:
            ok = check(instance)
        except (TypeError, KeyError, AttributeError):
            ok = True  # a type error, reported by the type checks
        if not ok:
            yield jsonschema.ValidationError(f"{rule.get('message') or 'CEL rule failed'} (CEL: {text})")


def _list_map_keys(validator, keys, instance, schema):
    if not isinstance(instance, list):
        return
    seen = set()
    for item in instance:
        if isinstance(item, dict):
            key = tuple(json.dumps(item.get(k), sort_keys=True) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate list-map key {dict(zip(keys, key))}")
            seen.add(key)


CR_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _objectmeta(validator, enabled, instance, schema):
    try:
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": instance}, K8S_VERSION, strict=True
        )
    except kubernetes_validate.ValidationError as e:
        where = "".join(f".{p}" if isinstance(p, str) else f"[{p}]" for p in list(e.path)[1:])
        yield jsonschema.ValidationError(f"ObjectMeta{where}: {e.message}")
        return
    name = instance.get("name") if isinstance(instance, dict) else None
    if name is not None and not (len(name) <= 253 and CR_NAME.fullmatch(name)):
        yield jsonschema.ValidationError(f"metadata.name {name!r} is not a DNS-1123 subdomain")


FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("int32")
def _int32(value):
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _int64(value):
    return not isinstance(value, int) or -(2**63) <= value < 2**63


@FORMATS.checks("date-time", raises=ValueError)
def _date_time(value):
    return not isinstance(value, str) or datetime.datetime.fromisoformat(value) is not None


# Draft 4 is the JSON Schema dialect of OpenAPI v3 (boolean exclusiveMinimum).
CrdValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator,
    {
        "x-kubernetes-validations": _cel,
        "x-kubernetes-list-map-keys": _list_map_keys,
        OBJECTMETA: _objectmeta,
    },
)


@functools.lru_cache(maxsize=None)
def validator_for(group, kind, version):
    crd = crds()[(group, kind)]
    entry = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    schema = to_jsonschema(entry["schema"]["openAPIV3Schema"], root=True)
    return CrdValidator(schema, format_checker=FORMATS)


def _path(error):
    return "".join(f".{p}" if isinstance(p, str) else f"[{p}]" for p in error.absolute_path) or "<object>"


def _describe(error):
    if error.validator == "additionalProperties" and error.validator_value is False:
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return f"{_path(error)}: unknown field(s) {extra} (the API server would silently prune them)"
    if error.validator == "type" and error.instance is None:
        return f"{_path(error)}: null (the API server would silently prune the field)"
    return f"{_path(error)}: {error.message}"


def crd_errors(obj):
    """What is wrong with `obj` by its CRD: a sorted list, empty when fine."""
    group, _, version = obj.get("apiVersion", "").rpartition("/")
    crd = crds().get((group, obj.get("kind")))
    if crd is None:
        return [f"no CRD for kind {obj.get('kind')!r} in group {group!r} in the pinned modules"]
    entry = next((v for v in crd["spec"]["versions"] if v["name"] == version), None)
    served = [v["name"] for v in crd["spec"]["versions"] if v.get("served")]
    if entry is None or not entry.get("served"):
        return [f"{obj['apiVersion']}: {obj['kind']} has no served version {version!r} (served: {served})"]
    errors = [_describe(e) for e in validator_for(group, obj["kind"], version).iter_errors(obj)]
    if entry.get("deprecated"):
        errors.append(f"{obj['apiVersion']} {obj['kind']} is deprecated: {entry.get('deprecationWarning', '')}")
    if "status" in obj and "status" in entry.get("subresources", {}):
        errors.append(".status: ignored by the API server (status subresource): drop it")
    return sorted(errors)


# --- the checks --------------------------------------------------------------


@pytest.fixture(params=OVERLAYS, scope="module")
def docs(request):
    return render(request.param)


def test_crds_come_from_the_pinned_modules_and_every_schema_is_understood():
    found = crds()
    for group, kind, version in EXPECTED:
        crd = found.get((group, kind))
        assert crd is not None, f"no {kind}.{group} CRD in the pinned modules"
        entry = next((v for v in crd["spec"]["versions"] if v["name"] == version), None)
        assert entry and entry.get("served"), f"{group}/{version} {kind} is not served ({crd['source']})"
    # Every schema keyword of every CRD version converts (or this fails).
    for (group, kind), crd in found.items():
        for entry in crd["spec"]["versions"]:
            assert entry["schema"]["openAPIV3Schema"].get("type") == "object", (group, kind)
            validator_for(group, kind, entry["name"])


def test_every_custom_object_validates_against_its_crd(docs):
    custom = [d for d in docs if not is_builtin(d["apiVersion"])]
    kinds = {d["kind"] for d in custom}
    assert {"ScaledObject", "TriggerAuthentication", "Component", "Resiliency"} <= kinds, kinds
    problems = [
        f"{d['apiVersion']} {d['kind']}/{d['metadata']['name']} {e}" for d in custom for e in crd_errors(d)
    ]
    assert not problems, "\n".join(problems)


def _set(path, value):
    """A mutation: set the value at `path` (keys and indexes; only the last may be new)."""

    def mutate(obj):
        node = obj
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


def _rename(path, new):
    def mutate(obj):
        node = obj
        for key in path[:-1]:
            node = node[key]
        node[new] = node.pop(path[-1])

    return mutate


BEHAVIOR = ("spec", "advanced", "horizontalPodAutoscalerConfig", "behavior", "scaleDown")

# (case id, overlay, kind, name, mutation, text expected in a new error)
BROKEN = [
    (
        "scaledobject-misspelt-field",
        "hot-swap",
        "ScaledObject",
        "wasm-pc-consumer",
        _rename(("spec", "pollingInterval"), "pollingIntervall"),
        "spec: unknown field(s) ['pollingIntervall']",
    ),
    (
        "scaledobject-misspelt-nested-field",
        "hot-swap",
        "ScaledObject",
        "wasm-pc-consumer",
        _rename((*BEHAVIOR, "stabilizationWindowSeconds"), "stabilisationWindowSeconds"),
        "scaleDown: unknown field(s) ['stabilisationWindowSeconds']",
    ),
    (
        "trigger-metadata-value-not-a-string",
        "hot-swap",
        "ScaledObject",
        "wasm-pc-consumer",
        _set(("spec", "triggers", 0, "metadata", "messageCount"), 16),
        ".spec.triggers[0].metadata.messageCount: 16 is not of type 'string'",
    ),
    (
        "trigger-authentication-ref-kind",
        "hot-swap",
        "ScaledObject",
        "wasm-pc-consumer",
        _set(("spec", "triggers", 0, "authenticationRef", "kind"), "TriggerAuth"),
        ".spec.triggers[0].authenticationRef.kind: 'TriggerAuth' is not one of",
    ),
    (
        "min-replicas-above-max-cel",
        "hot-swap",
        "ScaledObject",
        "wasm-pc-consumer",
        _set(("spec", "minReplicaCount"), 30),
        "minReplicaCount must be less than or equal to maxReplicaCount",
    ),
    (
        "int32-overflow",
        "hot-swap",
        "ScaledObject",
        "wasm-pc-consumer",
        _set(("spec", "maxReplicaCount"), 2**31),
        ".spec.maxReplicaCount: 2147483648 is not a 'int32'",
    ),
    (
        "null-is-pruned",
        "hot-swap",
        "ScaledObject",
        "wasm-pc-consumer",
        _set(("spec", "advanced"), None),
        ".spec.advanced: null",
    ),
    (
        "status-is-ignored",
        "hot-swap",
        "ScaledObject",
        "wasm-pc-consumer",
        _set(("status",), {"hpaName": "x"}),
        ".status: ignored",
    ),
    (
        "misspelt-kind",
        "hot-swap",
        "ScaledObject",
        "wasm-pc-consumer",
        _set(("kind",), "ScaledObjects"),
        "no CRD for kind 'ScaledObjects'",
    ),
    (
        "pod-identity-provider-azure",
        "workload-identity",
        "TriggerAuthentication",
        "wasm-pc-servicebus",
        _set(("spec", "podIdentity", "provider"), "azure"),
        ".spec.podIdentity.provider: 'azure' is not one of ['azure-workload', 'gcp', 'aws', 'aws-eks', 'none']",
    ),
    (
        "secret-target-ref-missing-key",
        "hot-swap",
        "TriggerAuthentication",
        "wasm-pc-servicebus",
        _rename(("spec", "secretTargetRef", 0, "key"), "keys"),
        ".spec.secretTargetRef[0]: 'key' is a required property",
    ),
    (
        "component-misspelt-top-level-scopes",
        "hot-swap",
        "Component",
        "orders",
        _rename(("scopes",), "scope"),
        "<object>: unknown field(s) ['scope']",
    ),
    (
        "component-misspelt-secret-key-ref",
        "hot-swap",
        "Component",
        "orders",
        _rename(("spec", "metadata", 0, "secretKeyRef"), "secretkeyRef"),
        ".spec.metadata[0]: unknown field(s) ['secretkeyRef']",
    ),
    (
        "component-auth-needs-secret-store",
        "hot-swap",
        "Component",
        "orders",
        _set(("auth",), {"secretstore": "kubernetes"}),
        ".auth: 'secretStore' is a required property",
    ),
    (
        "component-metadata-misspelt",
        "hot-swap",
        "Component",
        "orders",
        _rename(("metadata", "labels"), "label"),
        "ObjectMeta: Additional properties are not allowed ('label' was unexpected)",
    ),
    (
        "resiliency-max-retries-string",
        "hot-swap",
        "Resiliency",
        "wasm-pc-consumer",
        _set(("spec", "policies", "retries", "consumer-backoff", "maxRetries"), "5"),
        ".spec.policies.retries.consumer-backoff.maxRetries: '5' is not of type 'integer'",
    ),
    (
        "subscription-v1alpha1-route-in-v2alpha1",
        "pubsub",
        "Subscription",
        "wasm-pc-orders",
        _rename(("spec", "routes"), "route"),
        ".spec: 'routes' is a required property",
    ),
    (
        "subscription-unserved-version",
        "pubsub",
        "Subscription",
        "wasm-pc-orders",
        _set(("apiVersion",), "dapr.io/v2"),
        "has no served version 'v2'",
    ),
]


@pytest.mark.parametrize(
    "overlay, kind, name, mutate, expected", [case[1:] for case in BROKEN], ids=[case[0] for case in BROKEN]
)
def test_the_validator_rejects_broken_objects(overlay, kind, name, mutate, expected):
    original = one(render(overlay), kind, name)
    broken = copy.deepcopy(original)
    mutate(broken)
    # Errors the change brought (the manifests' own are another test's).
    new = sorted(set(crd_errors(broken)) - set(crd_errors(original)))
    assert any(expected in e for e in new), f"expected {expected!r} among {new}"


ACCEPTED = [
    # Component metadata `value` is x-kubernetes-preserve-unknown-fields with
    # no type: the CRD takes any value (test_manifests.py insists on strings).
    ("component-value-any-type", "hot-swap", "Component", "orders", _set(("spec", "metadata", 1, "value"), 16)),
    # int-or-string (with a quantity pattern for strings).
    ("tolerance-string", "hot-swap", "ScaledObject", "wasm-pc-consumer", _set((*BEHAVIOR, "tolerance"), "0.05")),
    ("tolerance-int", "hot-swap", "ScaledObject", "wasm-pc-consumer", _set((*BEHAVIOR, "tolerance"), 1)),
    # additionalProperties maps take any key.
    (
        "resiliency-any-target-name",
        "hot-swap",
        "Resiliency",
        "wasm-pc-consumer",
        _set(("spec", "targets", "apps"), {"some-app": {"retry": "consumer-backoff"}}),
    ),
    (
        "trigger-metadata-any-key",
        "hot-swap",
        "ScaledObject",
        "wasm-pc-consumer",
        _set(("spec", "triggers", 0, "metadata", "anyKey"), "x"),
    ),
]


@pytest.mark.parametrize("overlay, kind, name, mutate", [c[1:] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_the_validator_accepts_what_the_api_server_keeps(overlay, kind, name, mutate):
    original = one(render(overlay), kind, name)
    changed = copy.deepcopy(original)
    mutate(changed)
    assert crd_errors(changed) == crd_errors(original)


def test_int_or_string_still_rejects_other_types():
    so = one(render("hot-swap"), "ScaledObject", "wasm-pc-consumer")
    for bad, expected in ((True, "is not valid under any of the given schemas"), ("ten %", "does not match")):
        broken = copy.deepcopy(so)
        _set((*BEHAVIOR, "tolerance"), bad)(broken)
        assert any(f"scaleDown.tolerance: {bad!r} {expected}" in e for e in crd_errors(broken)), crd_errors(broken)


def test_no_crd_is_committed():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in tracked.stdout.split():
        if name.endswith((".yaml", ".yml")) and (ROOT / name).exists():
            assert "kind: CustomResourceDefinition" not in (ROOT / name).read_text(), (
                f"{name}: CRDs are fetched from the pinned Go modules, not committed"
            )
