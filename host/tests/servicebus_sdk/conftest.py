"""Fixtures for the Service Bus SDK conformance suite: a `wasm-pc servicebus`
endpoint per test module (or per test, when it needs its own queue
properties), each with its own database, killed at teardown pass or fail.

The binary is `$WASM_PC_BIN` (e.g. target/debug/wasm-pc); the suite refuses
to run without it rather than guess which build to test.
"""

import atexit
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

# How long an endpoint may take to print its connection string.
START_TIMEOUT_SECS = 30
# How long a test may take unless marked `@pytest.mark.budget(secs)`. The
# SDK retries and waits up to 60 s for a missing answer, so an endpoint that
# drops one would otherwise pass, slowly.
DEFAULT_BUDGET_SECS = 30
BANNER = "Service Bus endpoint: "


def endpoint_binary() -> str:
    path = os.environ.get("WASM_PC_BIN")
    if not path:
        pytest.fail(
            "WASM_PC_BIN is not set: point it at the wasm-pc binary to test, "
            "e.g. WASM_PC_BIN=target/debug/wasm-pc (build it with cargo build -p wasm-pc)",
            pytrace=False,
        )
    if not os.access(path, os.X_OK):
        pytest.fail(f"WASM_PC_BIN={path} is not an executable file", pytrace=False)
    # The endpoint runs in its own directory: a relative path would not resolve there.
    return os.path.abspath(path)


class Endpoint:
    """A running endpoint: its connection string, and its log for failures."""

    def __init__(self, directory: Path, args: list, mode=("servicebus", "--port", "0")):
        self.directory = directory
        self.log_path = directory / "endpoint.log"
        self.connection_string = None
        # `mode` is the subcommand serving the endpoint: `servicebus`, or `dev`
        # with its guests.
        command = [endpoint_binary(), *mode, "--db", str(directory / "queue.db"), *args]
        self._log = open(self.log_path, "wb")
        # Port 0: the endpoint binds a free port and prints it, so no race for one.
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL, cwd=directory
        )
        self._banner = threading.Event()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        if not self._banner.wait(START_TIMEOUT_SECS) or self.connection_string is None:
            self.stop()
            pytest.fail(f"the endpoint did not start ({' '.join(command)}):\n{self.log()}", pytrace=False)

    def _read_stdout(self):
        # Reads until the process ends, so a chatty endpoint never blocks on a full pipe.
        for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith(BANNER) and self.connection_string is None:
                self.connection_string = line[len(BANNER):].strip()
                self._banner.set()
        self._banner.set()

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-20_000:]

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()

    def with_key(self, key: str) -> str:
        """The connection string with a different SharedAccessKey."""
        parts = [p for p in self.connection_string.split(";") if p]
        return ";".join(f"SharedAccessKey={key}" if p.startswith("SharedAccessKey=") else p for p in parts) + ";"


def emulator_config(queues: dict) -> str:
    """A config.json in the Service Bus emulator's format: name → Properties."""
    return json.dumps(
        {
            "UserConfig": {
                "Namespaces": [
                    {
                        "Name": "sbemulatorns",
                        "Queues": [{"Name": name, "Properties": props} for name, props in queues.items()],
                        "Topics": [],
                    }
                ]
            }
        }
    )


# Endpoints running now: a failing test's report gets their logs.
LIVE = []


@atexit.register
def _kill_leftovers():
    # Teardown stops them; this covers a run interrupted before it.
    for endpoint in LIVE:
        if endpoint.process.poll() is None:
            endpoint.process.kill()


def _start(directory: Path, args: list, config=None, mode=("servicebus", "--port", "0")) -> Endpoint:
    if config is not None:
        (directory / "config.json").write_text(emulator_config(config))
        args = [*args, "--config", str(directory / "config.json")]
    endpoint = Endpoint(directory, args, mode)
    LIVE.append(endpoint)
    return endpoint


def _stop(endpoint: Endpoint):
    endpoint.stop()
    LIVE.remove(endpoint)


@pytest.fixture(scope="module")
def servicebus(request, tmp_path_factory):
    """The module's endpoint, serving the queues its `SERVICEBUS_QUEUES`
    declares (name → emulator-style Properties)."""
    queues = getattr(request.module, "SERVICEBUS_QUEUES", None)
    if not queues:
        pytest.fail(f"{request.module.__name__} declares no SERVICEBUS_QUEUES", pytrace=False)
    endpoint = _start(tmp_path_factory.mktemp("servicebus"), [], config=queues)
    yield endpoint
    _stop(endpoint)


@pytest.fixture
def start_endpoint(tmp_path_factory):
    """Starts an endpoint of the test's own: `start_endpoint(args, config=None,
    mode=...)` with command-line flags and/or emulator-style queues, served by
    `wasm-pc servicebus` or the `mode` subcommand given; stopped after it."""
    started = []

    def start(args, config=None, mode=("servicebus", "--port", "0")):
        endpoint = _start(tmp_path_factory.mktemp("servicebus"), args, config, mode)
        started.append(endpoint)
        return endpoint

    yield start
    for endpoint in started:
        _stop(endpoint)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    # A failure report carries the running endpoints' logs.
    report = yield
    if report.failed:
        for endpoint in LIVE:
            report.sections.append((f"endpoint log {endpoint.log_path}", endpoint.log()))
    return report


def pytest_configure(config):
    config.addinivalue_line("markers", "budget(secs): the test fails if it runs longer (default 30 s)")


@pytest.fixture(autouse=True)
def time_budget(request):
    """Fails a test that ran past its budget, even if it passed."""
    marker = request.node.get_closest_marker("budget")
    budget = marker.args[0] if marker else DEFAULT_BUDGET_SECS
    started = time.monotonic()
    yield
    took = time.monotonic() - started
    if took > budget:
        pytest.fail(f"took {took:.0f}s, over its {budget}s budget: a wait ran into an SDK time-out", pytrace=False)
