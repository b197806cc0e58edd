"""Conformance of the local Service Bus endpoint (`wasm-pc servicebus`) with
the real Python SDK, azure-servicebus 7.15.0 from PyPI.

Run from the repository root:

    cargo build -p wasm-pc
    python3 -m venv DIR
    DIR/bin/pip install -r host/tests/servicebus_sdk/requirements.txt
    WASM_PC_BIN=target/debug/wasm-pc DIR/bin/python -m pytest -q host/tests/servicebus_sdk

conftest.py starts one endpoint for this module, serving the queues in
SERVICEBUS_QUEUES (one per test, so tests do not see each other's
messages), and an endpoint of their own for the tests that need queue
properties set by flag. Every wait below is bounded.
"""

import datetime
import os
import threading
import time
import uuid

import pytest
from azure.servicebus import (
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusMessageState,
    ServiceBusReceiveMode,
    ServiceBusSubQueue,
)
from azure.servicebus.amqp import AmqpAnnotatedMessage, AmqpMessageBodyType
from azure.servicebus.exceptions import (
    MessageLockLostError,
    MessageNotFoundError,
    MessageSizeExceededError,
    MessagingEntityNotFoundError,
    ServiceBusAuthenticationError,
    ServiceBusConnectionError,
)

LOCK_SECS = 2
MAX_DELIVERY_COUNT = 3

# The module endpoint's queues, in the Service Bus emulator's config format.
SERVICEBUS_QUEUES = {
    name: {}
    for name in [
        "basic",
        "properties",
        "binary",
        "abandon",
        "deadletter",
        "batch",
        "scheduled",
        "cancel",
        "peek",
        "bulk",
        "deferred",
        "receive-and-delete",
        "released-on-close",
        "body-types",
        "deferred-delete",
        "competing",
        "oversized",
    ]
}
SERVICEBUS_QUEUES["max-delivery"] = {"MaxDeliveryCount": MAX_DELIVERY_COUNT}
for name in ["renew", "expired-lock", "lost-lock", "lock-lost-on-settle"]:
    SERVICEBUS_QUEUES[name] = {"LockDuration": f"PT{LOCK_SECS}S"}
SERVICEBUS_QUEUES["expiring"] = {"DeadLetteringOnMessageExpiration": True}


def client(connection_string, **kwargs):
    # Few retries: a failure should show quickly, not after the SDK's backoff.
    kwargs.setdefault("retry_total", 1)
    return ServiceBusClient.from_connection_string(connection_string, **kwargs)


def utcnow():
    return datetime.datetime.now(datetime.timezone.utc)


def body_of(message) -> bytes:
    return b"".join(message.body)


def receive(receiver, count, within_secs=10.0, settle=None):
    """Receives up to `count` messages within `within_secs`, settling each
    with `settle` (e.g. receiver.complete_message) if given."""
    got = []
    deadline = time.monotonic() + within_secs
    while len(got) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        batch = receiver.receive_messages(max_message_count=count - len(got), max_wait_time=min(left, 5))
        for message in batch:
            if settle is not None:
                settle(message)
        got.extend(batch)
    return got


def receive_one(receiver, within_secs=10.0):
    got = receive(receiver, 1, within_secs)
    assert got, f"no message within {within_secs}s"
    return got[0]


def assert_empty(receiver, wait_secs=1.0):
    extra = receiver.receive_messages(max_message_count=10, max_wait_time=wait_secs)
    assert extra == [], f"unexpected messages: {[str(m) for m in extra]}"


def test_send_receive_complete(servicebus):
    with client(servicebus.connection_string) as sb:
        with sb.get_queue_sender("basic") as sender:
            sender.send_messages(ServiceBusMessage("hello"))
        with sb.get_queue_receiver("basic") as receiver:
            message = receive_one(receiver)
            assert str(message) == "hello"
            assert message.delivery_count == 0
            assert message.sequence_number >= 1
            assert isinstance(message.lock_token, (str, uuid.UUID)) and uuid.UUID(str(message.lock_token))
            assert message.locked_until_utc > utcnow()
            assert abs((message.enqueued_time_utc - utcnow()).total_seconds()) < 60
            receiver.complete_message(message)
            assert_empty(receiver)


