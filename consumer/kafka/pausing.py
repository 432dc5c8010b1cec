"""Fetching paused while the pipeline retries (a consumer/retry.py RetryObserver): nothing new
is fetched for a batch that cannot commit yet, and fetching resumes when the retry ends, except
for partitions that stay paused whatever the retry did (stopped, or waiting to be sought)."""

from __future__ import annotations

from collections.abc import Callable, Set

from aiokafka import AIOKafkaConsumer, TopicPartition

from consumer.errors import TransientError
from consumer.status import Readiness


class PauseWhileRetrying:
    def __init__(
        self, consumer: AIOKafkaConsumer, readiness: Readiness, held: Callable[[], Set[int]]
    ) -> None:
        self.consumer = consumer
        self.readiness = readiness
        self.held = held  # partitions that stay paused whatever the retry did (opening)
        self._paused: list[TopicPartition] = []

    def retrying(self, error: TransientError) -> None:
        if not self._paused:
            self._paused.extend(self.consumer.assignment())
            self.consumer.pause(*self._paused)

    def succeeded(self) -> None:
        pass

    def finished(self) -> None:
        paused, self._paused = self._paused, []
        halted, held = self.readiness.halted, self.held()
        if still := [
            tp
            for tp in paused
            if tp in self.consumer.assignment()
            and tp.partition not in halted
            and tp.partition not in held  # resumed once sought
        ]:
            self.consumer.resume(*still)
