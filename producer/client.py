"""`TurnEventProducer`: what a chat service uses to publish turn events.

    async with TurnEventProducer("kafka:9092") as events:
        await events.turn_started(thread_id=..., search_space_id=..., user_id=..., turn_id=...,
                                  user_query="...")
        usage = UsageAccumulator()
        usage.add("gpt-4o-mini", prompt_tokens=100, completion_tokens=50, total_tokens=150,
                  cost_micros=12345)
        await events.turn_finalized(..., content=[...], usage=usage)

Records are keyed by thread_id (per-thread order), written with acks=all and idempotence so a
broker-side retry never duplicates; each call returns once the broker has acknowledged, with
the event_id.

Retrying after a failed call must re-send the SAME event (same event_id, same occurred_at,
same payload): only an exact copy is a duplicate. Build the event once and publish it as
often as needed:

    event = turn_finalized_event(thread_id=..., ..., content=[...], usage=usage)
    await events.publish(event)          # on an error: await events.publish(event) again
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, Self

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, UnknownTopicOrPartitionError, for_code

from producer.batches import OutgoingRecord, send_all
from producer.events import (
    AnyEvent,
    ContentPart,
    LegacyTokenUsage,
    MessageAppended,
    TurnFinalized,
    TurnStarted,
    TurnUsage,
    UsageCall,
    encode_event,
)

DEFAULT_TOPIC = "chat.turn-events"


@dataclass
class UsageAccumulator:
    """Collects the LLM calls of one turn into the `usage` payload of turn.finalized."""

    calls: list[UsageCall] = field(default_factory=list)

    def add(
        self,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        total_tokens: int,
        cost_micros: int,
        call_kind: str = "chat",
    ) -> None:
        self.calls.append(
            UsageCall(
                model=model,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=total_tokens,
                cost_micros=cost_micros,
                call_kind=call_kind,
            )
        )

    def payload(self) -> TurnUsage | None:
        return TurnUsage(calls=list(self.calls)) if self.calls else None


def thread_key(thread_id: int) -> bytes:
    """The record key: thread_id as decimal UTF-8, so one thread stays on one partition."""
    return str(thread_id).encode()


async def ensure_topic(
    bootstrap_servers: str,
    topic: str,
    *,
    partitions: int = 3,
    replication_factor: int = 1,
    config: dict[str, str] | None = None,
    create: bool = True,
    **kafka_options: Any,
) -> bool:
    """Create `topic` unless it exists (brokers should not auto-create it); whether this call
    created it. With create=False a missing topic is UnknownTopicOrPartitionError.

    An existing topic is left exactly as it is: production topics are usually provisioned by
    the platform team with their own partition count and replication.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, **kafka_options)
    await admin.start()
    try:
        if topic in await admin.list_topics():
            return False
        if not create:
            raise UnknownTopicOrPartitionError(f"topic {topic} does not exist")
        response = await admin.create_topics(
            [NewTopic(topic, partitions, replication_factor, topic_configs=config or {})]
        )
        created = True
        for error in response.topic_errors:
            # Created meanwhile by another client is exactly what we wanted.
            if error[1] == TopicAlreadyExistsError.errno:
                created = False
            elif error[1] != 0:
                raise for_code(error[1])(f"creating topic {topic}")
        return created
    finally:
        await admin.close()


def _parts(content: Sequence[dict[str, Any]]) -> list[ContentPart]:
    return [ContentPart.model_validate(part) for part in content]


def _envelope(
    thread_id: int,
    search_space_id: int,
    user_id: uuid.UUID | None,
    event_id: uuid.UUID | None,
    occurred_at: datetime | None,
) -> dict[str, Any]:
    """A new event's envelope; a retry passes the event_id it got the first time."""
    return {
        "schema_version": 1,
        "event_id": event_id or uuid.uuid4(),
        "occurred_at": occurred_at or datetime.now(UTC),
        "thread_id": thread_id,
        "search_space_id": search_space_id,
        "user_id": user_id,
    }


