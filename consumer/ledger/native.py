"""The native decode path (native/, Rust): a record's bytes to a LedgerEvent and its count of
unknown fields, the payload's digest and what the event's rows store (JSON text where they
store JSON) taken in the same pass, without making the payload's Python values. It answers
only for the plain shape producers write; anything it is not sure of (a rejection, a v0 legacy body, a non-integer
number, a UUID or timestamp written another way, a key written twice, a record over 1 MiB) is
None, and the reference decoder (producer/decoding.py) decides it, with its rejection reasons.

The models stay the contract: their field names are handed to the decoder here, and
tests/unit/consumer/ledger/test_native.py holds the decoder to the reference on generated
records and every mutation of them, field by field."""

from __future__ import annotations

from token_ledger_native import Decoder

from producer.events import (
    MAX_INT64,
    TOKEN_KINDS,
    USAGE_MEASURES,
    LegacyTokenUsage,
    MessageAppended,
    ModelUsage,
    TurnFinalized,
    TurnStarted,
    TurnUsage,
    UsageCall,
)
from producer.ledger_event import LedgerEvent, StoredUsage

# Records larger than this are the reference decoder's even when LEDGER_MAX_EVENT_BYTES allows
# more: the bound on the native path's worst case. It holds a record's parsed tree, its digest
# text and its stored JSON text at once (when it also made the payload's Python values, 16 MiB
# of small numbers peaked at ~4x the reference's memory: 320 MB against 80).
LARGEST = 1024 * 1024

# At most CALLS calls a turn, each count at most MAX_INT64 // CALLS: their sums are then within
# MAX_INT64 without a pass over them. More calls, or larger counts, are the reference's to sum.
CALLS = 64

_DECODER = Decoder(
    started=list(TurnStarted.model_fields),
    finalized=list(TurnFinalized.model_fields),
    appended=list(MessageAppended.model_fields),
    usage=list(TurnUsage.model_fields),
    call=list(UsageCall.model_fields),
    legacy=list(LegacyTokenUsage.model_fields),
    entry=list(ModelUsage.model_fields),
    measures=list(USAGE_MEASURES),
    kinds=list(TOKEN_KINDS),
    max=MAX_INT64,
    calls=CALLS,
)


def decode(value: bytes, max_bytes: int, max_nesting: int) -> tuple[LedgerEvent, int] | None:
    """The current-version event of a record value and how many of its fields no model has;
    None when the reference decoder must decide. The future-skew check is the caller's."""
    parts = _DECODER.decode(value, min(max_bytes, LARGEST), max_nesting)
    if parts is None:
        return None
    usage = parts[10]
    return LedgerEvent(*parts[:10], None if usage is None else StoredUsage(*usage)), parts[11]
