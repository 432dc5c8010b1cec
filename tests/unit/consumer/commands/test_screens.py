"""What `verify` and `status` conclude from their figures: the line verify ends on, and when
status is not ok."""

from __future__ import annotations

import json

from consumer.cli.screens import status_json, verify_json, verify_verdict
from consumer.commands.group_status import GroupStatus, PartitionStatus
from consumer.commands.verify import Coverage, VerifyReport
from consumer.ledger.rebuild import Difference


def _report(*not_applied: int) -> VerifyReport:
    return VerifyReport(
        coverage=[Coverage(p, 10, 10 + n + 1, n) for p, n in enumerate(not_applied)]
    )


def test_a_full_clean_comparison_matches_the_topic() -> None:
    assert verify_verdict(_report(0, 0)) == "ledger matches the topic"


def test_records_not_applied_yet_are_counted_and_the_comparison_is_still_clean() -> None:
    report = _report(3, 0, 4)
    assert report.ok
    assert verify_verdict(report) == (
        "ledger matches the topic up to the applied offsets; 7 record(s) not applied yet"
        " (partition 0: 3, partition 2: 4)"
    )


def test_differences_say_how_far_the_comparison_went() -> None:
    report = _report(2)
    report.difference_count = 1
    report.differences = [Difference("chat_threads", "thread 7", "missing")]
    assert not report.ok
    assert verify_verdict(report) == (
        "1 difference(s) (compared up to the applied offsets; 2 record(s) not applied yet"
        " (partition 0: 2))"
    )
    as_json = json.loads(verify_json(report))
    assert as_json["ok"] is False
    assert as_json["differences"] == 1
    assert as_json["partitions"] == [
        {"partition": 0, "compared_up_to": 10, "log_end": 13, "not_applied": 2}
    ]


def test_an_empty_ledger_beside_an_empty_topic_is_nothing_to_compare() -> None:
    report = VerifyReport(coverage=[Coverage(0, 0, 0, 0)], nothing_to_compare=True)
    assert report.ok
    assert verify_verdict(report).startswith("nothing to compare")


def test_status_is_not_ok_with_a_stopped_partition_or_without_offsets() -> None:
    running = PartitionStatus(0, stored=5, log_start=0, high_watermark=9, last_stable=8)
    assert running.lag == 3
    assert GroupStatus("g", "t", [running]).ok
    stopped = PartitionStatus(1, 7, 0, 7, 7, halted="offset out of range: ...")
    assert not GroupStatus("g", "t", [running, stopped]).ok
    fresh = PartitionStatus(0, stored=None, log_start=4, high_watermark=9, last_stable=9)
    assert fresh.lag == 5  # from the log's start, where a first owner begins
    assert GroupStatus("g", "t", [fresh]).no_offsets
    ahead = PartitionStatus(0, stored=12, log_start=0, high_watermark=9, last_stable=9)
    assert ahead.lag == 0
    unknown = GroupStatus("g", "t", [running, stopped], members_error="no answer")
    shown = json.loads(status_json(unknown))
    assert shown["members"] is None
    assert [p["halted"] for p in shown["partitions"]] == [False, True]
