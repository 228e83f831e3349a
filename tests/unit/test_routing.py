import random
from typing import get_args

import pytest

from gputorrent import routing
from gputorrent.config import CoordinatorSettings
from gputorrent.protocol import Hardware, InferenceRequest, WorkerState
from gputorrent.routing import (
    AFFINITY_EXACT_MAX,
    LEAST_LOADED_EXACT_MAX,
    POLICIES,
    AffinityRing,
    Route,
    affinity_key,
    affinity_ring,
    candidates_for,
    choose,
    choose_among,
    pick_round_robin,
    served_models,
)


def _worker(worker_id: str, models: list[str], state: str = "alive") -> WorkerState:
    return WorkerState(
        worker_id=worker_id, models=models, backend="fake", slots=1, hardware=Hardware(), state=state,  # type: ignore[arg-type]
        jobs_in_flight=0, queue_length=0, last_heartbeat_at=None, registered_at=0.0,
    )  # fmt: skip


def test_candidates_are_live_workers_serving_the_model_in_stable_order() -> None:
    pool = [_worker("b", ["m"]), _worker("a", ["m", "n"]), _worker("c", ["n"]), _worker("d", ["m"], "dead")]
    assert candidates_for("m", pool) == ["a", "b"]
    assert candidates_for("x", pool) == []


def test_served_models_ignore_dead_workers() -> None:
    pool = [_worker("a", ["m"]), _worker("b", ["n"], "dead")]
    assert served_models(pool) == ["m"]


def test_round_robin_walks_every_candidate_in_turn() -> None:
    picks = [pick_round_robin(["a", "b", "c"], counter) for counter in range(1, 8)]
    assert picks == ["a", "b", "c", "a", "b", "c", "a"]


def _loaded(
    worker_id: str, queued: int = 0, held: int = 0, slots: int = 1, speed: float | None = None, state: str = "alive"
) -> WorkerState:
    return WorkerState(
        worker_id=worker_id, models=["m"], backend="fake", slots=slots, hardware=Hardware(), state=state,  # type: ignore[arg-type]
        jobs_in_flight=held, queue_length=queued, jobs_held=held, tokens_per_s=speed, last_heartbeat_at=None,
        registered_at=0.0,
    )  # fmt: skip


def test_least_loaded_picks_the_worker_that_would_finish_a_new_job_first() -> None:
    # The fast worker has more jobs but clears them four times as fast.
    pool = [_loaded("slow", queued=1, held=1, speed=10.0), _loaded("fast", queued=3, held=1, speed=40.0)]
    assert choose("least_loaded", "m", pool) == Route(worker_id="fast")
    pool = [_loaded("slow", queued=0, held=0, speed=10.0), _loaded("fast", queued=8, held=1, speed=40.0)]
    assert choose("least_loaded", "m", pool) == Route(worker_id="slow")


def test_least_loaded_counts_free_slots_and_gives_unmeasured_workers_the_median_speed() -> None:
    pool = [_loaded("a", held=3, slots=4, speed=20.0), _loaded("b", held=1, slots=1, speed=20.0)]
    assert choose("least_loaded", "m", pool) == Route(worker_id="a")  # a still has a free slot
    pool = [_loaded("new", held=0), _loaded("busy", held=1, speed=20.0), _loaded("idle", speed=20.0)]
    assert choose("least_loaded", "m", pool) == Route(worker_id="idle")  # ties on speed: fewer jobs, then id


def test_session_affinity_keeps_a_key_on_one_worker_until_it_is_overloaded() -> None:
    pool = [_loaded(f"w{i}", speed=10.0) for i in range(4)]
    home = choose("session_affinity", "m", pool, affinity_key="session:abc")
    assert home is not None and home.worker_id is not None
    assert all(choose("session_affinity", "m", pool, affinity_key="session:abc") == home for _ in range(3))
    keys_homes = {choose("session_affinity", "m", pool, affinity_key=f"session:{i}") for i in range(64)}
    assert len(keys_homes) == 4  # keys spread over the pool
    overloaded = [w.model_copy(update={"queue_length": 10}) if w.worker_id == home.worker_id else w for w in pool]
    moved = choose("session_affinity", "m", overloaded, affinity_key="session:abc")
    assert moved is not None and moved != home


def test_affinity_key_is_the_session_else_the_prompt_start_else_the_conversation_so_far() -> None:
    assert affinity_key(InferenceRequest(model="m", prompt="p", session_id="s1")) == "session:s1"
    long_prompt = "x" * 2000
    assert affinity_key(InferenceRequest(model="m", prompt=long_prompt)) == affinity_key(
        InferenceRequest(model="m", prompt=long_prompt + "different ending")
    )
    history = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    first = InferenceRequest.model_validate({"model": "m", "messages": [*history, {"role": "user", "content": "a"}]})
    second = InferenceRequest.model_validate({"model": "m", "messages": [*history, {"role": "user", "content": "b"}]})
    assert affinity_key(first) == affinity_key(second)


