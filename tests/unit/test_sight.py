"""The reaper's `Sight`: how long a coordinator has seen Redis without a break."""

from __future__ import annotations

from gputorrent.coordinator.reaper import Sight


class _Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_a_new_coordinator_starts_blind_and_its_first_look_is_no_break() -> None:
    clock = _Clock()
    sight = Sight(max_gap_s=1.0, clock=clock)
    assert sight.seen_for_s() == 0
    assert not sight.saw()
    clock.now += 0.5
    assert not sight.saw()
    assert sight.seen_for_s() == 0.5


def test_a_reply_later_than_the_gap_is_a_break_and_sight_starts_again() -> None:
    clock = _Clock()
    sight = Sight(max_gap_s=1.0, clock=clock)
    sight.saw()
    clock.now += 5.0
    assert sight.saw()  # Redis paused, or the loop stalled: nothing was seen meanwhile
    assert sight.seen_for_s() == 0
    clock.now += 1.0
    assert not sight.saw()
    assert sight.seen_for_s() == 1.0


def test_a_failed_call_is_a_break_even_before_the_first_reply() -> None:
    clock = _Clock()
    sight = Sight(max_gap_s=1.0, clock=clock)
    sight.lost()  # started while Redis was away
    assert sight.seen_for_s() == 0
    assert sight.saw()
    sight.lost()
    clock.now += 0.1
    assert sight.seen_for_s() == 0
    assert sight.saw()
