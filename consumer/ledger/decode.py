"""Step 1 of a batch: record values into LedgerEvents or rejections. The native path
(consumer/ledger/native.py) decodes what it is sure of; the reference decoder
(producer/decoding.py) decides everything else, with its rejection reasons, and its events are
converted (producer/ledger_event.py). Never raises for a record.
"""

from __future__ import annotations

from datetime import timedelta

from consumer.ledger import native
from producer.decoding import MAX_NESTING, decode_value, within_skew
from producer.events import DEFAULT_MAX_EVENT_BYTES, DEFAULT_MAX_FUTURE_SKEW, Rejection
from producer.ledger_event import LedgerEvent, ledger_event


def decode_ledger_event(
    value: bytes | None,
    *,
    timestamp_ms: int | None,
    max_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    max_future_skew: timedelta | None = DEFAULT_MAX_FUTURE_SKEW,
) -> LedgerEvent | Rejection:
    """decode_event as the ledger folds it: the native path where it is sure, else the
    reference decoder. Never raises."""
    result, _, _, _ = _decode_ledger_event(value, timestamp_ms, max_bytes)
    return within_skew(result, timestamp_ms, max_future_skew)


def _decode_ledger_event(
    value: bytes | None, timestamp_ms: int | None, max_bytes: int
) -> tuple[LedgerEvent | Rejection, bool, int, bool]:
    """What _decode_value says, as a LedgerEvent, and whether the reference decoder decided."""
    native_result = native.decode(value, max_bytes, MAX_NESTING) if value else None
    if native_result is not None:
        return native_result[0], True, native_result[1], False
    event, timeless, unknown = decode_value(value, timestamp_ms, max_bytes)
    if isinstance(event, Rejection):
        return event, timeless, unknown, True
    return ledger_event(event), timeless, unknown, True


class BatchDecoder:
    """Record values of one batch into LedgerEvents: the native path (consumer/ledger/native.py)
    where it is sure, else decode_event's. A value seen before in the batch (a redelivery, a
    producer's retry) is not decoded again when its event cannot depend on the record's
    timestamp (a current-version event: only the future-skew check reads the timestamp, and
    it runs for every record). An upcast v0 body takes occurred_at from its record, and a
    rejection is not kept: both are decoded every time.

    `unknown_fields`: per event type, the fields of the decoded records that this consumer
    does not know (each record counts, repeats too; rejected records do not). `referred`: how
    many records the native path left to the reference decoder."""

    def __init__(self, *, max_bytes: int, max_future_skew: timedelta | None) -> None:
        self.max_bytes = max_bytes
        self.max_future_skew = max_future_skew
        self.unknown_fields: dict[str, int] = {}
        self.referred = 0
        self._seen: dict[bytes, tuple[LedgerEvent, int]] = {}

    def __call__(self, value: bytes | None, timestamp_ms: int | None) -> LedgerEvent | Rejection:
        seen = self._seen.get(value) if value else None
        if seen is None:
            result, timeless, unknown, referred = _decode_ledger_event(
                value, timestamp_ms, self.max_bytes
            )
            self.referred += referred
            if timeless and value and not isinstance(result, Rejection):
                self._seen[value] = (result, unknown)
        else:
            result, unknown = seen
        result = within_skew(result, timestamp_ms, self.max_future_skew)
        if unknown and not isinstance(result, Rejection):
            self.unknown_fields[result.type] = self.unknown_fields.get(result.type, 0) + unknown
        return result
