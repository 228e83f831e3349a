"""Scenario 2: kill -9 a worker mid-stream; another worker continues the client's stream from the
tokens already sent, with none lost or repeated, and the stream stays open throughout."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.conftest import StreamReader, wait_for
from tests.faults.harness import HEARTBEAT_TIMEOUT_S, RECOVERY_TARGET_S, Pool, Row, Submitted, expected_output

pytestmark = pytest.mark.fault

SCENARIO = "2. kill -9 a worker mid-stream"
TOKEN_DELAY_S = 0.1
MAX_TOKENS = 40  # about 4 s of tokens


def test_a_stream_whose_worker_is_killed_continues_from_another_without_a_lost_or_repeated_token(
    pool: Pool, record: Callable[[Row], None]
) -> None:
    pool.start_workers("w1", token_delay_s=TOKEN_DELAY_S)
    prompt = " ".join(f"word{i}" for i in range(MAX_TOKENS))
    body = {"model": "fake", "prompt": prompt, "stream": True, "options": {"max_tokens": MAX_TOKENS, "temperature": 0}}
    reader = StreamReader(pool.url(), body)
    reader.start()
    wait_for(lambda: bool(reader.events), 10, "the queued event")
    queued = reader.events[0][1]
    assert queued["worker_id"] == "w1"
    pool.track(Submitted(str(queued["request_id"]), pool.url(), "w1", prompt, MAX_TOKENS, time.time()))
    pool.start_workers("w2", token_delay_s=TOKEN_DELAY_S)  # after: the stream is w1's

    wait_for(lambda: reader.tokens() >= 5, 10, "a few tokens to reach the client")
    killed_at = pool.kill("w1")
    pool.recovery.add([str(queued["request_id"])], since=killed_at)
    reader.join(timeout=HEARTBEAT_TIMEOUT_S + 30)
    assert not reader.is_alive(), "the client's stream never ended"

    outcome = pool.settle()
    recover_s = pool.recovery.worst()
    record(outcome.row(SCENARIO, recover_s))
    outcome.assert_invariant()
    assert reader.text() == expected_output(prompt, MAX_TOKENS)  # every token once, in order
    last_event, result = reader.events[-1]
    assert last_event == "result" and result["worker_id"] == "w2"
    resumed = result["resumed"]
    assert isinstance(resumed, dict) and resumed["exact"] and int(resumed["after_tokens"]) >= 5
    assert recover_s is not None and recover_s <= RECOVERY_TARGET_S, f"recovered in {recover_s:.2f} s"