def test_message_properties_round_trip(servicebus):
    application_properties = {
        "text": "café ✓",
        "int": 42,
        "negative": -7,
        "float": 2.5,
        "yes": True,
        "no": False,
        "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "when": datetime.datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=datetime.timezone.utc),
    }
    sent = ServiceBusMessage(
        '{"k": 1}',
        message_id="id-" + uuid.uuid4().hex,
        correlation_id="corr-1",
        subject="the subject",
        content_type="application/json",
        application_properties=application_properties,
        time_to_live=datetime.timedelta(minutes=5),
        reply_to="replies",
        to="someone",
        partition_key="pk-1",
    )
    with client(servicebus.connection_string) as sb:
        with sb.get_queue_sender("properties") as sender:
            sender.send_messages(sent)
        with sb.get_queue_receiver("properties") as receiver:
            got = receive_one(receiver)
            assert (got.message_id, got.correlation_id, got.subject, got.content_type) == (
                sent.message_id,
                "corr-1",
                "the subject",
                "application/json",
            )
            assert (got.reply_to, got.to, got.partition_key) == ("replies", "someone", "pk-1")
            assert got.state == ServiceBusMessageState.ACTIVE
            assert got.time_to_live == datetime.timedelta(minutes=5)
            assert got.expires_at_utc - got.enqueued_time_utc == datetime.timedelta(minutes=5)
            received = {k.decode() if isinstance(k, bytes) else k: v for k, v in got.application_properties.items()}
            for key, value in application_properties.items():
                assert key in received, f"{key} missing from {received}"
                back = received[key]
                if isinstance(value, str) and isinstance(back, bytes):
                    back = back.decode()
                if isinstance(value, datetime.datetime):
                    # pyamqp hands an AMQP timestamp back as milliseconds since the epoch.
                    value = int(value.timestamp() * 1000)
                assert back == value and type(back) is type(value), f"{key}: sent {value!r}, got {back!r}"
            assert str(got) == '{"k": 1}'
            receiver.complete_message(got)


def test_binary_body_is_byte_exact(servicebus):
    # Every byte value, NULs and invalid UTF-8 included; large enough to
    # span several frames.
    payload = bytes(range(256)) * 256 + os.urandom(100_000)
    with client(servicebus.connection_string) as sb:
        with sb.get_queue_sender("binary") as sender:
            sender.send_messages(ServiceBusMessage(payload))
            sender.send_messages(ServiceBusMessage(b""))
        with sb.get_queue_receiver("binary") as receiver:
            first, empty = receive(receiver, 2, settle=receiver.complete_message)
            assert len(body_of(first)) == len(payload) and body_of(first) == payload
            assert body_of(empty) == b""


def test_value_and_sequence_bodies_round_trip(servicebus):
    # AMQP bodies other than data sections come back as they were sent.
    value = {"order": 7, "lines": ["a", "b"], "ok": True}
    with client(servicebus.connection_string) as sb:
        with sb.get_queue_sender("body-types") as sender:
            sender.send_messages(AmqpAnnotatedMessage(value_body=value))
            sender.send_messages(AmqpAnnotatedMessage(sequence_body=[[1, 2, 3], ["x"]]))
        with sb.get_queue_receiver("body-types") as receiver:
            first, second = receive(receiver, 2, settle=receiver.complete_message)
            assert first.body_type == AmqpMessageBodyType.VALUE
            decoded = {k.decode() if isinstance(k, bytes) else k: v for k, v in first.body.items()}
            assert decoded["order"] == 7 and decoded["ok"] is True
            assert [x.decode() if isinstance(x, bytes) else x for x in decoded["lines"]] == ["a", "b"]
            assert second.body_type == AmqpMessageBodyType.SEQUENCE
            sequences = [[x.decode() if isinstance(x, bytes) else x for x in section] for section in second.body]
            assert sequences == [[1, 2, 3], ["x"]]


