"""One chat turn, published the way a chat service does it: python examples/publish_turn.py

Needs only `pip install token-ledger`. LEDGER_KAFKA_BOOTSTRAP and LEDGER_TOPIC choose the
broker and the topic (defaults: localhost:9092, chat.turn-events).
"""

import asyncio
import os
import time
import uuid
from typing import Any

from aiokafka.errors import KafkaError

from producer.client import (
    TurnEventProducer,
    UsageAccumulator,
    turn_finalized_event,
    turn_started_event,
)
from producer.events import AnyEvent


async def publish(events: TurnEventProducer, event: AnyEvent, attempts: int = 5) -> None:
    """Publish `event` until the broker acknowledges it, re-sending the SAME object.

    A failed attempt may have reached the topic all the same (only the acknowledgement was
    lost). The exact copy a retry sends (same event_id, occurred_at and payload) is a
    duplicate that the ledger drops; an event built again would be a different event.
    """
    for attempt in range(1, attempts + 1):
        try:
            await events.publish(event)
            return
        except KafkaError:
            if attempt == attempts:
                raise  # log it with event.event_id; the caller decides what the turn does
            await asyncio.sleep(0.2 * 2**attempt)


async def answer(
    events: TurnEventProducer, thread_id: int, search_space_id: int, user_id: uuid.UUID
) -> str:
    """A chat turn: started when it begins, finalized in `finally` with what was spent."""
    turn_id = f"{thread_id}:{int(time.time() * 1000)}"
    ids: dict[str, Any] = {
        "thread_id": thread_id,
        "search_space_id": search_space_id,
        "user_id": user_id,
        "turn_id": turn_id,
    }
    await publish(events, turn_started_event(**ids, user_query="Summarise the Q3 report"))
    usage = UsageAccumulator()
    content: list[dict[str, Any]] = []
    try:
        # ... the LLM calls of the turn; after each, record what the provider reported:
        usage.add(
            "gpt-4o-mini",
            prompt_tokens=1200,
            completion_tokens=300,
            total_tokens=1500,
            cost_micros=360,
        )
        content.append({"type": "text", "text": "Revenue grew 12% quarter on quarter."})
    finally:
        # Also when the answer failed or was cancelled: its tokens were spent all the same.
        # Built once, so every retry inside publish() sends this very event.
        finalized = turn_finalized_event(**ids, content=content, usage=usage)
        await publish(events, finalized)
    return turn_id


async def main() -> None:
    bootstrap = os.environ.get("LEDGER_KAFKA_BOOTSTRAP", "localhost:9092")
    topic = os.environ.get("LEDGER_TOPIC", "chat.turn-events")
    # One producer per process, shared by all requests; Kafka security options
    # (security_protocol=, sasl_mechanism=, ssl_context=, ...) are passed to aiokafka.
    async with TurnEventProducer(bootstrap, topic=topic) as events:
        turn_id = await answer(events, thread_id=4242, search_space_id=7, user_id=uuid.uuid4())
    print(f"published turn {turn_id} to {topic}")


if __name__ == "__main__":
    asyncio.run(main())
