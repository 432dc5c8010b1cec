"""The partition a batched send chooses for a key is the one aiokafka's default partitioner
(Kafka's murmur2) chooses: billing revisions and dead letters keep per-key order on the same
partition as every producer of that key."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given, settings
from hypothesis import strategies as st

from producer.batches import murmur2, partition_of


@settings(max_examples=2_000, deadline=None)
@given(st.binary(max_size=80))
def test_murmur2_is_kafkas(key: bytes) -> None:
    assert murmur2(key) == aiokafka_murmur2(key)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=40), st.integers(min_value=1, max_value=64))
def test_a_keyed_record_goes_where_the_default_partitioner_sends_it(key: bytes, count: int) -> None:
    partitions = list(range(count))
    assert partition_of(key, partitions) == DefaultPartitioner()(key, partitions, partitions)


def test_the_known_answers_of_kafkas_java_client() -> None:
    # org.apache.kafka.common.utils.UtilsTest, as signed 32-bit ints.
    assert murmur2(b"21") == (-973932308) & 0xFFFFFFFF
    assert murmur2(b"foobar") == (-790332482) & 0xFFFFFFFF
    assert murmur2(b"a-little-bit-long-string") == (-985981536) & 0xFFFFFFFF
    assert murmur2(b"a-little-bit-longer-string") == (-1486304829) & 0xFFFFFFFF
    assert murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") == (-58897971) & 0xFFFFFFFF
    assert murmur2(b"abc") == (479470107) & 0xFFFFFFFF


def test_a_bytearray_or_memoryview_key_goes_where_its_bytes_go() -> None:
    partitions = list(range(7))
    expected = DefaultPartitioner()(b"abcde", partitions, partitions)
    for key in (bytearray(b"abcde"), memoryview(bytearray(b"abcde")), memoryview(b"abcde")):
        assert partition_of(key, partitions) == expected  # type: ignore[arg-type]
