"""The Dapr Resiliency that gives the consumer's input binding retries with
back-off (k8s/base/resiliency.yaml), checked against what Dapr v1.18.0 does
with it and against the objects it must line up with.

Facts these checks rest on (dapr/dapr v1.18.0, dapr/kit v0.18.1,
cenkalti/backoff v4.3.0):
- pkg/resiliency/resiliency.go loadLocalResiliencyPath: standalone daprd
  (--resources-path) unmarshals each YAML file as ONE object, so only the
  first document of a file can be a Resiliency; anything after it is ignored.
- pkg/apis/resiliency/v1alpha1 Retry has only policy, duration, maxInterval,
  maxRetries and matching. An exponential policy starts at 500 ms, grows x1.5
  per retry and randomizes each wait by +-50% (backoff defaults, not
  settable); `duration` is ignored for it; without maxRetries it retries
  until 15 minutes have passed.
- pkg/runtime/processor/binding/send.go: the inbound policy of the input
  binding's component wraps the POST to the app; any status but exactly 200
  is a failure, retried when `matching.httpStatusCodes` includes it.
- The Service Bus binding keeps the message locked while daprd retries
  (lockRenewalInSec) and only the final Abandon raises DeliveryCount.
"""

import re
from pathlib import Path

import pytest
import yaml
from rendering import render

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ["hot-swap", "rolling", "workload-identity", "pubsub"]

# The queue as docs/deploy.md creates it (`az servicebus queue create ...
# --lock-duration PT1M --max-delivery-count 10`): checked against the doc below.
LOCK_DURATION_S = 60
MAX_DELIVERY_COUNT = 10
# Dapr's exponential back-off (not settable through a Resiliency).
INITIAL_S, MULTIPLIER, JITTER = 0.5, 1.5, 0.5
# What the host answers when the consumer asks for a retry (or traps, times
# out, hits a limit), and answers that retrying cannot fix: a wrong token, a
# body over --max-body-bytes.
HOST_RETRY_STATUS = 500
NOT_RETRIABLE = (401, 413)
# The host's wall-time limit per invocation is WASM_PC_TIMEOUT_MS (default
# read from the source below) plus this slack for its outer timer.
TIMER_SLACK_S = 0.25




@pytest.fixture(params=OVERLAYS, scope="module")
def docs(request):
    return render(request.param)


def resiliency(docs):
    found = [d for d in docs if d["kind"] == "Resiliency"]
    assert len(found) == 1, f"exactly one Resiliency, found {len(found)}"
    return found[0]


def env(deployment):
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def consumer(docs):
    """The Deployment that reads an input binding or a topic (the consumer)."""
    found = [d for d in docs if d["kind"] == "Deployment" and {"WASM_PC_INPUT_BINDING", "WASM_PC_PUBSUB"} & set(env(d))]
    assert len(found) == 1
    return found[0]


def consumer_component(deployment):
    """The Component the consumer's deliveries come through."""
    e = env(deployment)
    return e.get("WASM_PC_PUBSUB") or e["WASM_PC_INPUT_BINDING"]


def duration_s(text):
    """A Go duration as Dapr parses it (time.ParseDuration), in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a Go duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def status_codes(spec):
    """Dapr's httpStatusCodes syntax: comma-separated codes and ranges."""
    codes = set()
    for part in spec.split(","):
        low, _, high = part.strip().partition("-")
        codes |= set(range(int(low), int(high or low) + 1))
    return codes


def retry_policy(res):
    inbound = res["spec"]["targets"]["components"]
    (binding, target), = inbound.items()
    return binding, res["spec"]["policies"]["retries"][target["inbound"]["retry"]]


def host_default_timeout_s():
    for source in (ROOT / "host" / "src").rglob("*.rs"):
        m = re.search(r'env = "WASM_PC_TIMEOUT_MS", default_value_t = ([\d_]+)', source.read_text())
        if m:
            return int(m.group(1).replace("_", "")) / 1000
    raise AssertionError("WASM_PC_TIMEOUT_MS's default is no longer where this test looks for it")


def waits_s(policy):
    """(expected, worst) seconds daprd waits over all retries of one delivery."""
    cap = duration_s(policy["maxInterval"])
    intervals = [min(cap, INITIAL_S * MULTIPLIER**k) for k in range(policy["maxRetries"])]
    return sum(intervals), sum(intervals) * (1 + JITTER)


def test_the_rendered_overlays_hold_exactly_one_resiliency(docs):
    res = resiliency(docs)
    assert res["apiVersion"] == "dapr.io/v1alpha1"
    assert set(res) == {"apiVersion", "kind", "metadata", "spec", "scopes"}
    assert set(res["spec"]) == {"policies", "targets"}


def test_the_resiliency_is_the_first_and_only_document_of_its_file():
    """daprd's file loader reads only the first document of each file."""
    holders = []
    for path in sorted(K8S.rglob("*.yaml")):
        if "tests" in path.parts:
            continue
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
        kinds = [d.get("kind") for d in documents if isinstance(d, dict)]
        if "Resiliency" in kinds:
            holders.append(path)
            assert kinds[0] == "Resiliency", f"{path}: daprd would not see the Resiliency (not the first document)"
            assert kinds == ["Resiliency"], f"{path}: keep the Resiliency alone in its file"
    assert [p.relative_to(K8S) for p in holders] == [Path("base/resiliency.yaml")]
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    assert "resiliency.yaml" in base["resources"]


