"""Every Redis key GPU Torrent uses, with its type, contents, TTL and writer.

`worker:`, `queue:`, `result:` and `worker_index` are the seed's contract (SPEC.md) and keep their names.

| key                   | type      | holds                                       | TTL            | writer      |
|-----------------------|-----------|---------------------------------------------|----------------|-------------|
| `worker:{worker_id}`  | string    | the registration record (JSON)              | none           | coordinator |
| `queue:{worker_id}`   | list      | request ids of the jobs of priority 5 routed to this worker | none | both |
| `queue:{worker_id}#p{n}` | list   | the same, priority n (0-9, not 5)           | none           | both        |
| `modelqueue:{n}:{model}` | list   | request ids, priority n, any worker serving the model takes | none | both |
| `doorbell:worker:{id}` | list     | a token per job queued for it: wakes a consumer | trimmed  | both        |
| `doorbell:model:{model}` | list   | a token per job on the model's shared queue | trimmed    | both        |
| `processing:{id}`     | list      | request ids of the jobs a worker holds (its leases) | none   | both        |
| `lengths`             | hash      | list name → length of every non-empty list; `registry` → version | none | both |
| `result:{request_id}` | string    | the finished result (JSON)                  | `result_ttl_s` | worker      |
| `worker_index`        | integer   | the round-robin counter                     | none           | coordinator |
| `workers`             | set       | ids of every registered worker              | none           | coordinator |
| `heartbeat:{id}`      | string    | last beat and jobs in flight; absent = dead | heartbeat TTL  | worker      |
| `liveness:grace`      | string    | present: Redis was just away; judge no one dead | heartbeat TTL  | coordinator |
| `dead_since`          | hash      | worker id → when a reaper first judged it dead (unix s) | none | coordinator |
| `job:{request_id}`    | hash      | status, worker, model, the job (JSON)       | result TTL + timeout | both  |
| `results:ready`       | channel   | ids of results just written (pub/sub)       | n/a            | worker      |
| `stream:{request_id}` | stream    | text entries, then one entry with the result | `result_ttl_s` | worker      |
| `cancel:{request_id}` | string    | present: the job was ended (cancelled, timed out) | `result_ttl_s` | coordinator |
| `deadlines`           | zset      | request ids by deadline (unix s)            | none: left with the result | both |
| `idempotency:{key}`   | string    | the request id a client's key admitted      | `result_ttl_s` | coordinator |
| `jobs:ended:{id}`     | channel   | ids of its jobs ended before it finished them | n/a          | coordinator |
| `apikey:{key_id}`     | hash      | an API key: SHA-256 of its secret, name, scope | none        | admin       |
| `apikeys`             | set       | ids of every API key                        | none           | admin       |
| `owner:{request_id}`  | string    | the id of the API key that submitted it     | as the result  | coordinator |
| `worker_secret:{id}`  | string    | SHA-256 of the secret a worker registered with | none        | coordinator |
| `ratelimit:{key_id}:{minute}` | hash | requests and tokens admitted that minute | 120 s        | coordinator |
| `streams:{key_id}`    | zset      | open streams of a key, by start time        | none: pruned   | coordinator |
| `drain:{worker_id}`   | string    | present: an admin asked the worker to drain | 1 h            | coordinator |
| `stats:{bucket_start}` | hash    | jobs, failures, tokens, latency sums of 5 s | 15 min         | both        |
| `failures:recent`    | list      | the last 50 failed jobs (JSON), newest first | none: trimmed | both        |
| `catalogue`           | hash      | model → its file (`SwarmFile` JSON)         | none           | coordinator |
| `swarm:fetching`      | zset      | `model address port` of fetches under way, by lapse | none: pruned | coordinator |
| `swarm:epoch`         | integer   | bumped when the swarm's members change      | none           | coordinator |
| `swarm:transfers`     | hash      | `model address port` → its last progress (JSON) | none: pruned | coordinator |
| `shard:{id}`          | string    | a shard host's registration (JSON)          | none           | coordinator |
| `shards`              | set       | ids of every registered shard host          | none           | coordinator |
| `shardbeat:{id}`      | string    | present while the host beats: bytes it lends | heartbeat TTL  | coordinator |
| `shardgroup:{id}`     | string    | the group (leader's worker id) holding it   | 30 s, renewed  | coordinator |

>>> queue_key("w1"), result_key("r1"), worker_index()
('queue:w1', 'result:r1', 'worker_index')
>>> queue_key("w1", priority=9), model_queue_key("gemma3:270m", priority=5, cell=0)
('queue:w1#p9', 'modelqueue:5:gemma3:270m')

A job waits in one list per priority band, so a worker takes the highest band first. The
default band of a worker is the seed's `queue:{worker_id}`; `#` cannot occur in a worker id
(`protocol.WORKER_ID_PATTERN`) and the band of a model queue comes before the model name, so
no two of these names can be the same key. The shared queues are not `queue:model:{model}`:
`model:x` is a valid worker id, whose queue that would be.

The pool lies in cells (docs/architecture.md, "Redis Cluster"): on one Redis one cell, with the
seed's names above; on a Redis Cluster (a `redis+cluster://` URL) every name starts with its cell's
hash tag, so that every key one script names lies in one hash slot, and a cell moves between
primaries as a whole: `{c0}queue:w16`. A worker's keys are in its cell (`cell_of` its id: a hash), a
job's in its request's (`cell_of` its request id), and the pool-wide ones (`workers`, `lengths`,
`deadlines`, the shared queues, ...) are one per cell, each function taking the cell; the rest (API
keys, the catalogue, the swarm, shard hosts, history) are in cell 0. A cluster holds
`CLUSTER_CELLS` cells (`CLUSTER_CELL_TAGS`), spread evenly over its primaries; one Redis holds one.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

from redis.crc import key_slot

RESULTS_CHANNEL = "results:ready"  # on a Redis Cluster one a cell, a shard channel: `results_channel`
KEYS_REVOKED_CHANNEL = "keys:revoked"  # the id of each API key revoked, so coordinators drop it from their caches
# A channel is not a key: on a Redis Cluster a message published on any node reaches subscribers on every node,
# over the cluster bus. A shard channel (SPUBLISH) lies in its name's slot and reaches its primary's subscribers.

SLOTS = 16384  # a Redis Cluster's hash slots


def cluster_tags(count: int) -> tuple[str, ...]:
    """Hash tags for `count` cells on a Redis Cluster, each cell's slot in a part of its own of `count`
    equal parts of the slot space: so a cluster whose primaries serve even ranges of slots (as
    `--cluster create` makes them) and whose number of primaries divides `count` gets as many cells
    on each. Cell 0 keeps `{c0}`, the tag of a pool of one cell, so that its home keys (API keys, the
    catalogue, history) stay where they were; the other cells take the other parts in order, cell N
    the first of `{cN}`, `{cN.1}`, `{cN.2}`, ... whose slot lies in its part.

    >>> cluster_tags(1)
    ('{c0}',)
    >>> sorted(key_slot(tag.encode()) * 3 // SLOTS for tag in cluster_tags(3))
    [0, 1, 2]
    """
    home = "{c0}"
    home_part = key_slot(home.encode()) * count // SLOTS
    parts = [part for part in range(count) if part != home_part]
    tags = [home]
    for cell, part in zip(range(1, count), parts, strict=True):
        names = (f"{{c{cell}}}", *(f"{{c{cell}.{k}}}" for k in range(1, 100_000)))
        tags.append(next(name for name in names if key_slot(name.encode()) * count // SLOTS == part))
    return tuple(tags)


# Each cell's hash tag on a Redis Cluster: every key of the cell starts with it, so every key a script
# names lies in one hash slot, served by one primary. On one Redis: one cell, no tag (the seed's names).
# Twelve: 2, 3, 4 and 6 primaries each get as many cells; a pool on one Redis has one cell.
CLUSTER_CELLS = 12
CLUSTER_CELL_TAGS: tuple[str, ...] = cluster_tags(CLUSTER_CELLS)
CLUSTER_CELL_TAG = CLUSTER_CELL_TAGS[0]  # cell 0's, where the pool's home keys are
HOME_CELL = 0
_tags: tuple[str, ...] = ("",)
_cluster_tags = CLUSTER_CELL_TAGS


def ended_channel(worker_id: str) -> str:
    """The ids of the jobs running on one worker that were ended before it finished them: one channel
    a worker, so that ending a job costs one delivery, not one to every worker of the pool."""
    return f"jobs:ended:{worker_id}"


def use_cluster_layout(on: bool) -> None:
    """Name every key for a Redis Cluster (`CLUSTER_CELL_TAGS`) or for one Redis. A process belongs to
    one pool: `redis_client` calls this with each client it makes, for its URL's kind."""
    global _tags, _checked, _sharded
    _tags, _checked = (_cluster_tags, False) if on else (_one_redis_tags, _one_redis_tags != ("",))
    _sharded = on


def use_cells(tags: tuple[str, ...] = ("",)) -> None:
    """Lay a pool on one Redis out in `len(tags)` cells with these tags, from now on (tests: no slot rule
    applies on one Redis, so `check_one_cell` checks every script's keys as a cluster would); the
    default is one cell without a tag, as a pool on one Redis is."""
    global _one_redis_tags
    _one_redis_tags = tags
    use_cluster_layout(False)


_one_redis_tags: tuple[str, ...] = ("",)
_checked = False
_sharded = False  # on a Redis Cluster: results are announced on shard channels, one a cell


def sharded_channels() -> bool:
    """Whether results are announced with `SPUBLISH` on each cell's shard channel (`results_channel`):
    on a Redis Cluster, where a `PUBLISH` reaches other nodes' subscribers over the cluster bus, which
    holds a few messages in a hundred for about 40 ms (docs/scaling.md, "The cluster's p99"). One Redis
    (even laid out in cells) keeps the one `results:ready`, which Redis before 7 has too."""
    return _sharded


def results_channel(cell: int) -> str:
    """The channel a result of `cell` is announced on: `results:ready`, or that cell's shard channel on
    a cluster (in the cell's slot, so the script that stores the result publishes it on its own node)."""
    return f"{_in(cell)}{RESULTS_CHANNEL}" if _sharded else RESULTS_CHANNEL


def results_channels() -> list[str]:
    """Every channel results are announced on (one, or one a cell)."""
    return [results_channel(cell) for cell in cells()] if _sharded else [RESULTS_CHANNEL]


def use_cluster_cells(count: int = len(CLUSTER_CELL_TAGS)) -> None:
    """Lay a pool on a Redis Cluster out in `count` cells (`cluster_tags`) from the next
    `use_cluster_layout(True)` on (tests of the cells on a real cluster); the default is the pool's own."""
    global _cluster_tags
    _cluster_tags = CLUSTER_CELL_TAGS if count == len(CLUSTER_CELL_TAGS) else cluster_tags(count)


def check_one_cell(names: Sequence[str]) -> None:
    """Raise `ValueError` when `names` (one script's keys) are of more than one cell, where cells are
    laid out on one Redis (`use_cells`); a Redis Cluster refuses such a call itself (`CROSSSLOT`)."""
    if not _checked or not names:
        return
    tags = {name[: name.index("}") + 1] if name.startswith("{") else "" for name in names}
    if len(tags) > 1:
        raise ValueError(f"one script's keys are in cells {sorted(tags)}: {list(names)}")


def on_cluster() -> bool:
    return _tags != ("",)


def layout() -> tuple[str, ...]:
    """Every cell's tag: what names every key (a cache of names keys on it)."""
    return _tags


def cells() -> range:
    """Every cell's number."""
    return range(len(_tags))


def cell_of(name: str, cells: int | None = None) -> int:
    """The cell of a worker's keys (`name`: its id), of a request's (its request id) or of an
    idempotency key's record: a hash of the name, so every part finds the keys from the name alone (a
    coordinator draws its request ids so that each falls in the cell of the worker it routed to).
    `cells`: in a pool of that many cells rather than this process's layout's.

    >>> cell_of("w1"), cell_of("w1", CLUSTER_CELLS), cell_of("w16", CLUSTER_CELLS)
    (0, 4, 0)
    """
    return zlib.crc32(name.encode()) % (cells or len(_tags))


def cell_named(key: str) -> int:
    """The cell a key of this layout lies in, from its tag.

    >>> cell_named(rate_key("k1", 1)) == cell_of("k1")
    True
    """
    return _tags.index(key[: key.index("}") + 1]) if key.startswith("{") else _tags.index("")


def _in(cell: int) -> str:
    return _tags[cell]


def _home() -> str:
    return _tags[HOME_CELL]


def unused(cell: int) -> str:
    """The name sent for a key a script of `cell` is given but does not touch (a limit that is off)."""
    return f"{_in(cell)}-"


def worker_index() -> str:
    """The seed's round-robin counter."""
    return f"{_home()}worker_index"


def workers(cell: int) -> str:
    """The ids of every registered worker of the cell."""
    return f"{_in(cell)}workers"


def list_lengths(cell: int) -> str:
    """The length of every non-empty queue band and processing list, by the list's name: each
    script that pushes onto one or takes from one writes its length there (or drops the field when
    it is empty), so the pool snapshot reads every worker's load in one command rather than eleven
    list lengths a worker (docs/architecture.md, "The pool snapshot"). Its field `REGISTRY_VERSION`
    gets a new token at every change of a worker's record or of `workers`, so that same command tells
    the snapshot whether the records it holds are still the pool's. One a cell, of its lists and workers."""
    return f"{_in(cell)}lengths"


REGISTRY_VERSION = "registry"  # a field of `list_lengths(cell)`: no list is named so


def deadlines(cell: int) -> str:
    """Request ids of the cell by deadline."""
    return f"{_in(cell)}deadlines"


def api_keys() -> str:
    """The ids of every API key."""
    return f"{_home()}apikeys"


def recent_failures() -> str:
    """The last failed jobs, newest first."""
    return f"{_home()}failures:recent"


def dead_since(cell: int) -> str:
    """Worker id → when a reaper first judged the worker dead (unix seconds), for every dead worker:
    shared by the coordinators, so the retention of a dead worker's record is counted once for the
    pool, whichever coordinator restarts. One a cell, of its workers."""
    return f"{_in(cell)}dead_since"


def liveness_grace(cell: int) -> str:
    """Set by a coordinator that sees Redis again after a break (with the heartbeat timeout as TTL):
    no worker could beat meanwhile, so while it exists no reaper moves the jobs of a worker without a
    heartbeat. One a cell (written in every cell at once), read by its scripts."""
    return f"{_in(cell)}liveness:grace"


def catalogue() -> str:
    """The pool's model files, for the swarm (gputorrent/swarm.py)."""
    return f"{_home()}catalogue"


def swarm_fetching() -> str:
    return f"{_home()}swarm:fetching"


def swarm_epoch() -> str:
    return f"{_home()}swarm:epoch"


def swarm_transfers() -> str:
    return f"{_home()}swarm:transfers"


def shards() -> str:
    """The ids of every registered shard host."""
    return f"{_home()}shards"


def shard_key(shard_id: str) -> str:
    """The registration of one shard host (`gputorrent shard`)."""
    return f"{_home()}shard:{shard_id}"


def shard_beat_key(shard_id: str) -> str:
    """Present while the shard host beats; holds the bytes it lends now."""
    return f"{_home()}shardbeat:{shard_id}"


def shard_group_key(shard_id: str) -> str:
    """The group (its leader's worker id) that holds the shard host, while its lease lasts."""
    return f"{_home()}shardgroup:{shard_id}"


def worker_key(worker_id: str) -> str:
    """The registration record of one worker."""
    return f"{_in(cell_of(worker_id))}worker:{worker_id}"


PRIORITY_DEFAULT = 5
PRIORITY_BANDS: tuple[int, ...] = tuple(range(9, -1, -1))  # highest first: the order a worker takes them in
DOORBELL_MAX = 1024  # tokens kept per doorbell: more than the consumers that can wait on it


def queue_key(worker_id: str, priority: int = PRIORITY_DEFAULT) -> str:
    """The job queue of one worker for one priority band (the seed's `queue:{worker_id}` is band 5)."""
    band = "" if priority == PRIORITY_DEFAULT else f"#p{priority}"
    return f"{_in(cell_of(worker_id))}queue:{worker_id}{band}"


def worker_queue_keys(worker_id: str) -> list[str]:
    """Every band of a worker's queue, highest priority first."""
    return [queue_key(worker_id, band) for band in PRIORITY_BANDS]


def model_queue_key(model: str, priority: int = PRIORITY_DEFAULT, *, cell: int) -> str:
    """The shared queue of one model in one cell for one priority band: any worker serving the model
    takes from it."""
    return f"{_in(cell)}modelqueue:{priority}:{model}"


def model_queue_keys(model: str, *, cell: int) -> list[str]:
    """Every band of a model's shared queue in the cell, highest priority first."""
    return [model_queue_key(model, band, cell=cell) for band in PRIORITY_BANDS]


def worker_doorbell_key(worker_id: str) -> str:
    """Tokens that wake a consumer of the worker blocked waiting for work."""
    return f"{_in(cell_of(worker_id))}doorbell:worker:{worker_id}"


def model_doorbell_key(model: str, *, cell: int) -> str:
    """Tokens that wake a consumer of any worker serving the model, for its shared queue in the cell."""
    return f"{_in(cell)}doorbell:model:{model}"


def result_key(request_id: str) -> str:
    """The stored result of one request."""
    return f"{_in(cell_of(request_id))}result:{request_id}"


def heartbeat_key(worker_id: str, cell: int | None = None) -> str:
    """Present while the worker is alive; expires when its heartbeats stop. In its own cell by default
    (`cell`: another cell's, a script's placeholder there)."""
    return f"{_in(cell_of(worker_id) if cell is None else cell)}heartbeat:{worker_id}"


def job_key(request_id: str) -> str:
    """The status of a request between admission and result."""
    return f"{_in(cell_of(request_id))}job:{request_id}"


def stream_key(request_id: str) -> str:
    """The tokens of a streamed request, as they are generated."""
    return f"{_in(cell_of(request_id))}stream:{request_id}"


def cancel_key(request_id: str) -> str:
    """Present once the client has given up on the request (it disconnected from its stream)."""
    return f"{_in(cell_of(request_id))}cancel:{request_id}"


def processing_key(worker_id: str, cell: int | None = None) -> str:
    """The jobs a worker has taken and not finished: moved here from its queue in one step. In its own
    cell by default (`cell`: its jobs of another cell)."""
    return f"{_in(cell_of(worker_id) if cell is None else cell)}processing:{worker_id}"


def abroad_key(worker_id: str) -> str:
    """The cells whose shared queues hold jobs of a model the worker serves while no worker of theirs
    does (a set of cell numbers, written by a reaper): its next take that finds nothing at home takes
    from there."""
    return f"{_in(cell_of(worker_id))}abroad:{worker_id}"


def nothing_queued(cell: int) -> str:
    """A list of the cell no job is ever pushed onto (`#` is never in a worker id): the worker's own
    queue's place in a take from another cell, which takes from that cell's shared queues only."""
    return f"{_in(cell)}queue:#none"


def nobody_rung(cell: int) -> str:
    """The doorbell beside `nothing_queued`."""
    return f"{_in(cell)}doorbell:worker:#none"


def shared_list_of(list_key: str, cell: int) -> str | None:
    """The model whose shared queue `list_key` (a list of the cell) is, in any band; None for another list.

    >>> shared_list_of(model_queue_key("gemma3:270m", 9, cell=0), 0)
    'gemma3:270m'
    """
    prefix = f"{_in(cell)}modelqueue:"
    if not list_key.startswith(prefix):
        return None
    return list_key[len(prefix) :].partition(":")[2]


def held_in(worker_id: str, request_id: str) -> str:
    """The processing list that holds the job `request_id` while `worker_id` runs it: the worker's, in
    the job's cell (its own, unless it took the job from another cell's shared queue)."""
    return processing_key(worker_id, cell_of(request_id))


def job_prefix(cell: int) -> str:
    """`job_key` of the cell less the request id: a script that learns the id only as it runs (the take)."""
    return f"{_in(cell)}job:"


def stream_prefix(cell: int) -> str:
    """`stream_key` of the cell less the request id."""
    return f"{_in(cell)}stream:"


def worker_list_of(list_key: str, cell: int) -> tuple[str, bool] | None:
    """The worker whose queue band or processing list `list_key` (a list of the cell) is, and whether it
    is the processing list; None for any other list (a model's shared queue).

    >>> worker_list_of(queue_key("w1", priority=9), 0), worker_list_of(processing_key("w1"), 0)
    (('w1', False), ('w1', True))
    >>> worker_list_of(model_queue_key("m", cell=0), 0) is None
    True
    """
    held = f"{_in(cell)}processing:"
    if list_key.startswith(held):
        return list_key[len(held) :], True
    queued = f"{_in(cell)}queue:"
    if list_key.startswith(queued):  # a band's `#p{n}` follows the id: `#` is never in an id
        return list_key[len(queued) :].partition("#")[0], False
    return None


def idempotency_key(key: str, cell: int) -> str:
    """The request id that a client's idempotency key (or its own request id) was admitted as, beside
    that request's keys in its cell (a request that names itself is admitted in its name's cell)."""
    return f"{_in(cell)}idempotency:{key}"


def api_key_key(key_id: str) -> str:
    """One API key's record (its secret only as a hash)."""
    return f"{_home()}apikey:{key_id}"


def owner_key(request_id: str) -> str:
    """The id of the API key that submitted a request: only it (or an admin key) reads the result."""
    return f"{_in(cell_of(request_id))}owner:{request_id}"


def worker_secret_key(worker_id: str) -> str:
    """The hash of the secret a worker got at registration; re-registering its id must prove it."""
    return f"{_in(cell_of(worker_id))}worker_secret:{worker_id}"


def rate_key(key_id: str, minute: int) -> str:
    """Requests and tokens one API key was admitted for in one clock minute, in the key id's cell (so
    the keys' counting is spread over the cells, not all on cell 0's shard)."""
    return f"{_in(cell_of(key_id))}ratelimit:{key_id}:{minute}"


def open_streams_key(key_id: str) -> str:
    """The streams one API key has open now (request ids scored by start time), in the key id's cell."""
    return f"{_in(cell_of(key_id))}streams:{key_id}"


def drain_key(worker_id: str) -> str:
    """Present once an admin asked the worker to drain and stop; its heartbeat sees it."""
    return f"{_in(cell_of(worker_id))}drain:{worker_id}"


def stats_key(bucket_start: int) -> str:
    """The pool's job figures for the `pool_stats.BUCKET_S` seconds starting at `bucket_start` (unix s)."""
    return f"{_home()}stats:{bucket_start}"
