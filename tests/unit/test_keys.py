from gputorrent import keys


def test_seed_keys_keep_their_exact_names() -> None:
    assert keys.worker_key("w1") == "worker:w1"
    assert keys.queue_key("w1") == "queue:w1"
    assert keys.result_key("r1") == "result:r1"
    assert keys.worker_index() == "worker_index"


def test_added_keys_follow_the_same_pattern() -> None:
    assert keys.heartbeat_key("w1") == "heartbeat:w1"
    assert keys.job_key("r1") == "job:r1"
    assert keys.workers(0) == "workers"
    assert keys.RESULTS_CHANNEL == "results:ready"


def test_on_a_cluster_every_key_carries_its_cells_hash_tag_and_channels_do_not() -> None:
    keys.use_cluster_layout(True)
    try:
        assert len(keys.layout()) == keys.CLUSTER_CELLS == 12 and keys.layout()[0] == "{c0}"
        w16 = keys.layout()[keys.cell_of("w16")]
        assert keys.cell_of("w16") == 0 and keys.cell_of("w1") != 0
        names = [keys.worker_key("w16"), keys.queue_key("w16"), keys.queue_key("w16", priority=9), keys.job_key("r1"),
                 keys.workers(0), keys.deadlines(0), keys.model_queue_key("m", cell=0), keys.stats_key(5),
                 keys.list_lengths(0)]  # fmt: skip
        assert names[:3] == ["{c0}worker:w16", "{c0}queue:w16", "{c0}queue:w16#p9"] and w16 == "{c0}"
        assert all(name.startswith(keys.layout()) for name in names)
        w1 = keys.layout()[keys.cell_of("w1")]
        assert keys.worker_key("w1") == f"{w1}worker:w1" and keys.workers(keys.cell_of("w1")) == f"{w1}workers"
        assert keys.RESULTS_CHANNEL == "results:ready" and keys.ended_channel("w1") == "jobs:ended:w1"
        # The lengths index names lists by their tagged names; each still maps back to its worker.
        assert keys.worker_list_of(keys.queue_key("w16", priority=9), 0) == ("w16", False)
        assert keys.worker_list_of(keys.processing_key("w16"), 0) == ("w16", True)
    finally:
        keys.use_cluster_layout(False)
    assert keys.queue_key("w1") == "queue:w1"


def test_in_cells_a_workers_keys_are_in_its_cell_a_requests_in_its_and_the_pools_in_each() -> None:
    keys.use_cells(("{a}", "{b}", "{c}"))
    try:
        tag = "{a}{b}{c}"[3 * keys.cell_of("w1") : 3 * keys.cell_of("w1") + 3]
        for name in (keys.worker_key("w1"), keys.queue_key("w1", 9), keys.processing_key("w1"),
                     keys.heartbeat_key("w1"), keys.worker_doorbell_key("w1"), keys.drain_key("w1"),
                     keys.worker_secret_key("w1")):  # fmt: skip
            assert name.startswith(tag), name
        request = next(f"r{i}" for i in range(100) if keys.cell_of(f"r{i}") != keys.cell_of("w1"))
        request_tag = "{a}{b}{c}"[3 * keys.cell_of(request) : 3 * keys.cell_of(request) + 3]
        for name in (keys.job_key(request), keys.result_key(request), keys.stream_key(request),
                     keys.cancel_key(request), keys.owner_key(request)):  # fmt: skip
            assert name.startswith(request_tag), name
        assert [keys.workers(cell) for cell in keys.cells()] == ["{a}workers", "{b}workers", "{c}workers"]
        assert keys.processing_key("w1", 2) == "{c}processing:w1" and keys.heartbeat_key("w1", 2) == "{c}heartbeat:w1"
        assert keys.worker_list_of("{c}processing:w1", 2) == ("w1", True)
        assert keys.worker_list_of("{c}processing:w1", 1) is None  # another cell's name
        assert keys.api_keys() == "{a}apikeys" and keys.worker_index() == "{a}worker_index"  # the home cell's
        assert keys.job_prefix(1) + "r" == "{b}job:r"
    finally:
        keys.use_cells()