def test_pull_routes_to_the_shared_queue_and_no_live_worker_routes_nowhere() -> None:
    assert choose("pull", "m", [_loaded("a")]) == Route(worker_id=None)
    assert choose("pull", "m", [_loaded("a", state="dead")]) is None
    assert choose("round_robin", "other", [_loaded("a")]) is None


def test_round_robin_policy_walks_the_live_candidates() -> None:
    pool = [_loaded("b"), _loaded("a"), _loaded("c", state="draining")]
    assert [choose("round_robin", "m", pool, counter=n) for n in (1, 2, 3)] == [
        Route(worker_id="a"), Route(worker_id="b"), Route(worker_id="a"),
    ]  # fmt: skip


def test_every_policy_is_a_setting() -> None:
    assert set(POLICIES) == set(get_args(CoordinatorSettings.model_fields["routing"].annotation))


def test_jobs_queued_since_the_read_count_as_load() -> None:
    pool = [_loaded("a"), _loaded("b")]
    assert choose_among("least_loaded", pool) == Route(worker_id="a")
    assert choose_among("least_loaded", pool, pending={"a": 1}) == Route(worker_id="b")
    assert choose_among("session_affinity", pool, pending={"a": 3, "b": 3}, affinity_key="session:x") is not None


def test_least_loaded_over_many_candidates_compares_a_sample_that_favours_the_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past `LEAST_LOADED_EXACT_MAX` candidates a pick looks at a few at random, not all: it still
    lands on an idle worker almost always, and spreads over many rather than all on the one least loaded."""
    monkeypatch.setattr(routing, "random", random.Random(1))  # the same sample every run, no one else's state
    size = LEAST_LOADED_EXACT_MAX * 16
    pool = [_loaded(f"w{i:05d}", queued=0 if i % 2 else 10) for i in range(size)]
    picks = [choose_among("least_loaded", pool) for _ in range(400)]
    idle = [p for p in picks if p is not None and int(p.worker_id[1:]) % 2]
    assert len(idle) >= 0.85 * len(picks)  # all of a sample of 4 busy: 1 time in 16
    assert len({p.worker_id for p in idle if p is not None}) > 200


def test_least_loaded_over_many_equal_candidates_spreads_evenly_over_their_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """Among a sample of equally loaded workers the pick is the sample's own: ties broken by id made the
    lowest ids of an idle pool draw most of its jobs (and, on a Redis Cluster, their cells' shard)."""
    monkeypatch.setattr(routing, "random", random.Random(2))
    size = LEAST_LOADED_EXACT_MAX * 16
    pool = [_loaded(f"w{i:05d}") for i in range(size)]
    picks = [choose_among("least_loaded", pool) for _ in range(4000)]
    lower_half = sum(1 for p in picks if p is not None and int(p.worker_id[1:]) < size // 2)
    assert 0.45 * len(picks) < lower_half < 0.55 * len(picks)  # by id: all but one sample in 16, 94%


def test_session_affinity_over_many_candidates_walks_a_ring_and_moves_only_a_leavers_keys() -> None:
    """Past `AFFINITY_EXACT_MAX` candidates a key's worker comes from a ring made once per read: a key
    stays on its worker, keys spread, a worker's leaving moves only its own keys, and an overloaded
    worker passes a key on."""
    pool = [_loaded(f"w{i:04d}") for i in range(AFFINITY_EXACT_MAX * 3)]

    def home(key: str, workers: list[WorkerState], ring: AffinityRing) -> str | None:
        route = choose_among("session_affinity", workers, affinity_key=key, ring=ring)
        return route.worker_id if route is not None else None

    ring = affinity_ring(pool)
    homes = {f"session:{i}": home(f"session:{i}", pool, ring) for i in range(2000)}
    assert all(home(key, pool, ring) == worker for key, worker in list(homes.items())[:50])
    assert len(set(homes.values())) > len(pool) * 0.9  # keys spread over nearly every worker
    leaver = homes["session:0"]
    rest = [w for w in pool if w.worker_id != leaver]
    rest_ring = affinity_ring(rest)
    moved = {key for key in homes if home(key, rest, rest_ring) != homes[key]}
    assert moved == {key for key, worker in homes.items() if worker == leaver}
    overloaded = [w.model_copy(update={"queue_length": 10}) if w.worker_id == leaver else w for w in pool]
    assert home("session:0", overloaded, affinity_ring(overloaded)) not in (None, leaver)
