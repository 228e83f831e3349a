from gputorrent.protocol import Hardware, WorkerState
from gputorrent.routing import candidates_for, pick_round_robin, served_models


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
