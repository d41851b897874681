"""RedisCache's round trips without a redis-server: a stand-in on the test's own loop
that answers MGET with nils and anything else with +OK, and can hold or drop a command.

Cancellation, the bound on the writes native batch threads hand over, and the backoff
gate for lookups queued behind a failed round trip and for writes queued before it
failed (issue 16, second reader's findings).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import hiredis
import pytest

from tensorwire.serving.cache import MAX_PENDING_WRITES, RedisCache, RedisCacheConfig


class FakeRedis:
    """Answers MGET with one nil per key, every other command with +OK. While ``release``
    is clear a command waits (``got`` is set once one arrived); ``drop`` closes the
    connection instead of answering."""

    def __init__(self) -> None:
        self.commands: list[list[Any]] = []
        self.got = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()
        self.drop = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        parser = hiredis.Reader()
        while data := await reader.read(65536):
            parser.feed(data)
            while (command := parser.gets()) is not False:
                self.commands.append(command)
                self.got.set()
                await self.release.wait()
                if self.drop:
                    writer.close()
                    return
                if command[0].upper() == b"MGET":
                    writer.write(b"*%d\r\n" % (len(command) - 1) + b"$-1\r\n" * (len(command) - 1))
                else:
                    writer.write(b"+OK\r\n")

    def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()


@pytest.fixture
async def fake_redis() -> AsyncIterator[FakeRedis]:
    fake = FakeRedis()
    await fake.start()
    yield fake
    fake.close()


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


@pytest.mark.parametrize("turns", range(6))
async def test_cancelling_a_flush_still_answers_every_lookup_and_frees_the_next_mget(
    fake_redis: FakeRedis, turns: int
) -> None:
    """The flush (or whoever awaits it, e.g. a shutdown with a deadline) is cancelled
    ``turns`` loop turns after a lookup was made; at some of these turns the lookup's
    MGET task exists and has not started. Cancelling the flush must not cancel it: the
    lookup is answered and the next lookup gets its own MGET (one had stayed 'in
    flight' for good, every later lookup waiting forever)."""
    cache = RedisCache(RedisCacheConfig(host="127.0.0.1", port=fake_redis.port))
    try:
        flusher = asyncio.create_task(cache.flush())

        async def cancel_later() -> None:
            for _ in range(turns):
                await asyncio.sleep(0)
            flusher.cancel()

        canceller = asyncio.create_task(cancel_later())
        getter = asyncio.create_task(cache.get(key(1)))
        await canceller
        assert await asyncio.wait_for(getter, 2.0) is None
        with pytest.raises(asyncio.CancelledError):
            await flusher
        assert await asyncio.wait_for(cache.get(key(2)), 2.0) is None  # a new MGET went
        assert cache.stats.misses == 2
    finally:
        await asyncio.wait_for(cache.aclose(), 2.0)


async def test_a_round_trip_cancelled_before_it_started_answers_misses_and_releases_its_writes(
    fake_redis: FakeRedis,
) -> None:
    """However a round trip's task ends (here: cancelled before its first step, when its
    own ``finally`` never runs), its lookups are answered and its writes leave the
    pending count (else MAX_PENDING_WRITES of them would stop every later write)."""
    cache = RedisCache(RedisCacheConfig(host="127.0.0.1", port=fake_redis.port), write_delay_s=60.0)
    loop = asyncio.get_running_loop()

    def cancel_commands() -> None:
        for task in cache._commands:
            task.cancel()

    try:
        cache.put(key(9), b"nine")  # rides with the MGET
        getter = asyncio.create_task(cache.get(key(1)))
        await asyncio.sleep(0)  # the lookup is queued, its MGET due next turn
        loop.call_soon(cancel_commands)  # right after the MGET's task is created
        assert await asyncio.wait_for(getter, 2.0) is None
        assert cache.pending.writes == 0
        assert await asyncio.wait_for(cache.get(key(2)), 2.0) is None  # the next MGET goes
        cache.put(key(9), b"nine")
        await asyncio.wait_for(cache.flush(), 2.0)
        stats = cache.stats
        assert (stats.misses, stats.inserts, stats.errors, cache.up) == (2, 1, 0, True)
    finally:
        await asyncio.wait_for(cache.aclose(), 2.0)


async def test_writes_handed_over_by_batch_threads_are_bounded(fake_redis: FakeRedis) -> None:
    """Batch threads hand writes over within MAX_PENDING_WRITES like the loop's own:
    the rest are dropped and counted, not queued without bound."""
    cache = RedisCache(RedisCacheConfig(host="127.0.0.1", port=fake_redis.port), write_delay_s=60.0)
    loop = asyncio.get_running_loop()
    items = [(key(i), b"v") for i in range(MAX_PENDING_WRITES + 100)]
    try:
        await asyncio.to_thread(cache.put_many_from_thread, items, loop)
        await asyncio.to_thread(cache.put_many_from_thread, items[:50], loop)
        assert cache.pending.handed == MAX_PENDING_WRITES
        await cache.flush()
        assert cache.stats.dropped_writes == 150
        assert cache.stats.inserts == MAX_PENDING_WRITES and cache.pending.writes == 0
        await asyncio.to_thread(cache.put_many_from_thread, items[:10], loop)  # room again
        await cache.flush()
        assert (cache.stats.inserts, cache.stats.dropped_writes) == (MAX_PENDING_WRITES + 10, 150)
    finally:
        await cache.aclose()


async def test_lookups_queued_behind_a_failed_round_trip_are_misses_at_once(fake_redis: FakeRedis) -> None:
    """An MGET fails while other lookups wait for the next one: within the backoff they
    are answered as misses (bypassed), not sent on a doomed round trip."""
    now = [100.0]
    cache = RedisCache(RedisCacheConfig(host="127.0.0.1", port=fake_redis.port),
                       initial_backoff_s=1.0, clock=lambda: now[0])
    loop = asyncio.get_running_loop()
    fake_redis.release.clear()
    try:
        first = asyncio.create_task(cache.get(key(1)))
        await asyncio.wait_for(fake_redis.got.wait(), 2.0)  # its MGET reached Redis
        second = asyncio.create_task(cache.get(key(2)))
        from_thread = asyncio.create_task(asyncio.to_thread(cache.lookup_from_thread, [key(3), key(4)], loop))
        while cache.pending.lookups < 2:  # both wait for the next MGET
            await asyncio.sleep(0.001)
        fake_redis.drop = True
        fake_redis.release.set()  # the connection breaks: the MGET fails
        assert await asyncio.wait_for(first, 2.0) is None
        assert await asyncio.wait_for(second, 2.0) is None
        assert await asyncio.wait_for(from_thread, 2.0) == [None, None]
        assert len(fake_redis.commands) == 1
        stats = cache.stats
        assert (stats.commands, stats.errors, stats.bypassed, stats.misses) == (1, 1, 3, 4)
        assert not cache.up
        # after the backoff one lookup probes again, and Redis answers
        fake_redis.drop = False
        now[0] += 1.0
        assert await asyncio.wait_for(cache.get(key(5)), 2.0) is None
        assert cache.up and len(fake_redis.commands) == 2
    finally:
        await cache.aclose()


def test_hit_rate_races_when_hits_are_rare_and_waits_again_when_they_come() -> None:
    from tensorwire.serving.cache import HitRate

    rate = HitRate()
    assert not rate.racing  # lookup-first until misses show
    misses = 0
    while not rate.racing:
        rate.add([None])
        misses += 1
    assert 100 < misses < 400 and rate.ratio < HitRate.RACE_BELOW
    rate.add([b"v"] * 8 + [None] * 8)  # a batch's lookups count by their number
    assert rate.racing  # hysteresis: not back at the first hits
    while rate.racing:
        rate.add([b"v"])
    assert rate.ratio > HitRate.WAIT_ABOVE
    rate.add([])
    assert not rate.racing


async def test_writes_queued_before_a_round_trip_failed_are_not_sent_during_the_backoff(
    fake_redis: FakeRedis,
) -> None:
    """A write queued while an MGET is in flight waits for its own command; the MGET
    fails: within the backoff the write is bypassed (counted), not sent on a doomed
    command (before, its timer sent it all the same)."""
    now = [100.0]
    cache = RedisCache(RedisCacheConfig(host="127.0.0.1", port=fake_redis.port),
                       initial_backoff_s=1.0, write_delay_s=0.02, clock=lambda: now[0])
    fake_redis.release.clear()
    try:
        lookup = asyncio.create_task(cache.get(key(1)))
        await asyncio.wait_for(fake_redis.got.wait(), 2.0)  # its MGET reached Redis
        cache.put(key(9), b"nine")  # queued after the MGET left: its timer sends it
        fake_redis.drop = True
        fake_redis.release.set()  # the connection breaks: the MGET fails
        assert await asyncio.wait_for(lookup, 2.0) is None
        assert not cache.up
        await asyncio.sleep(0.2)  # ten write delays
        assert len(fake_redis.commands) == 1
        assert (cache.stats.bypassed, cache.stats.inserts, cache.pending.writes) == (1, 0, 0)
        # after the backoff a lookup probes, Redis answers, and writes go again
        fake_redis.drop = False
        now[0] += 1.0
        assert await asyncio.wait_for(cache.get(key(2)), 2.0) is None
        cache.put(key(9), b"nine")
        await asyncio.wait_for(cache.flush(), 2.0)
        assert cache.up and cache.stats.inserts == 1
    finally:
        await cache.aclose()


def test_while_racing_an_answer_is_stored_at_the_second_sighting_of_its_key() -> None:
    """The doorkeeper: while lookups come first every answer is stored; while racing a
    key's first sighting is only noted, the second is stored; when the rate rises
    again the sightings are forgotten and every answer is stored again."""
    from tensorwire.serving.cache import HitRate

    rate = HitRate()
    assert rate.admit(key(1)) and rate.admit(key(1))
    while not rate.racing:
        rate.add([None])
    assert [rate.admit(key(i)) for i in (1, 2, 1, 3, 2, 2)] == [False, False, True, False, True, True]
    for i in range(100, 100 + HitRate.SEEN_MAX):  # full: it starts over
        rate.admit(key(i))
    assert not rate.admit(key(1))
    while rate.racing:
        rate.add([b"v"])
    assert rate.admit(key(4))
    while not rate.racing:
        rate.add([None])
    assert not rate.admit(key(1))  # forgotten when racing ended


def test_a_native_batchs_doorkeeper_admits_as_one_request_at_a_time_would() -> None:
    """``admit_many`` (a native batch's misses): the indexes of the keys seen before;
    every key is noted; when full it starts over."""
    from tensorwire.serving.cache import HitRate

    rate = HitRate()
    assert rate.admit_many([key(1), key(2)]) == [0, 1]  # lookups first: every answer is stored
    while not rate.racing:
        rate.add([None])
    assert rate.admit_many([key(1), key(2)]) == []
    assert rate.admit_many([key(3), key(2), key(1), key(4)]) == [1, 2]
    assert rate.admit(key(3)) and rate.admit(key(4))
    rate.admit_many([key(i) for i in range(100, 100 + HitRate.SEEN_MAX - 10)])
    assert rate.admit_many([key(5) for _ in range(11)]) == []  # full: it started over
    assert rate.admit_many([key(5), key(1)]) == [0]


async def test_lookups_aside_gather_into_one_round_trip(fake_redis: FakeRedis,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Nobody waits for a lookup aside: those made within ASIDE_DELAY_S go in one MGET
    (they came one per request, each its own round trip), ASIDE_KEYS of them at once."""
    from tensorwire.serving import cache as cache_module
    from tensorwire.serving.cache import ASIDE_KEYS

    monkeypatch.setattr(cache_module, "ASIDE_DELAY_S", 60.0)  # only a flush or the count sends them
    cache = RedisCache(RedisCacheConfig(host="127.0.0.1", port=fake_redis.port))
    answers: list[list[bytes | None]] = []
    try:
        for i in range(5):
            cache.lookup_aside([key(i)], answers.append)
            await asyncio.sleep(0)
        assert cache.pending.lookups == 5 and not fake_redis.commands
        await asyncio.wait_for(cache.flush(), 2.0)
        assert answers == [[None]] * 5
        assert [len(c) - 1 for c in fake_redis.commands] == [5]  # one MGET of 5 keys
        fake_redis.got.clear()
        for i in range(ASIDE_KEYS):  # enough to go at once, without waiting for the delay
            cache.lookup_aside([key(i)], answers.append)
        await asyncio.wait_for(fake_redis.got.wait(), 10.0)
        assert [len(c) - 1 for c in fake_redis.commands] == [5, ASIDE_KEYS]
        await asyncio.wait_for(cache.flush(), 2.0)
        assert (cache.stats.misses, cache.stats.commands) == (5 + ASIDE_KEYS, 2)
    finally:
        await cache.aclose()


async def test_lookups_aside_from_batch_threads_wake_the_loop_once_per_delay(
        fake_redis: FakeRedis, monkeypatch: pytest.MonkeyPatch) -> None:
    """A native batch thread's lookups aside are handed over, not each a hop to the loop:
    the first arms a timer (one wake-up), the rest join it, and they go in one MGET
    after HANDOVER_DELAY_S; each ``done`` runs on the loop. The timer runs on while it
    finds hand-overs (and is armed anew once it found none): later ones are answered
    without a flush, and a flush takes them at once."""
    import threading

    from tensorwire.serving import cache as cache_module

    monkeypatch.setattr(cache_module, "HANDOVER_DELAY_S", 0.2)
    cache = RedisCache(RedisCacheConfig(host="127.0.0.1", port=fake_redis.port))
    loop = asyncio.get_running_loop()
    hops = 0
    real = loop.call_soon_threadsafe

    def counted(callback: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal hops
        hops += getattr(callback, "__self__", None) is cache  # not to_thread's own hop back
        return real(callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counted)
    answers: list[tuple[list[bytes | None], bool]] = []
    loop_thread = threading.get_ident()

    def done(values: list[bytes | None]) -> None:
        answers.append((values, threading.get_ident() == loop_thread))

    def batches(first: int) -> None:
        for i in range(first, first + 20):
            cache.lookup_aside_from_thread([key(i), key(i + 1000)], done, loop)

    try:
        await asyncio.to_thread(batches, 0)
        assert hops == 1 and cache.pending.lookups == 20 and not fake_redis.commands
        for _ in range(100):
            if len(answers) == 20:
                break
            await asyncio.sleep(0.05)
        assert answers == [([None, None], True)] * 20
        assert [len(c) - 1 for c in fake_redis.commands] == [40]  # one MGET of every key
        await asyncio.to_thread(batches, 100)  # the timer still runs, or is armed anew
        assert hops in (1, 2)
        for _ in range(100):
            if len(answers) == 40:
                break
            await asyncio.sleep(0.05)
        assert len(answers) == 40 and [len(c) - 1 for c in fake_redis.commands] == [40, 40]
        await asyncio.to_thread(batches, 200)
        await asyncio.wait_for(cache.flush(), 2.0)  # now, not after the delay
        assert len(answers) == 60 and [len(c) - 1 for c in fake_redis.commands] == [40, 40, 40]
        assert (cache.stats.misses, cache.stats.commands, cache.pending.lookups) == (120, 3, 0)
    finally:
        await cache.aclose()
