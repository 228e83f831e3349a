"""The coordinator's subscription (`Listener`) on a real Redis: announcements reach their handlers once
every channel is confirmed, a lost connection is told and subscribed again, a refused subscription
is retried without ending the listener, and `stop()` ends it at once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio import Redis

from gputorrent import redis_client
from gputorrent.coordinator.listener import Listener

WAIT_S = 5.0


class Recorder:
    """A subscriber that notes what it is told; `told` is set on every call."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.told = asyncio.Event()

    def subscribed(self) -> None:
        self.events.append("subscribed")
        self.told.set()

    def lost(self) -> None:
        self.events.append("lost")
        self.told.set()

    async def until(self, events: list[str]) -> None:
        """Wait until the events so far are `events`."""
        async with asyncio.timeout(WAIT_S):
            while self.events != events:
                self.told.clear()
                await self.told.wait()


class Inbox:
    """Handlers for some channels, keeping what each received."""

    def __init__(self, *channels: str) -> None:
        self.received: dict[str, list[str]] = {channel: [] for channel in channels}
        self.arrived = asyncio.Event()

    def handler(self, channel: str) -> Callable[[str], None]:
        def handle(data: str) -> None:
            self.received[channel].append(data)
            self.arrived.set()

        return handle

    async def until(self, count: int) -> None:
        async with asyncio.timeout(WAIT_S):
            while sum(len(messages) for messages in self.received.values()) < count:
                self.arrived.clear()
                await self.arrived.wait()


@pytest.fixture
def channels() -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:8]
    return f"test:results:{suffix}", f"test:revoked:{suffix}"


@pytest.fixture
async def listening(redis: Redis, channels: tuple[str, str]) -> AsyncIterator[tuple[Listener, Recorder, Inbox]]:
    """A listener running on `channels`; stopped (and checked to end at once) at teardown."""
    inbox, recorder = Inbox(*channels), Recorder()
    listener = Listener(redis, {channel: inbox.handler(channel) for channel in channels}, (recorder,))
    task = asyncio.create_task(listener.run())
    yield listener, recorder, inbox
    listener.stop()
    await asyncio.wait_for(task, timeout=WAIT_S)


async def test_announcements_reach_their_handlers_once_every_channel_is_confirmed(
    redis: Redis, channels: tuple[str, str], listening: tuple[Listener, Recorder, Inbox]
) -> None:
    results, revoked = channels
    listener, recorder, inbox = listening
    await recorder.until(["subscribed"])
    await redis.publish(results, '{"request_id": "r1"}')
    await redis.publish(revoked, "kéy-1")  # not ASCII: the listener decodes UTF-8
    await redis.publish(results, "r2")
    await inbox.until(3)
    assert inbox.received == {results: ['{"request_id": "r1"}', "r2"], revoked: ["kéy-1"]}

    listener.stop()
    await recorder.until(["subscribed", "lost"])  # stopping is told too: nothing is heard from then on


async def test_an_announcement_that_is_not_utf8_is_read_with_replacements_and_the_subscription_stays(
    redis_url: str, redis: Redis, channels: tuple[str, str]
) -> None:
    results, _ = channels
    inbox, recorder = Inbox(results), Recorder()
    client = redis_client.async_client(redis_url)  # as the coordinator makes it
    listener = Listener(client, {results: inbox.handler(results)}, (recorder,))
    task = asyncio.create_task(listener.run())
    try:
        await recorder.until(["subscribed"])
        await redis.publish(results, b"\xff\xfer1")  # any bytes: a worker may publish on this channel
        await redis.publish(results, "r2")
        await inbox.until(2)
        assert inbox.received[results] == ["\ufffd\ufffdr1", "r2"]
        assert recorder.events == ["subscribed"]  # not a lost connection
    finally:
        listener.stop()
        await asyncio.wait_for(task, timeout=WAIT_S)
        await client.aclose()


async def test_a_killed_connection_is_told_and_the_channels_subscribed_again(
    redis: Redis, channels: tuple[str, str], listening: tuple[Listener, Recorder, Inbox]
) -> None:
    results, _ = channels
    _, recorder, inbox = listening
    await recorder.until(["subscribed"])
    assert await redis.client_kill_filter(_type="pubsub") >= 1

    await recorder.until(["subscribed", "lost", "subscribed"])
    await redis.publish(results, "after")
    await inbox.until(1)
    assert inbox.received[results] == ["after"]


async def test_cancelling_the_listeners_task_ends_it(redis: Redis, channels: tuple[str, str]) -> None:
    recorder = Recorder()
    listener = Listener(redis, {channel: Inbox(channel).handler(channel) for channel in channels}, (recorder,))
    task = asyncio.create_task(listener.run())
    await recorder.until(["subscribed"])
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=WAIT_S)


async def test_a_refused_subscription_is_retried_and_stop_still_ends_the_listener(
    redis_url: str, redis: Redis, channels: tuple[str, str]
) -> None:
    user, password = f"listener-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    # Every key and command, no channel: SUBSCRIBE answers NOPERM.
    await redis.acl_setuser(
        user, enabled=True, passwords=[f"+{password}"], keys=["~*"], commands=["+@all"], reset_channels=True
    )
    limited = Redis.from_url(redis_url.replace("redis://", f"redis://{user}:{password}@"), decode_responses=True)
    recorder = Recorder()
    listener = Listener(limited, {channel: Inbox(channel).handler(channel) for channel in channels}, (recorder,))
    task = asyncio.create_task(listener.run())
    try:
        await recorder.until(["lost", "lost"])  # refused, retried, refused again: the task lives on
        assert not task.done()
        listener.stop()
        await asyncio.wait_for(task, timeout=WAIT_S)
    finally:
        await limited.aclose()
        await redis.acl_deluser(user)
