"""The overlays as `kubectl kustomize` renders them, shared by every check.

Rendering needs kubectl and the modules `cargo xtask guests` puts in the
overlays; without either the checks fail (they are never skipped).
"""

import copy
import functools
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"


@functools.cache
def rendered_text(overlay):
    """The overlay's objects as one YAML stream."""
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl (with kustomize) is needed to render the overlays", pytrace=False)
    missing = [p for p in (K8S / "overlays").glob("*/modules") if not any(p.glob("*.wasm"))]
    missing += [
        K8S / "overlays" / o / "modules"
        for o in ("hot-swap", "rolling")
        if not (K8S / "overlays" / o / "modules").is_dir()
    ]
    assert not missing, f"run `cargo xtask guests` first: no modules in {missing}"
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@functools.cache
def _documents(overlay):
    return [d for d in yaml.safe_load_all(rendered_text(overlay)) if d]


def render(overlay):
    """The overlay's objects, a copy each call: tests may change them."""
    return copy.deepcopy(_documents(overlay))
