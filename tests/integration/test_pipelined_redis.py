"""The admission connection (extproc.limiter.resp) against a real redis-server."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from extproc.devstack.redis_proc import RedisProcess
from extproc.limiter.resp import PipelinedRedis, Target, Template, pack, parse_url


def client(url: str) -> PipelinedRedis:
    c = PipelinedRedis.from_url(url, connect_timeout_s=1.0)
    assert c is not None
    return c


def test_commands_are_packed_as_resp_arrays_of_bulk_strings() -> None:
    assert pack(("SET", "k", 12, b"\x00v")) == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n$2\r\n\x00v\r\n"


def test_a_template_packs_the_same_bytes_as_the_whole_command() -> None:
    t = Template(("EVALSHA", "f" * 40, 2), None, ("tm:{a}:w:key:k:1m",), None, None, ("60000", "", "x"))
    assert t.fill("tm:{a}:r:1", "rid-1", 42) == pack(
        ("EVALSHA", "f" * 40, 2, "tm:{a}:r:1", "tm:{a}:w:key:k:1m", "rid-1", 42, "60000", "", "x"))
    assert Template(None).fill(b"\x00") == pack((b"\x00",))
    assert Template(("PING",)).fill() == pack(("PING",))


def test_only_plain_urls_take_the_pipelined_connection() -> None:
    assert parse_url("redis://127.0.0.1:7000/2") == Target("127.0.0.1", 7000, db=2)
    assert parse_url("redis://:s%40cret@cache:6380") == Target("cache", 6380, password="s@cret")
    assert parse_url("unix:///run/redis.sock?db=3") == Target(path="/run/redis.sock", db=3)
    for other in ("rediss://host:6379", "redis+cluster://host:7000", "redis://host?health_check_interval=5"):
        assert parse_url(other) is None


async def test_concurrent_calls_share_one_connection_and_get_their_own_replies(own_redis: RedisProcess) -> None:
    c = client(own_redis.url)
    try:
        replies = await asyncio.gather(*(c.call("ECHO", f"m{i}") for i in range(200)))
        assert replies == [f"m{i}".encode() for i in range(200)]
        clients = await c.call("CLIENT", "LIST")
        assert clients.count(b"cmd=client") == 1  # everything went over this one connection
    finally:
        await c.aclose()


async def test_a_caller_past_its_deadline_does_not_shift_the_replies_of_the_next(own_redis: RedisProcess) -> None:
    c = client(own_redis.url)
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await c.call("DEBUG", "SLEEP", "0.2")
        assert await c.call("ECHO", "mine") == b"mine"  # not the late "OK" of DEBUG SLEEP
    finally:
        await c.aclose()


async def test_error_replies_raise_redis_py_exceptions(own_redis: RedisProcess) -> None:
    c = client(own_redis.url)
    try:
        with pytest.raises(NoScriptError):
            await c.call("EVALSHA", "0" * 40, 0)
        with pytest.raises(ResponseError):
            await c.call("NOSUCHCOMMAND")
        assert await c.call("PING") == b"PONG"
    finally:
        await c.aclose()


async def test_a_restarted_server_fails_the_call_in_flight_then_reconnects(own_redis: RedisProcess) -> None:
    c = client(own_redis.url)
    try:
        assert await c.call("SET", "k", "v") == b"OK"
        own_redis.stop()
        with pytest.raises((RedisConnectionError, OSError)):
            await c.call("GET", "k")
        own_redis.restart()
        assert await c.call("PING") == b"PONG"
    finally:
        await c.aclose()


def test_it_works_on_uvloop_too(own_redis: RedisProcess) -> None:
    import uvloop

    async def run() -> list[object]:
        c = client(own_redis.url)
        try:
            async with asyncio.timeout(5):
                return list(await asyncio.gather(c.call("PING"), c.call("ECHO", "x")))
        finally:
            await c.aclose()

    assert uvloop.run(run()) == [b"PONG", b"x"]


async def test_a_batch_goes_in_one_write_and_keeps_each_reply_or_error_in_place(own_redis: RedisProcess) -> None:
    c = client(own_redis.url)
    try:
        replies = await c.call_many([("SET", "a", "1"), ("EVALSHA", "0" * 40, 0), ("INCR", "a"), ("NOSUCH",)])
        assert replies[0] == b"OK" and replies[2] == 2
        assert isinstance(replies[1], NoScriptError) and isinstance(replies[3], ResponseError)
        own_redis.stop()
        with pytest.raises((RedisConnectionError, OSError)):
            await c.call_many([("GET", "a"), ("GET", "a")])
    finally:
        await c.aclose()


async def test_a_connection_that_stops_answering_is_dropped_and_the_next_call_reconnects(
    own_redis: RedisProcess,
) -> None:
    c = PipelinedRedis.from_url(own_redis.url, connect_timeout_s=1.0, stall_s=0.2)
    assert c is not None
    try:
        assert await c.call("PING") == b"PONG"
        # the connection's replies stop coming (as when a NAT drops the flow): DEBUG SLEEP blocks it
        for _ in range(4):
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await c.call("DEBUG", "SLEEP", "1")
        await asyncio.sleep(1.2)  # the server is answering again
        assert await c.call("ECHO", "fresh") == b"fresh"
        for _ in range(20):  # the stalled connection was closed, not kept beside the new one
            if (await c.call("CLIENT", "LIST")).count(b"cmd=") == 1:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the stalled connection is still open")
    finally:
        await c.aclose()


async def test_a_refused_password_leaks_no_connection(own_redis: RedisProcess) -> None:
    admin = client(own_redis.url)
    wrong = PipelinedRedis.from_url(own_redis.url.replace("redis://", "redis://:nope@"), connect_timeout_s=1.0)
    assert wrong is not None
    try:
        before = (await admin.call("CLIENT", "LIST")).count(b"\n")
        for _ in range(10):
            with pytest.raises(ResponseError):
                await wrong.call("PING")
        await asyncio.sleep(0.2)
        assert (await admin.call("CLIENT", "LIST")).count(b"\n") <= before
    finally:
        await wrong.aclose()
        await admin.aclose()


async def test_heard_at_counts_an_answer_waiting_unread_in_the_socket(own_redis: RedisProcess) -> None:
    """The limiter's sign of life: the last bytes read, or now while the server's answer waits in the
    socket for an event loop too busy to read it; a silent server leaves it where it was."""
    c = client(own_redis.url)
    try:
        assert await c.call("PING") == b"PONG"
        proto = await c.connection()
        read = proto.heard_at()
        assert read == proto.last_read and time.monotonic() - read < 0.5
        fut = proto.send(pack(("ECHO", "unread")))
        time.sleep(0.05)  # noqa: ASYNC251 (a blocked loop: the answer is in the socket, not read)
        assert not fut.done() and proto.heard_at() > read + 0.04
        assert await fut == b"unread"
        own_redis.pause()
        try:
            fut = proto.send(pack(("PING",)))
            time.sleep(0.05)  # noqa: ASYNC251
            assert proto.heard_at() == proto.last_read  # nothing came
        finally:
            own_redis.resume()
        assert await fut == b"PONG"
    finally:
        await c.aclose()


async def test_a_given_up_call_can_leave_a_hook_for_its_late_reply_or_the_connection_loss(
    own_redis: RedisProcess,
) -> None:
    c = client(own_redis.url)
    got: list[object] = []
    try:
        proto = await c.connection()
        own_redis.pause()
        fut = proto.send(pack(("ECHO", "late")))
        fut.cancel()  # its caller gave up
        proto.on_late_reply(fut, got.append)
        own_redis.resume()
        assert await c.call("ECHO", "next") == b"next"  # the late reply went to the hook, not to this call
        assert got == [b"late"]
        fut = proto.send(pack(("DEBUG", "SLEEP", "0.2")))
        fut.cancel()
        proto.on_late_reply(fut, got.append)
        proto.abort()
        assert isinstance(got[1], RedisConnectionError)
    finally:
        await c.aclose()