class ProducerResource:
    """An idempotent, acks=all aiokafka producer as an async context manager (close is
    idempotent). Subclasses add what they publish."""

    def __init__(self, bootstrap_servers: str, *, client_id: str, **kafka_options: Any) -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers,
            client_id=client_id,
            acks="all",
            enable_idempotence=True,
            **kafka_options,
        )
        self._started = False

    async def __aenter__(self) -> Self:
        try:
            await self._producer.start()
        except BaseException:
            await self._producer.stop()  # a half-started client holds sockets and tasks
            raise
        self._started = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._started:
            self._started = False
            await self._producer.stop()

    async def send_and_wait(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        """Publish one record as it is and wait for the broker's acknowledgement."""
        await self._producer.send_and_wait(topic, value, key=key, headers=list(headers) or None)

    async def send_all(
        self, topic: str, records: Sequence[OutgoingRecord]
    ) -> list[BaseException | None]:
        """Every record sent, every acknowledgement awaited (producer/batches.py)."""
        return await send_all(self._producer, topic, records)


def turn_started_event(
    *,
    thread_id: int,
    search_space_id: int,
    user_id: uuid.UUID | None,
    turn_id: str,
    user_query: str,
    mentioned_documents: Sequence[dict[str, Any]] = (),
    event_id: uuid.UUID | None = None,
    occurred_at: datetime | None = None,
) -> TurnStarted:
    """A new turn.started event (a fresh event_id and the current time unless given)."""
    return TurnStarted(
        type="turn.started",
        **_envelope(thread_id, search_space_id, user_id, event_id, occurred_at),
        turn_id=turn_id,
        user_query=user_query,
        mentioned_documents=list(mentioned_documents),
    )


def turn_finalized_event(
    *,
    thread_id: int,
    search_space_id: int,
    user_id: uuid.UUID | None,
    turn_id: str,
    content: Sequence[dict[str, Any]],
    usage: UsageAccumulator | None = None,
    event_id: uuid.UUID | None = None,
    occurred_at: datetime | None = None,
) -> TurnFinalized:
    """A new turn.finalized event (a fresh event_id and the current time unless given)."""
    return TurnFinalized(
        type="turn.finalized",
        **_envelope(thread_id, search_space_id, user_id, event_id, occurred_at),
        turn_id=turn_id,
        content=_parts(content),
        usage=usage.payload() if usage else None,
    )


def message_appended_event(
    *,
    thread_id: int,
    search_space_id: int,
    user_id: uuid.UUID | None,
    role: Literal["user", "assistant", "system"],
    content: Sequence[dict[str, Any]],
    turn_id: str | None = None,
    token_usage: LegacyTokenUsage | None = None,
    event_id: uuid.UUID | None = None,
    occurred_at: datetime | None = None,
) -> MessageAppended:
    """A new message.appended event (a fresh event_id and the current time unless given)."""
    return MessageAppended(
        type="message.appended",
        **_envelope(thread_id, search_space_id, user_id, event_id, occurred_at),
        turn_id=turn_id,
        role=role,
        content=_parts(content),
        token_usage=token_usage,
    )


class TurnEventProducer(ProducerResource):
    def __init__(
        self,
        bootstrap_servers: str,
        *,
        topic: str = DEFAULT_TOPIC,
        client_id: str = "token-ledger-producer",
        **kafka_options: Any,
    ) -> None:
        super().__init__(
            bootstrap_servers,
            client_id=client_id,
            compression_type="zstd",
            linger_ms=5,
            **kafka_options,
        )
        self.topic = topic

    async def publish(self, event: AnyEvent) -> uuid.UUID:
        """Send one event and wait for the broker's acknowledgement."""
        await self.send_and_wait(self.topic, encode_event(event), key=thread_key(event.thread_id))
        return event.event_id

    async def publish_records(
        self, records: Iterable[tuple[bytes, bytes]], *, window: int = 1000
    ) -> AsyncIterator[int]:
        """Send (key, value) pairs as they are, `window` in flight at a time; yields acked counts.

        For traffic that is already bytes: the simulator's plans, poison records, v0 bodies.
        The idempotent producer keeps per-partition order with several requests in flight.
        """
        pending: list[asyncio.Future[Any]] = []
        for key, value in records:
            pending.append(await self._producer.send(self.topic, value, key=key))
            if len(pending) >= window:
                await asyncio.gather(*pending)
                yield len(pending)
                pending = []
        if pending:
            await asyncio.gather(*pending)
            yield len(pending)

    async def turn_started(self, **fields: Any) -> uuid.UUID:
        """Build (see `turn_started_event`) and publish a turn.started event."""
        return await self.publish(turn_started_event(**fields))

    async def turn_finalized(self, **fields: Any) -> uuid.UUID:
        """Build (see `turn_finalized_event`) and publish a turn.finalized event."""
        return await self.publish(turn_finalized_event(**fields))

    async def message_appended(self, **fields: Any) -> uuid.UUID:
        """Build (see `message_appended_event`) and publish a message.appended event."""
        return await self.publish(message_appended_event(**fields))
