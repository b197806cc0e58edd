"""What Dapr's sidecar injector makes of our Deployments.

Runs Dapr's own injector patch logic (k8s/tests/injectcheck, built against
the pinned github.com/dapr/dapr module) on every rendered overlay and checks
the daprd container it would add: its flags, env, token mounts, and that
every dapr.io/* annotation is one Dapr reads. The path to the built tool
comes from WASM_PC_INJECTCHECK (see the comment at the top of
injectcheck/main.go for how to build it).

Facts these checks rest on (Dapr v1.18.0):
- pkg/injector/patcher/sidecar_container.go getSidecarContainer turns the
  annotations into daprd flags; dapr.io/disable-builtin-k8s-secret-store
  becomes --disable-builtin-k8s-secret-store.
- pkg/runtime/runtime.go appendBuiltinSecretStore otherwise preloads the
  secretstores.kubernetes component in Kubernetes mode; its Init
  (components-contrib common/authentication/kubernetes GetKubeClient) needs
  /var/run/secrets/kubernetes.io/serviceaccount/token, which a pod with
  automountServiceAccountToken: false lacks, and a failed Init stops daprd.
- pkg/injector/patcher/sidecar_patcher.go GetPatch mounts its own projected
  token (audience: the Sentry SPIFFE ID) at /var/run/secrets/dapr.io/sentrytoken
  whatever automountServiceAccountToken says; daprd sends it to Sentry.
"""

import copy
import functools
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from rendering import rendered_text as rendered

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ["hot-swap", "rolling", "workload-identity", "pubsub"]

# What the tool assumes of the Dapr install (its defaults: the Helm chart's).
CONTROL_PLANE_NAMESPACE = "dapr-system"
TRUST_DOMAIN = "cluster.local"
SENTRY_TOKEN_DIR = "/var/run/secrets/dapr.io/sentrytoken"
SENTRY_AUDIENCE = f"spiffe://{TRUST_DOMAIN}/ns/{CONTROL_PLANE_NAMESPACE}/dapr-sentry"

DISABLE_SECRET_STORE = "dapr.io/disable-builtin-k8s-secret-store"


def tool():
    path = os.environ.get("WASM_PC_INJECTCHECK")
    if not path:
        pytest.fail(
            "WASM_PC_INJECTCHECK is not set: build k8s/tests/injectcheck inside the "
            "github.com/dapr/dapr v1.18.0 module (see the comment at the top of its main.go) "
            "and set WASM_PC_INJECTCHECK to the binary",
            pytrace=False,
        )
    if not os.access(path, os.X_OK):
        pytest.fail(f"WASM_PC_INJECTCHECK={path} is not an executable file", pytrace=False)
    return path




def inject(text):
    out = subprocess.run([tool()], input=text, capture_output=True, text=True, check=False)
    assert out.returncode == 0, f"injectcheck failed: {out.stderr}"
    return json.loads(out.stdout)


@functools.cache
def injected(overlay):
    return inject(rendered(overlay))


def deployments(text):
    return [d for d in yaml.safe_load_all(text) if d and d["kind"] == "Deployment"]


def annotations(deployment):
    return deployment["spec"]["template"]["metadata"].get("annotations", {})


def app_container(deployment):
    """The container serving the app port: the one with a port named http."""
    found = [
        c for c in deployment["spec"]["template"]["spec"]["containers"]
        if any(p.get("name") == "http" for p in c.get("ports", []))
    ]
    assert len(found) == 1, f"{deployment['metadata']['name']}: want one container with an `http` port"
    return found[0]


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


# Each check returns the problems it finds with one Deployment and what the
# injector made of it (an empty list: fine). The tests below run them on the
# real overlays; test_the_checks_catch_a_broken_manifest on broken copies.


def check_injected(dep, got):
    problems = []
    if got.get("patch_error"):
        problems.append(f"the injector refuses the pod: {got['patch_error']}")
    if not got.get("needs_patching"):
        problems.append("the injector would not add daprd (dapr.io/enabled not true?)")
    return problems


def check_app_port(dep, got):
    port = next(p["containerPort"] for p in app_container(dep)["ports"] if p.get("name") == "http")
    have = got["flags"].get("app-port")
    return [] if have == str(port) else [f"daprd --app-port {have!r}, but the app listens on {port}"]


def check_app_protocol(dep, got):
    have = got["flags"].get("app-protocol")
    return [] if have == "http" else [f"daprd --app-protocol {have!r}, want 'http'"]


