"""`make bench` reads where a drain's time went from the consumer's `caught up` line, even when
the stall watch's `caught up: the backlog is applied` line comes after it."""

from __future__ import annotations

import json
from pathlib import Path

from bench.consumers import _idle


def test_the_figures_are_read_past_a_later_caught_up_line_without_them(tmp_path: Path) -> None:
    log = tmp_path / "consumer.log"
    lines = [
        {
            "msg": "caught up: every assigned partition is at its last stable offset",
            "idle_on_postgres_seconds": 3.1,
            "idle_on_kafka_seconds": 0.5,
        },
        {"msg": "caught up: the backlog is applied", "seconds": 12.0},
    ]
    log.write_text("\n".join(map(json.dumps, lines)) + "\n")
    assert _idle(log) == {"postgres": 3.1, "kafka": 0.5}
    log.write_text(json.dumps(lines[1]) + "\n")
    assert _idle(log) is None
