"""The proxy's log ids: UUIDs in time order (version 7), unique, from a buffered random source."""

from __future__ import annotations

import time
import uuid

from plproxy.record import LogIds


def test_log_ids_are_version_7_uuids_in_time_order_and_never_repeat() -> None:
    ids = LogIds()
    before = time.time()
    drawn = [ids.next() for _ in range(3000)]  # more than one buffer of random bytes
    after = time.time()
    assert len(set(drawn)) == len(drawn)
    for text in drawn:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
    millis = [int(text.replace("-", "")[:12], 16) for text in drawn]
    assert millis == sorted(millis)  # a store's primary key grows at its right edge
    assert int(before * 1000) <= millis[0]
    assert millis[-1] <= int(after * 1000) + 1


def test_two_sources_do_not_share_their_random_bits() -> None:
    a, b = LogIds(), LogIds()
    assert {a.next()[14:] for _ in range(500)}.isdisjoint({b.next()[14:] for _ in range(500)})