def check_app_max_concurrency(dep, got):
    host = env_of(app_container(dep)).get("WASM_PC_MAX_CONCURRENCY")
    if host is None:
        return []  # not a consumer: no host-side limit to match
    have = got["flags"].get("app-max-concurrency")
    want = host.get("value")
    return [] if have == want else [f"daprd --app-max-concurrency {have!r}, host WASM_PC_MAX_CONCURRENCY {want!r}"]


def check_graceful_shutdown(dep, got):
    want = annotations(dep).get("dapr.io/graceful-shutdown-seconds")
    if want is None:
        return ["no dapr.io/graceful-shutdown-seconds: daprd would get its default (-1)"]
    have = got["flags"].get("dapr-graceful-shutdown-seconds")
    return [] if have == want else [f"daprd --dapr-graceful-shutdown-seconds {have!r}, annotation {want!r}"]


def check_app_token(dep, got):
    secret = annotations(dep).get("dapr.io/app-token-secret")
    if not secret:
        return ["no dapr.io/app-token-secret: daprd would call the app without a token"]
    want = {"name": secret, "key": "token"}
    problems = []
    daprd = {e["name"]: e for e in got["env"]}
    ref = ((daprd.get("APP_API_TOKEN") or {}).get("valueFrom") or {}).get("secretKeyRef")
    if ref != want:
        problems.append(f"daprd APP_API_TOKEN comes from {ref}, want secret {want}")
    app = ((env_of(app_container(dep)).get("APP_API_TOKEN") or {}).get("valueFrom") or {}).get("secretKeyRef")
    if app != want:
        problems.append(f"the app's APP_API_TOKEN comes from {app}, daprd's from {want}: they must match")
    return problems


def check_builtin_secret_store_disabled(dep, got):
    problems = []
    if "disable-builtin-k8s-secret-store" not in got["flags"]:
        problems.append(
            "daprd lacks --disable-builtin-k8s-secret-store "
            f'(set the pod annotation {DISABLE_SECRET_STORE}: "true")'
        )
    if got["effective_annotations"].get(DISABLE_SECRET_STORE) != "true":
        problems.append(f"Dapr reads {DISABLE_SECRET_STORE} as false")
    return problems


def check_annotations_known(dep, got):
    problems = [f"Dapr does not read {a}" for a in got["unknown_annotations"]]
    problems += [f"Dapr cannot parse {k}: {v!r}" for k, v in sorted(got["invalid_annotations"].items())]
    return problems


def check_tokens(dep, got):
    """daprd must not need a token the pod lacks."""
    problems = []
    automount = dep["spec"]["template"]["spec"].get("automountServiceAccountToken")
    if automount is not False:
        problems.append("the pod mounts the Kubernetes API token: set automountServiceAccountToken: false")
    if got["kube_api_token_mounted"]:
        problems.append("daprd mounts the Kubernetes API token")
    # Without the API token, the built-in Kubernetes secret store cannot start,
    # and its failed Init stops daprd.
    if "disable-builtin-k8s-secret-store" not in got["flags"]:
        problems.append("daprd would start the built-in Kubernetes secret store, which needs the API token")
    # The one token daprd does need (for Sentry) is the injector's own projection.
    sentry = [m for m in got["service_account_token_mounts"] if m["mountPath"] == SENTRY_TOKEN_DIR]
    if not sentry:
        problems.append(f"no Sentry token projected into daprd at {SENTRY_TOKEN_DIR}")
    elif any(m["audience"] != SENTRY_AUDIENCE for m in sentry):
        problems.append(f"the Sentry token's audience is not {SENTRY_AUDIENCE}: {sentry}")
    others = [m for m in got["service_account_token_mounts"] if m["mountPath"] != SENTRY_TOKEN_DIR]
    if others:
        problems.append(f"daprd mounts other service-account tokens: {others}")
    return problems


CHECKS = [
    check_injected,
    check_app_port,
    check_app_protocol,
    check_app_max_concurrency,
    check_graceful_shutdown,
    check_app_token,
    check_builtin_secret_store_disabled,
    check_annotations_known,
    check_tokens,
]


def problems_in(text, checks):
    """Runs `checks` on every Deployment in `text`: {name: [problem, ...]}."""
    got = inject(text)
    deps = deployments(text)
    assert deps, "no Deployments rendered"
    assert sorted(got) == sorted(d["metadata"]["name"] for d in deps)
    found = {}
    for dep in deps:
        name = dep["metadata"]["name"]
        ps = [p for check in checks for p in check(dep, got[name])]
        if ps:
            found[name] = ps
    return found