def test_abandon_increments_delivery_count(servicebus):
    with client(servicebus.connection_string) as sb:
        with sb.get_queue_sender("abandon") as sender:
            sender.send_messages(ServiceBusMessage("again"))
        with sb.get_queue_receiver("abandon") as receiver:
            for expected in range(3):
                message = receive_one(receiver)
                assert (str(message), message.delivery_count) == ("again", expected)
                if expected < 2:
                    receiver.abandon_message(message)
            receiver.complete_message(message)
            assert_empty(receiver)


def test_abandon_past_max_delivery_count_dead_letters(servicebus):
    with client(servicebus.connection_string) as sb:
        with sb.get_queue_sender("max-delivery") as sender:
            sender.send_messages(ServiceBusMessage("poison"))
        with sb.get_queue_receiver("max-delivery") as receiver:
            for _ in range(MAX_DELIVERY_COUNT):
                receiver.abandon_message(receive_one(receiver))
            assert_empty(receiver)
        with sb.get_queue_receiver("max-delivery", sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
            dead = receive_one(dlq)
            assert str(dead) == "poison"
            assert dead.dead_letter_reason == "MaxDeliveryCountExceeded"
            dlq.complete_message(dead)


def test_dead_letter_with_reason_and_description(servicebus):
    with client(servicebus.connection_string) as sb:
        with sb.get_queue_sender("deadletter") as sender:
            sender.send_messages(ServiceBusMessage("bad", application_properties={"kept": "yes"}))
        with sb.get_queue_receiver("deadletter") as receiver:
            message = receive_one(receiver)
            receiver.dead_letter_message(message, reason="Invalid", error_description="the order has no lines")
            assert_empty(receiver)
        with sb.get_queue_receiver("deadletter", sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
            (peeked,) = dlq.peek_messages(max_message_count=10)
            assert (str(peeked), peeked.dead_letter_reason) == ("bad", "Invalid")
            dead = receive_one(dlq)
            assert str(dead) == "bad"
            assert (dead.dead_letter_reason, dead.dead_letter_error_description) == ("Invalid", "the order has no lines")
            assert dead.application_properties.get(b"kept", dead.application_properties.get("kept")) in ("yes", b"yes")
            dlq.complete_message(dead)
            assert_empty(dlq)


def test_renew_lock_keeps_the_message(servicebus):
    # A queue with a 2 s lock: the message is held two lock durations by
    # renewing, and still completes.
    with client(servicebus.connection_string) as sb:
        with sb.get_queue_sender("renew") as sender:
            sender.send_messages(ServiceBusMessage("held"))
        with sb.get_queue_receiver("renew") as receiver, sb.get_queue_receiver("renew") as other:
            message = receive_one(receiver)
            first_until = message.locked_until_utc
            assert first_until - utcnow() <= datetime.timedelta(seconds=LOCK_SECS + 1)
            held_until = time.monotonic() + 2 * LOCK_SECS
            while time.monotonic() < held_until:
                # Meanwhile another receiver asks, and gets nothing.
                assert_empty(other, wait_secs=LOCK_SECS / 3)
                renewed = receiver.renew_message_lock(message)
                assert renewed > first_until and renewed == message.locked_until_utc
            receiver.complete_message(message)
            assert_empty(other)


def test_an_expired_lock_is_redelivered(servicebus):
    with client(servicebus.connection_string) as sb:
        with sb.get_queue_sender("expired-lock") as sender:
            sender.send_messages(ServiceBusMessage("forgotten"))
        with sb.get_queue_receiver("expired-lock") as receiver:
            first = receive_one(receiver)
            assert first.delivery_count == 0
            again = receive_one(receiver, within_secs=LOCK_SECS + 10)
            assert str(again) == "forgotten" and again.sequence_number == first.sequence_number
            assert again.delivery_count == 1
            assert again.lock_token != first.lock_token
            with pytest.raises(MessageLockLostError):
                receiver.complete_message(first)
            receiver.complete_message(again)
            assert_empty(receiver)


def test_renewing_a_lost_lock_fails(servicebus):
    # The SDK checks nothing locally before a renew: the endpoint answers
    # 410 for a lock that expired and went to another receiver.
    with client(servicebus.connection_string) as sb:
        with sb.get_queue_sender("lost-lock") as sender:
            sender.send_messages(ServiceBusMessage("lost"))
        with sb.get_queue_receiver("lost-lock") as receiver, sb.get_queue_receiver("lost-lock") as other:
            message = receive_one(receiver)
            taken = receive_one(other, within_secs=LOCK_SECS + 10)
            assert taken.sequence_number == message.sequence_number
            with pytest.raises(MessageLockLostError):
                receiver.renew_message_lock(message)
            other.complete_message(taken)


def test_settling_after_the_lock_was_lost_fails(servicebus):
    # The SDK refuses to settle a message whose lock it knows has expired, so
    # the endpoint's own refusal is reached with the client's clock behind:
    # the message's locked-until is pushed out as a slow clock would see it.
    with client(servicebus.connection_string) as sb:
        with sb.get_queue_sender("lock-lost-on-settle") as sender:
            sender.send_messages([ServiceBusMessage("on the link"), ServiceBusMessage("deferred")])
        with sb.get_queue_receiver("lock-lost-on-settle") as receiver, sb.get_queue_receiver(
            "lock-lost-on-settle"
        ) as other:
            on_link, to_defer = receive(receiver, 2)
            receiver.defer_message(to_defer)
            (deferred,) = receiver.receive_deferred_messages([to_defer.sequence_number])
            taken = receive_one(other, within_secs=LOCK_SECS + 10)
            assert str(taken) == "on the link"
            time.sleep(max(0.0, (deferred.locked_until_utc - utcnow()).total_seconds()) + 0.2)
            for message in (on_link, deferred):  # settled on the link, and through $management
                message._expiry = utcnow() + datetime.timedelta(hours=1)
                with pytest.raises(MessageLockLostError):
                    receiver.complete_message(message)
            other.complete_message(taken)
            (again,) = receiver.receive_deferred_messages([to_defer.sequence_number])
            receiver.complete_message(again)


def test_batch_send_of_100(servicebus):
    with client(servicebus.connection_string) as sb:
        with sb.get_queue_sender("batch") as sender:
            batch = sender.create_message_batch()
            for i in range(100):
                batch.add_message(ServiceBusMessage(f"m{i}", message_id=f"batch-{i}"))
            assert len(batch) == 100
            sender.send_messages(batch)
        with sb.get_queue_receiver("batch", prefetch_count=100) as receiver:
            got = receive(receiver, 100, settle=receiver.complete_message)
            assert sorted(str(m) for m in got) == sorted(f"m{i}" for i in range(100))
            assert {m.message_id for m in got} == {f"batch-{i}" for i in range(100)}
            sequences = [m.sequence_number for m in got]
            assert len(set(sequences)) == 100
            assert [str(m) for m in sorted(got, key=lambda m: m.sequence_number)] == [f"m{i}" for i in range(100)]
            assert_empty(receiver)


def test_scheduled_message_appears_at_its_time(servicebus):
    with client(servicebus.connection_string) as sb:
        with sb.get_queue_sender("scheduled") as sender, sb.get_queue_receiver("scheduled") as receiver:
            at = utcnow() + datetime.timedelta(seconds=4)
            # Both ways: the schedule operation, and a message that carries its time.
            (sequence,) = sender.schedule_messages(ServiceBusMessage("by operation"), at)
            sender.send_messages(ServiceBusMessage("by property", scheduled_enqueue_time_utc=at))
            assert sequence >= 1
            peeked = receiver.peek_messages(max_message_count=10)
            assert {str(m) for m in peeked} == {"by operation", "by property"}
            assert all(m.state == ServiceBusMessageState.SCHEDULED for m in peeked)
            assert all(abs((m.scheduled_enqueue_time_utc - at).total_seconds()) < 0.01 for m in peeked)
            # Not visible before its time.
            assert_empty(receiver, wait_secs=max(0.1, min(1.0, (at - utcnow()).total_seconds() - 1)))
            got = receive(receiver, 2, within_secs=15, settle=receiver.complete_message)
            arrived = utcnow()
            assert {str(m) for m in got} == {"by operation", "by property"}
            # The receive poll may lag a little; it must never be early.
            assert arrived >= at - datetime.timedelta(milliseconds=100)
            assert [m.sequence_number for m in got if str(m) == "by operation"] == [sequence]


def test_cancel_scheduled_message(servicebus):
    with client(servicebus.connection_string) as sb:
        with sb.get_queue_sender("cancel") as sender, sb.get_queue_receiver("cancel") as receiver:
            at = utcnow() + datetime.timedelta(seconds=2)
            keep, drop = sender.schedule_messages([ServiceBusMessage("keep"), ServiceBusMessage("drop")], at)
            sender.cancel_scheduled_messages(drop)
            assert [m.sequence_number for m in receiver.peek_messages(max_message_count=10)] == [keep]
            got = receive(receiver, 1, within_secs=6, settle=receiver.complete_message)
            assert [str(m) for m in got] == ["keep"]
            assert_empty(receiver)


def test_peek(servicebus):
    with client(servicebus.connection_string) as sb:
        with sb.get_queue_receiver("peek") as receiver:
            assert receiver.peek_messages(max_message_count=5) == []
        with sb.get_queue_sender("peek") as sender:
            sender.send_messages([ServiceBusMessage(f"p{i}", application_properties={"i": i}) for i in range(5)])
        with sb.get_queue_receiver("peek") as receiver:
            peeked = receiver.peek_messages(max_message_count=10)
            assert [str(m) for m in peeked] == [f"p{i}" for i in range(5)]
            sequences = [m.sequence_number for m in peeked]
            assert sequences == sorted(sequences) and len(set(sequences)) == 5
            assert all(m.delivery_count == 0 for m in peeked)
            # From a sequence number on, and a count.
            later = receiver.peek_messages(max_message_count=2, sequence_number=sequences[2])
            assert [m.sequence_number for m in later] == sequences[2:4]
            # Peeking takes no lock: a receive still gets all, first time.
            got = receive(receiver, 5, settle=receiver.complete_message)
            assert [(str(m), m.delivery_count) for m in got] == [(f"p{i}", 0) for i in range(5)]
            # (Without a sequence number the SDK peeks after the last one it received.)
            assert receiver.peek_messages(max_message_count=5, sequence_number=1) == []


@pytest.mark.budget(60)
def test_5000_messages_round_trip(servicebus):
    total = 5_000
    started = time.monotonic()
    with client(servicebus.connection_string, retry_total=3) as sb:
        with sb.get_queue_sender("bulk") as sender:
            batch = sender.create_message_batch()
            for i in range(total):
                message = ServiceBusMessage(f"bulk-{i}", message_id=str(i))
                try:
                    batch.add_message(message)
                except ValueError:
                    sender.send_messages(batch)
                    batch = sender.create_message_batch()
                    batch.add_message(message)
            sender.send_messages(batch)
        sent_at = time.monotonic()
        seen = []
        with sb.get_queue_receiver("bulk", prefetch_count=500) as receiver:
            deadline = time.monotonic() + 45
            while len(seen) < total and time.monotonic() < deadline:
                for message in receiver.receive_messages(max_message_count=500, max_wait_time=5):
                    receiver.complete_message(message)
                    seen.append(message.message_id)
            elapsed = time.monotonic() - started
            assert_empty(receiver, wait_secs=1)
    assert len(seen) == total, f"{len(seen)} of {total} received"
    assert len(set(seen)) == total, "duplicates"
    assert set(seen) == {str(i) for i in range(total)}
    # Shown with -s; from the debug binary when WASM_PC_BIN is a debug build.
    print(
        f"\n5000 round trip: send {sent_at - started:.1f}s, receive+complete {elapsed - (sent_at - started):.1f}s, "
        f"{total / elapsed:.0f} messages/s send+receive+complete"
    )
    assert elapsed < 45


def test_defer_and_receive_by_sequence_number(servicebus):
    with client(servicebus.connection_string) as sb:
        with sb.get_queue_sender("deferred") as sender:
            sender.send_messages([ServiceBusMessage("later"), ServiceBusMessage("also later")])
        with sb.get_queue_receiver("deferred") as receiver:
            first, second = receive(receiver, 2)
            receiver.defer_message(first)
            receiver.defer_message(second)
            assert_empty(receiver)
            peeked = receiver.peek_messages(max_message_count=10, sequence_number=first.sequence_number)
            assert [m.state for m in peeked] == [ServiceBusMessageState.DEFERRED] * 2
            got = receiver.receive_deferred_messages([first.sequence_number, second.sequence_number])
            assert sorted(str(m) for m in got) == ["also later", "later"]
            assert all(m.lock_token and m.locked_until_utc > utcnow() for m in got)
            by_sequence = {m.sequence_number: m for m in got}
            # Settled through the management link, as the SDK does for deferred messages.
            receiver.complete_message(by_sequence[first.sequence_number])
            receiver.abandon_message(by_sequence[second.sequence_number])
            # Abandoned, it stays deferred: only a receive by sequence number gets it.
            assert_empty(receiver)
            (again,) = receiver.receive_deferred_messages([second.sequence_number])
            assert str(again) == "also later"
            receiver.complete_message(again)
            assert receiver.peek_messages(max_message_count=10, sequence_number=1) == []
            with pytest.raises(MessageNotFoundError):
                receiver.receive_deferred_messages([first.sequence_number])


def test_receive_and_delete(servicebus):
    with client(servicebus.connection_string) as sb:
        with sb.get_queue_sender("receive-and-delete") as sender:
            sender.send_messages([ServiceBusMessage(f"r{i}") for i in range(3)])
        mode = ServiceBusReceiveMode.RECEIVE_AND_DELETE
        with sb.get_queue_receiver("receive-and-delete", receive_mode=mode) as receiver:
            got = receive(receiver, 3)
            assert [str(m) for m in got] == ["r0", "r1", "r2"]
            assert all(m.lock_token is None for m in got)
            with pytest.raises(ValueError):
                receiver.complete_message(got[0])
        with sb.get_queue_receiver("receive-and-delete") as receiver:
            assert_empty(receiver)
            assert receiver.peek_messages(max_message_count=10) == []


def test_prefetched_messages_are_released_on_close(servicebus):
    # A receiver that prefetched and closed gives its messages back at
    # once: the next receiver does not wait out the 60 s locks.
    with client(servicebus.connection_string) as sb:
        with sb.get_queue_sender("released-on-close") as sender:
            sender.send_messages([ServiceBusMessage(f"x{i}") for i in range(10)])
        with sb.get_queue_receiver("released-on-close", prefetch_count=10) as receiver:
            (first,) = receiver.receive_messages(max_message_count=1, max_wait_time=10)
            receiver.complete_message(first)
        with sb.get_queue_receiver("released-on-close") as receiver:
            got = receive(receiver, 9, within_secs=10, settle=receiver.complete_message)
            assert sorted(str(m) for m in got) == sorted(f"x{i}" for i in range(10) if f"x{i}" != str(first))
            assert all(m.delivery_count == 0 for m in got), "a release does not count as a delivery"


def test_ttl_expiry_to_the_dead_letter_queue(servicebus):
    with client(servicebus.connection_string) as sb:
        with sb.get_queue_sender("expiring") as sender:
            sender.send_messages(ServiceBusMessage("short-lived", time_to_live=datetime.timedelta(seconds=1)))
            sender.send_messages(ServiceBusMessage("long-lived", time_to_live=datetime.timedelta(minutes=10)))
        time.sleep(1.5)
        with sb.get_queue_receiver("expiring") as receiver:
            got = receive_one(receiver)
            assert str(got) == "long-lived"
            receiver.complete_message(got)
            assert_empty(receiver)
        with sb.get_queue_receiver("expiring", sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
            dead = receive_one(dlq)
            assert str(dead) == "short-lived"
            assert dead.dead_letter_reason == "TTLExpiredException"
            dlq.complete_message(dead)


def test_default_ttl_by_flag(start_endpoint):
    # Flags instead of a config file: every message lives 1 s unless it says
    # otherwise, and expired ones are dead-lettered.
    endpoint = start_endpoint(["--queue", "ttl", "--default-ttl-secs", "1", "--dead-letter-on-expiry"])
    with client(endpoint.connection_string) as sb:
        with sb.get_queue_sender("ttl") as sender:
            sender.send_messages(ServiceBusMessage("default ttl"))
        with sb.get_queue_receiver("ttl") as receiver:
            peeked = receiver.peek_messages(max_message_count=1)
            assert [m.time_to_live for m in peeked] == [datetime.timedelta(seconds=1)]
            time.sleep(1.5)
            assert_empty(receiver)
        with sb.get_queue_receiver("ttl", sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
            dead = receive_one(dlq)
            assert (str(dead), dead.dead_letter_reason) == ("default ttl", "TTLExpiredException")
            dlq.complete_message(dead)


def test_lock_duration_and_max_delivery_count_by_flag(start_endpoint):
    endpoint = start_endpoint(["--queue", "flags", "--lock-secs", "2", "--max-delivery-count", "2"])
    with client(endpoint.connection_string) as sb:
        with sb.get_queue_sender("flags") as sender:
            sender.send_messages(ServiceBusMessage("twice"))
        with sb.get_queue_receiver("flags") as receiver:
            first = receive_one(receiver)
            assert first.locked_until_utc - utcnow() <= datetime.timedelta(seconds=2.5)
            # Let the lock expire (delivery 1), then abandon delivery 2: that is the last.
            second = receive_one(receiver, within_secs=8)
            assert second.delivery_count == 1
            receiver.abandon_message(second)
            assert_empty(receiver)
        with sb.get_queue_receiver("flags", sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
            dead = receive_one(dlq)
            assert dead.dead_letter_reason == "MaxDeliveryCountExceeded"
            dlq.complete_message(dead)


def test_an_oversized_message_is_refused(servicebus):
    # The endpoint refuses more than --servicebus-max-message-bytes (256 KiB);
    # the SDK does not check a single message's size itself, so this reaches
    # the endpoint.
    with client(servicebus.connection_string, retry_total=0) as sb:
        with sb.get_queue_sender("oversized") as sender:
            with pytest.raises(MessageSizeExceededError):
                sender.send_messages(ServiceBusMessage(b"x" * (256 * 1024)), timeout=10)
            # The link is still usable.
            sender.send_messages(ServiceBusMessage("small"), timeout=10)
        with sb.get_queue_receiver("oversized") as receiver:
            assert [str(m) for m in receive(receiver, 2, within_secs=3, settle=receiver.complete_message)] == ["small"]


def test_endpoint_shutdown_closes_connections_cleanly(start_endpoint):
    # Stopping the endpoint closes each connection with amqp:connection:forced,
    # which the SDK reports as a connection error (not a crash in its decoder).
    endpoint = start_endpoint(["--queue", "shutdown"])
    with client(endpoint.connection_string, retry_total=0) as sb:
        with sb.get_queue_receiver("shutdown") as receiver:
            assert receiver.receive_messages(max_wait_time=0.5) == []
            endpoint.stop()
            with pytest.raises(ServiceBusConnectionError, match="shutting down"):
                receiver.receive_messages(max_wait_time=3)


def test_wrong_sas_key_is_refused(servicebus):
    with client(servicebus.with_key("not-the-key"), retry_total=0) as sb:
        with pytest.raises(ServiceBusAuthenticationError):
            with sb.get_queue_sender("basic") as sender:
                sender.send_messages(ServiceBusMessage("nope"))
        with pytest.raises(ServiceBusAuthenticationError):
            with sb.get_queue_receiver("basic") as receiver:
                receiver.receive_messages(max_wait_time=2)


def test_unknown_queue_is_not_found(servicebus):
    with client(servicebus.connection_string, retry_total=0) as sb:
        with pytest.raises(MessagingEntityNotFoundError):
            with sb.get_queue_sender("no-such-queue") as sender:
                sender.send_messages(ServiceBusMessage("nowhere"))
        with pytest.raises(MessagingEntityNotFoundError):
            with sb.get_queue_receiver("no-such-queue") as receiver:
                receiver.receive_messages(max_wait_time=2)


def test_deferred_messages_dead_letter_and_receive_and_delete(servicebus):
    # A deferred message dead-lettered through the management link keeps its
    # reason; one received by sequence number in receive-and-delete mode is gone.
    with client(servicebus.connection_string) as sb:
        with sb.get_queue_sender("deferred-delete") as sender:
            sender.send_messages([ServiceBusMessage("to dead-letter"), ServiceBusMessage("to delete")])
        with sb.get_queue_receiver("deferred-delete") as receiver:
            for message in receive(receiver, 2):
                receiver.defer_message(message)
            numbers = {str(m): m.sequence_number for m in receiver.peek_messages(max_message_count=10, sequence_number=1)}
            (doomed,) = receiver.receive_deferred_messages([numbers["to dead-letter"]])
            receiver.dead_letter_message(doomed, reason="Deferred too long", error_description="nobody came")
        mode = ServiceBusReceiveMode.RECEIVE_AND_DELETE
        with sb.get_queue_receiver("deferred-delete", receive_mode=mode) as receiver:
            (taken,) = receiver.receive_deferred_messages([numbers["to delete"]])
            assert str(taken) == "to delete" and taken.lock_token is None
            assert receiver.peek_messages(max_message_count=10, sequence_number=1) == []
        with sb.get_queue_receiver("deferred-delete", sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
            dead = receive_one(dlq)
            assert (str(dead), dead.dead_letter_reason, dead.dead_letter_error_description) == (
                "to dead-letter",
                "Deferred too long",
                "nobody came",
            )
            dlq.complete_message(dead)


def test_competing_receivers_share_without_duplicates(servicebus):
    total = 1_000
    seen = [[], []]
    errors = []
    ready = threading.Barrier(3, timeout=30)

    def consume(slot):
        try:
            with client(servicebus.connection_string) as sb:
                with sb.get_queue_receiver("competing", prefetch_count=50) as receiver:
                    ready.wait()  # both receivers attached before anything is sent
                    deadline = time.monotonic() + 20
                    while sum(map(len, seen)) < total and time.monotonic() < deadline:
                        for message in receiver.receive_messages(max_message_count=50, max_wait_time=2):
                            receiver.complete_message(message)
                            seen[slot].append(message.message_id)
        except Exception as error:  # reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=consume, args=(slot,)) for slot in range(2)]
    for thread in threads:
        thread.start()
    ready.wait()
    with client(servicebus.connection_string) as sb:
        with sb.get_queue_sender("competing") as sender:
            for start in range(0, total, 250):
                sender.send_messages([ServiceBusMessage(f"c{i}", message_id=str(i)) for i in range(start, start + 250)])
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    everything = seen[0] + seen[1]
    assert len(everything) == len(set(everything)) == total, (len(everything), len(set(everything)))
    assert seen[0] and seen[1], "both receivers got messages"
