"""`wasm-pc dev --servicebus-port`: the sample guests and Service Bus clients
share the embedded queues. A client's message is consumed by the consumer
guest, whose forward lands where a client reads it; the producer's HTTP
endpoint feeds the same loop; a rejected order waits in the dead-letter queue
with the guest's reason.

Needs the sample guests (`cargo xtask guests`, in `target/modules`, or
`$WASM_PC_MODULES_DIR`) besides what test_python_sdk.py needs.
"""

import json
import os
import re
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusMessage, ServiceBusSubQueue

CREDIT_LIMIT_CENTS = 100_000


def modules_dir() -> Path:
    directory = Path(os.environ.get("WASM_PC_MODULES_DIR") or Path(__file__).parents[3] / "target" / "modules")
    for file in ["producer.wasm", "consumer.wasm"]:
        if not (directory / file).is_file():
            pytest.fail(f"{directory / file} is missing: build the guests with `cargo xtask guests`", pytrace=False)
    return directory.resolve()


@pytest.fixture
def dev(start_endpoint):
    """`wasm-pc dev` consuming `orders`, forwarding to `shipments`, both
    served over AMQP too."""
    return start_endpoint(
        [
            "--modules-dir",
            str(modules_dir()),
            "--bindings",
            "orders,shipments",
            "--consumer-config",
            f"forward-binding=shipments,max-order-cents={CREDIT_LIMIT_CENTS}",
            "--lock-ms",
            "5000",
            "--reload",
            "false",
        ],
        mode=("dev", "--servicebus-port", "0", "--listen", "127.0.0.1:0"),
    )


def order(order_id: str, price_cents: int = 1_250) -> dict:
    return {"id": order_id, "customer": "acme", "items": [{"sku": "SKU-1", "qty": 2, "price_cents": price_cents}]}


def receive_all(client: ServiceBusClient, queue: str, count: int, sub_queue=None, budget_secs: float = 20) -> list:
    """Receives and completes up to `count` messages, waiting at most the budget."""
    got = []
    deadline = time.monotonic() + budget_secs
    with client.get_queue_receiver(queue, sub_queue=sub_queue, max_wait_time=1) as receiver:
        while len(got) < count and time.monotonic() < deadline:
            for message in receiver.receive_messages(max_message_count=count - len(got), max_wait_time=1):
                got.append(message)
                receiver.complete_message(message)
    return got


def producer_url(endpoint) -> str:
    """The producer endpoint's URL, from the log line dev writes once it listens."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = re.search(r"POST (http://\S+/produce)", endpoint.log())
        if found:
            return found.group(1)
        time.sleep(0.1)
    pytest.fail(f"dev never logged its producer endpoint:\n{endpoint.log()}", pytrace=False)


def test_a_client_message_is_consumed_and_its_forward_read_by_a_client(dev):
    run = uuid.uuid4().hex[:8]
    ids = [f"{run}-{i}" for i in range(20)]
    with ServiceBusClient.from_connection_string(dev.connection_string, retry_total=1) as client:
        with client.get_queue_sender("orders") as sender:
            sender.send_messages(
                [
                    ServiceBusMessage(json.dumps(order(i)), message_id=i, content_type="application/json")
                    for i in ids
                ]
            )
        shipped = receive_all(client, "shipments", len(ids))
        summaries = [json.loads(str(m)) for m in shipped]
        assert sorted(s["order"] for s in summaries) == sorted(ids)
        assert all(s["total_cents"] == 2_500 and s["customer"] == "acme" for s in summaries)
        assert sorted(str(m.message_id) for m in shipped) == sorted(f"{i}-processed" for i in ids)
        assert all(m.content_type == "application/json" for m in shipped)

        with client.get_queue_receiver("orders", max_wait_time=1) as receiver:
            assert receiver.peek_messages(max_message_count=10) == [], "consumed orders are gone"


def test_a_rejected_order_waits_in_the_dead_letter_queue_with_the_guests_reason(dev):
    over = f"{uuid.uuid4().hex[:8]}-yacht"
    with ServiceBusClient.from_connection_string(dev.connection_string, retry_total=1) as client:
        with client.get_queue_sender("orders") as sender:
            sender.send_messages(ServiceBusMessage(json.dumps(order(over, CREDIT_LIMIT_CENTS)), message_id=over))
        dead = receive_all(client, "orders", 1, sub_queue=ServiceBusSubQueue.DEAD_LETTER)
        assert [str(m.message_id) for m in dead] == [over]
        assert json.loads(str(dead[0]))["id"] == over, "the order is kept as sent"
        assert "credit limit" in (dead[0].dead_letter_error_description or "") + (dead[0].dead_letter_reason or "")
        assert receive_all(client, "shipments", 1, budget_secs=2) == [], "nothing was forwarded"


def test_orders_posted_to_the_producer_reach_a_client_through_both_guests(dev):
    run = uuid.uuid4().hex[:8]
    ids = [f"{run}-{i}" for i in range(5)]
    request = urllib.request.Request(
        producer_url(dev),
        data=json.dumps([order(i) for i in ids]).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 202
        assert json.loads(response.read())["accepted"] == len(ids)
    with ServiceBusClient.from_connection_string(dev.connection_string, retry_total=1) as client:
        shipped = receive_all(client, "shipments", len(ids))
        assert sorted(json.loads(str(m))["order"] for m in shipped) == sorted(ids)