def assert_clean(overlay, check):
    found = problems_in(rendered(overlay), [check])
    assert not found, f"{overlay}: " + "; ".join(f"{n}: {', '.join(ps)}" for n, ps in found.items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_daprd_is_injected(overlay):
    assert_clean(overlay, check_injected)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_daprd_calls_the_app_on_its_http_port(overlay):
    assert_clean(overlay, check_app_port)
    assert_clean(overlay, check_app_protocol)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_daprd_concurrency_matches_the_consumer(overlay):
    consumers = [
        d for d in deployments(rendered(overlay)) if "WASM_PC_MAX_CONCURRENCY" in env_of(app_container(d))
    ]
    assert consumers, "no Deployment sets WASM_PC_MAX_CONCURRENCY: nothing to compare"
    assert_clean(overlay, check_app_max_concurrency)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_daprd_graceful_shutdown_is_the_annotation(overlay):
    assert_clean(overlay, check_graceful_shutdown)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_daprd_gets_the_app_token(overlay):
    assert_clean(overlay, check_app_token)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_kubernetes_secret_store_is_disabled(overlay):
    assert_clean(overlay, check_builtin_secret_store_disabled)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_dapr_annotation_is_one_dapr_reads(overlay):
    assert_clean(overlay, check_annotations_known)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_daprd_needs_no_token_the_pod_lacks(overlay):
    assert_clean(overlay, check_tokens)


def broken(text, edit):
    """A copy of the rendered YAML with `edit` applied to every Deployment."""
    docs = [d for d in yaml.safe_load_all(text) if d]
    for d in docs:
        if d["kind"] == "Deployment":
            edit(d)
    return yaml.safe_dump_all(copy.deepcopy(docs), sort_keys=False)


def rename_annotation(old, new):
    def edit(dep):
        an = dep["spec"]["template"]["metadata"]["annotations"]
        an[new] = an.pop(old)

    return edit


def set_annotation(key, value):
    def edit(dep):
        dep["spec"]["template"]["metadata"]["annotations"][key] = value

    return edit


@pytest.mark.parametrize(
    "edit, check, expect",
    [
        # A misspelt annotation: Dapr ignores it (and keeps its default).
        (rename_annotation("dapr.io/app-max-concurrency", "dapr.io/app-max-concurency"),
         check_annotations_known, "Dapr does not read dapr.io/app-max-concurency"),
        (rename_annotation("dapr.io/graceful-shutdown-seconds", "dapr.io/graceful-shutdown-second"),
         check_graceful_shutdown, "no dapr.io/graceful-shutdown-seconds"),
        (rename_annotation("dapr.io/app-token-secret", "dapr.io/app-token-secrets"),
         check_app_token, "no dapr.io/app-token-secret"),
        # Values Dapr cannot use.
        (set_annotation("dapr.io/app-port", "80"), check_app_port, "daprd --app-port '80'"),
        (set_annotation("dapr.io/graceful-shutdown-seconds", "ten"), check_annotations_known,
         "Dapr cannot parse dapr.io/graceful-shutdown-seconds"),
        (set_annotation(DISABLE_SECRET_STORE, "ture"), check_builtin_secret_store_disabled,
         "lacks --disable-builtin-k8s-secret-store"),
        (set_annotation("dapr.io/app-protocol", "grpc"), check_app_protocol, "--app-protocol 'grpc'"),
    ],
    ids=["misspelt-concurrency", "misspelt-shutdown", "misspelt-token", "wrong-port", "bad-int",
         "bad-bool", "grpc"],
)
def test_the_checks_catch_a_broken_manifest(edit, check, expect):
    text = broken(rendered("hot-swap"), edit)
    found = problems_in(text, [check])
    names = {d["metadata"]["name"] for d in deployments(text)}
    assert set(found) == names, f"the check missed a broken Deployment: {found}"
    for name, ps in found.items():
        assert any(expect in p for p in ps), f"{name}: {ps}"


def test_the_tool_reads_what_dapr_reads():
    """unknown_annotations comes from SidecarConfig itself, not a list here."""
    text = broken(rendered("hot-swap"), set_annotation("dapr.io/no-such-annotation", "1"))
    got = inject(text)
    for name, res in got.items():
        assert res["unknown_annotations"] == ["dapr.io/no-such-annotation"], name
        # Known annotations all show up with their effective values.
        assert res["effective_annotations"]["dapr.io/enabled"] == "true"
        assert DISABLE_SECRET_STORE in res["effective_annotations"]
