from gputorrent import keys


def test_seed_keys_keep_their_exact_names() -> None:
    assert keys.worker_key("w1") == "worker:w1"
    assert keys.queue_key("w1") == "queue:w1"
    assert keys.result_key("r1") == "result:r1"
    assert keys.worker_index() == "worker_index"


def test_added_keys_follow_the_same_pattern() -> None:
    assert keys.heartbeat_key("w1") == "heartbeat:w1"
    assert keys.job_key("r1") == "job:r1"
    assert keys.workers() == "workers"
    assert keys.RESULTS_CHANNEL == "results:ready"


def test_on_a_cluster_every_key_carries_the_cells_hash_tag_and_channels_do_not() -> None:
    keys.use_cluster_layout(True)
    try:
        names = [keys.worker_key("w1"), keys.queue_key("w1"), keys.queue_key("w1", priority=9), keys.job_key("r1"),
                 keys.workers(), keys.deadlines(), keys.model_queue_key("m"), keys.stats_key(5),
                 keys.list_lengths()]  # fmt: skip
        assert names[:3] == ["{c0}worker:w1", "{c0}queue:w1", "{c0}queue:w1#p9"]
        assert all(name.startswith(keys.CLUSTER_CELL_TAG) for name in names)
        assert keys.RESULTS_CHANNEL == "results:ready" and keys.ended_channel("w1") == "jobs:ended:w1"
        # The lengths index names lists by their tagged names; each still maps back to its worker.
        assert keys.worker_list_of(keys.queue_key("w1", priority=9)) == ("w1", False)
        assert keys.worker_list_of(keys.processing_key("w1")) == ("w1", True)
    finally:
        keys.use_cluster_layout(False)
    assert keys.queue_key("w1") == "queue:w1"