def test_it_targets_the_consumers_input_binding_and_only_the_consumer(docs):
    res = resiliency(docs)
    deployment = consumer(docs)
    app_id = deployment["spec"]["template"]["metadata"]["annotations"]["dapr.io/app-id"]
    targets = res["spec"]["targets"]
    assert set(targets) == {"components"}, "no app, actor or default targets: only the input binding"
    components = {c["metadata"]["name"]: c for c in docs if c["kind"] == "Component"}
    binding, _ = retry_policy(res)
    assert binding == consumer_component(deployment), "the policy must name the consumer's input binding or pub/sub"
    meta = {m["name"]: m.get("value") for m in components[binding]["spec"]["metadata"]}
    if components[binding]["spec"]["type"].startswith("bindings."):
        assert meta["direction"] == "input"
        assert components[binding]["scopes"] == [app_id]
    assert set(targets["components"][binding]) == {"inbound"}, "inbound only: the host retries its own sends"
    assert res["scopes"] == [app_id], "scoped to the consumer's app id"
    assert app_id in components[binding]["scopes"]


def test_the_retry_policy_is_bounded_exponential_on_server_errors_only(docs):
    _, policy = retry_policy(resiliency(docs))
    assert policy["policy"] == "exponential"
    assert "duration" not in policy, "ignored for exponential: it would only mislead"
    assert isinstance(policy.get("maxRetries"), int) and 1 <= policy["maxRetries"] <= 10, (
        "without maxRetries daprd retries for up to 15 minutes"
    )
    assert duration_s(policy["maxInterval"]) >= INITIAL_S
    codes = status_codes(policy["matching"]["httpStatusCodes"])
    assert codes and all(500 <= c <= 599 for c in codes), "5xx only"
    assert HOST_RETRY_STATUS in codes, "the host's retry answer must be retried"
    assert not codes & set(NOT_RETRIABLE)
    assert set(policy["matching"]) == {"httpStatusCodes"}, "the HTTP app channel: gRPC codes never apply"


def test_retrying_fits_inside_the_queues_lock(docs):
    """The rule: one delivery's whole retry chain, in the worst case (every
    wait at +50% jitter and every attempt running to the host's invocation
    timeout), ends before the queue's lock duration. daprd renews the lock
    every lockRenewalInSec while it retries, so this is a margin, not a
    necessity: with it, even renewals that all fail cannot hand the message
    to another pod while this one is still retrying it. It also keeps the
    expected waits (about 6.6 s for 5 retries) a small fraction of the lock."""
    res = resiliency(docs)
    binding, policy = retry_policy(res)
    deployment = consumer(docs)
    timeout = float(env(deployment).get("WASM_PC_TIMEOUT_MS") or host_default_timeout_s() * 1000) / 1000
    expected, worst = waits_s(policy)
    attempts = policy["maxRetries"] + 1
    chain = worst + attempts * (timeout + TIMER_SLACK_S)
    assert chain < LOCK_DURATION_S, (
        f"worst case {chain:.1f} s ({worst:.1f} s of waits + {attempts} x {timeout + TIMER_SLACK_S} s) "
        f">= the {LOCK_DURATION_S} s lock"
    )
    assert expected <= LOCK_DURATION_S / 4, f"{expected:.1f} s of expected waits is not well below the lock"
    component = next(c for c in docs if c["kind"] == "Component" and c["metadata"]["name"] == binding)
    meta = {m["name"]: m.get("value") for m in component["spec"]["metadata"]}
    assert int(meta["lockRenewalInSec"]) < LOCK_DURATION_S, "renewed before it lapses"


def test_the_numbers_match_the_queue_the_walkthrough_creates():
    text = (ROOT / "docs" / "deploy.md").read_text()
    create = [line for line in text.splitlines() if "az servicebus queue create" in line and "-n orders " in line]
    assert create, "docs/deploy.md must create the orders queue"
    joined = " ".join(create)
    follow = text[text.index(create[0]) :].split("\n\n", 1)[0]
    assert f"--lock-duration PT{LOCK_DURATION_S // 60}M" in joined + follow
    assert f"--max-delivery-count {MAX_DELIVERY_COUNT}" in joined + follow


def test_the_doc_quotes_the_expected_and_worst_case_waits():
    """docs/deploy.md explains the timing; keep its figures true."""
    policy = yaml.safe_load((K8S / "base" / "resiliency.yaml").read_text())
    _, retry = retry_policy(policy)
    expected, worst = waits_s(retry)
    text = (ROOT / "docs" / "deploy.md").read_text()
    assert f"{expected:.1f} s" in text, f"docs/deploy.md should say about {expected:.1f} s"
    assert f"{worst:.1f} s" in text, f"docs/deploy.md should say at most {worst:.1f} s"
