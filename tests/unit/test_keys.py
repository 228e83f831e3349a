from gputorrent import keys


def test_seed_keys_keep_their_exact_names() -> None:
    assert keys.worker_key("w1") == "worker:w1"
    assert keys.queue_key("w1") == "queue:w1"
    assert keys.result_key("r1") == "result:r1"
    assert keys.WORKER_INDEX == "worker_index"


def test_added_keys_follow_the_same_pattern() -> None:
    assert keys.heartbeat_key("w1") == "heartbeat:w1"
    assert keys.job_key("r1") == "job:r1"
    assert keys.WORKERS == "workers"
    assert keys.RESULTS_CHANNEL == "results:ready"
