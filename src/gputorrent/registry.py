"""The worker registry in Redis: register, heartbeat, leave, and the pool snapshot.

Liveness is the presence of `heartbeat:{worker_id}`: the worker rewrites it with a TTL on every
beat, so a worker that dies simply expires and every coordinator sees it at once.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from redis.client import Pipeline
from redis.cluster import ClusterPipeline
from redis.exceptions import NoPermissionError, WatchError

from gputorrent import keys
from gputorrent.protocol import (
    MAX_MODELS,
    BeatAnswer,
    BeatLoad,
    Group,
    Hardware,
    Heartbeat,
    WorkerRecord,
    WorkerState,
)
from gputorrent.redis_client import REDIS_FAILURES, RedisClient, SyncRedisClient
from gputorrent.scripts import Script
from gputorrent.telemetry import Telemetry

log = logging.getLogger(__name__)
M = TypeVar("M", WorkerRecord, BeatLoad)


def new_registry_version() -> str:
    """A token for `keys.REGISTRY_VERSION`, new at every change of a record or of `workers`: a reader
    compares it for equality only, so a token never seen before, not a count (a count could come back
    to a value a reader holds, after a failover lost a change)."""
    return uuid.uuid4().hex


# A live worker's id is taken: only its own secret (or `force`) replaces its registration.
@dataclass(frozen=True)
class _RegisterKeys:
    record_key: str
    workers: str
    heartbeat: str
    secret: str
    lengths: str  # its `REGISTRY_VERSION` field gets a new token
    dead_since: str  # a registration ends whatever death was recorded for the id


@dataclass(frozen=True)
class _RegisterArgs:
    record: str
    worker_id: str
    first_beat: str
    heartbeat_ttl_ms: int
    secret_hash: str
    presented_hash: str
    force: bool
    version_field: str
    version: str  # a new token (`new_registry_version`)


_REGISTER = Script(
    _RegisterKeys,
    _RegisterArgs,
    """
if not force and redis.call('EXISTS', heartbeat) == 1 then
  local current = redis.call('GET', secret)
  if current and current ~= presented_hash then return 0 end
end
redis.call('SET', record_key, record)
redis.call('SADD', workers, worker_id)
redis.call('SET', heartbeat, first_beat, 'PX', heartbeat_ttl_ms)
redis.call('SET', secret, secret_hash)
redis.call('HSET', lengths, version_field, version)
redis.call('HDEL', dead_since, worker_id)
return 1
""",
)


async def register(
    redis: RedisClient,
    record: WorkerRecord,
    heartbeat_ttl_s: float,
    secret_hash: str,
    presented_hash: str = "",
    *,
    force: bool = False,
) -> bool:
    """Store the record and the hash of the worker's new secret, add the id to `workers` and mark
    the worker alive, atomically.

    Registering the id of a live worker needs that worker's secret (`presented_hash`) unless
    `force`: False, and nothing changes, when it is missing or wrong. A dead worker's id is free.
    """
    heartbeat = Heartbeat(at=record.registered_at)
    worker_id = record.worker_id
    cell = keys.cell_of(worker_id)
    stored = await _REGISTER.run(
        redis,
        _RegisterKeys(
            record_key=keys.worker_key(worker_id),
            workers=keys.workers(cell),
            heartbeat=keys.heartbeat_key(worker_id),
            secret=keys.worker_secret_key(worker_id),
            lengths=keys.list_lengths(cell),
            dead_since=keys.dead_since(cell),
        ),
        _RegisterArgs(
            record=record.model_dump_json(),
            worker_id=worker_id,
            first_beat=heartbeat.model_dump_json(),
            heartbeat_ttl_ms=int(heartbeat_ttl_s * 1000),
            secret_hash=secret_hash,
            presented_hash=presented_hash,
            force=force,
            version_field=keys.REGISTRY_VERSION,
            version=new_registry_version(),
        ),
    )
    return bool(stored)


def beat(
    client: SyncRedisClient, worker_id: str, heartbeat: Heartbeat, ttl_s: float, *, swarm_epoch: bool,
    registered: bool = False, registered_at: float | None = None,
) -> BeatAnswer:  # fmt: skip
    """Refresh the worker's liveness key with its load and condition (blocking: it runs on its own
    thread); answers whether an admin asked it to drain, and the swarm's epoch if `swarm_epoch`.
    With `registered`, it also reads the worker's record: a worker removed from the registry (by an
    admin, or dead past `GPUTORRENT_DEAD_WORKER_RETENTION_S`) is told to drain, as a worker linked
    through the coordinator is when its secret is refused; one whose id another process registered
    since (a record whose `registered_at` is not this worker's `registered_at`) is told it was replaced."""
    with client.pipeline(transaction=False) as pipe:
        queue_beat(pipe, worker_id, heartbeat, ttl_s, registered=registered)
        answer = beat_answer(
            worker_id, pipe.execute(raise_on_error=False), registered=registered, registered_at=registered_at
        )
    if not swarm_epoch:
        return answer
    # Apart from the beat: on a cluster the epoch is in cell 0, maybe on a primary that is out of reach
    # while the worker's own cell is served, and a pipeline that cannot reach a node it names fails whole.
    return answer.model_copy(update={"swarm_epoch": _read_swarm_epoch(client, worker_id)})


def _read_swarm_epoch(client: SyncRedisClient, worker_id: str) -> int:
    """The swarm's epoch, or 0 when it cannot be read now."""
    try:
        return int(client.get(keys.swarm_epoch()) or 0)
    except NoPermissionError as e:
        # A Redis user made before the swarm (docs/security.md's ACL reads `swarm:epoch`): the beat must
        # not fail for it, or the worker would look dead; its swarm reads the members only at start.
        if not _epoch_unreadable_told:
            log.warning("worker %s cannot read %s (%s): add %%R~%s to its Redis user", worker_id,
                        keys.swarm_epoch(), e, keys.swarm_epoch())  # fmt: skip
            _told_epoch_unreadable()
    except REDIS_FAILURES as e:
        log.debug("worker %s could not read the swarm's epoch this beat (%s)", worker_id, e)
    return 0


BEAT_REPLIES = 2  # the replies `queue_beat` (without `registered`) adds to a pipeline


def queue_beat(
    pipe: Pipeline | ClusterPipeline,
    worker_id: str,
    heartbeat: Heartbeat,
    ttl_s: float,
    *,
    registered: bool = False,
) -> None:
    """Add one beat's commands to `pipe`, whose replies go to `beat_answer` (`BEAT_REPLIES` of them, one
    more with `registered`: the worker's record); every key is in the worker's cell. The record is read
    only on some beats: beats are most of what an idle pool costs Redis (docs/scaling.md). Only a
    worker with a swarm reads the swarm's epoch, apart (`beat`)."""
    pipe.set(keys.heartbeat_key(worker_id), heartbeat.model_dump_json(), px=int(ttl_s * 1000))
    pipe.exists(keys.drain_key(worker_id))
    if registered:
        pipe.get(keys.worker_key(worker_id))


def beat_answer(
    worker_id: str, replies: list[Any], *, registered: bool = False, registered_at: float | None = None
) -> BeatAnswer:
    """What one beat's replies (`queue_beat`, with the same `registered`) say, for a worker registered
    at `registered_at` (None: not known, then only a missing record counts); raises the error of a
    failed write."""
    written, drain, *read = replies
    record = read[0] if registered else None
    for reply in (written, drain, record):
        if isinstance(reply, Exception):
            raise reply
    gone = registered and record is None
    replaced = registered and record is not None and registered_at is not None and (
        _registered_at(record) not in (None, registered_at)
    )  # fmt: skip
    if gone:
        log.error(
            "worker %s: its registration is gone (removed by an admin, or dead for longer than the "
            "coordinators' GPUTORRENT_DEAD_WORKER_RETENTION_S); it drains and stops: restart it to join again",
            worker_id,
        )
    if replaced:
        log.error(
            "worker %s: another process registered this id since (this one's heartbeat had lapsed, or an admin "
            "forced it); this one stops, leaving that one's queue and jobs alone: give each worker an id of its own",
            worker_id,
        )
    return BeatAnswer(drain=bool(drain) or gone or replaced, replaced=replaced)


def _registered_at(record: str | bytes) -> float | None:
    """The `registered_at` of a stored record; None where it cannot be read (a record is never judged
    another registration's on text this process cannot read)."""
    try:
        value = json.loads(record).get("registered_at")
    except (ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, int | float) else None


_epoch_unreadable_told = False


def _told_epoch_unreadable() -> None:
    global _epoch_unreadable_told
    _epoch_unreadable_told = True


async def add_model(redis: RedisClient, worker_id: str, model: str, *, registered_at: float | None = None) -> bool:
    """Add `model` to the models the worker's registration lists (a pull made it serve one more),
    so routing and the model listings see it; a model already listed is left as it is.

    A transaction on the record (WATCH, then MULTI): a registration written meanwhile is read again,
    never overwritten. False, and nothing written, when the worker is not registered (it left or was
    removed; with `registered_at`, not as the registration made then) or already lists `MAX_MODELS` models.
    """

    def added(record: WorkerRecord) -> WorkerRecord | None:
        if model in record.models:
            return record
        if len(record.models) >= MAX_MODELS:
            log.warning("worker %s lists %d models already; %s not added", worker_id, MAX_MODELS, model)
            return None
        return record.model_copy(update={"models": [*record.models, model]})

    return await _update_record(redis, worker_id, added, registered_at)


async def set_group(redis: RedisClient, worker_id: str, group: Group, *, registered_at: float | None = None) -> bool:
    """Replace where the worker's split model lies (its group re-formed on other hosts); False when the
    worker is not registered (with `registered_at`, not as the registration made then)."""
    return await _update_record(
        redis, worker_id, lambda record: record.model_copy(update={"group": group}), registered_at
    )


async def registered_by_another(redis: RedisClient, worker_id: str, registered_at: float | None) -> bool:
    """Whether the worker's record is another registration than the one made at `registered_at` (the
    id was registered again since; a missing record, or `registered_at` None, is not)."""
    if registered_at is None:
        return False
    record = await redis.get(keys.worker_key(worker_id))
    return record is not None and _registered_at(record) not in (None, registered_at)


async def _update_record(
    redis: RedisClient, worker_id: str, change: Callable[[WorkerRecord], WorkerRecord | None],
    registered_at: float | None = None,
) -> bool:  # fmt: skip
    """Rewrite the worker's record as `change` says (None: leave it); a transaction on the record (WATCH,
    then MULTI), so a registration written meanwhile is read again, never overwritten. False, and
    nothing written, when the worker is not registered, or not as the registration made at
    `registered_at` (when given: another process registered its id since), or `change` declines."""
    key = keys.worker_key(worker_id)
    async with redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                await pipe.watch(key)
                raw = await pipe.get(key)
                if raw is None:
                    return False
                record = WorkerRecord.model_validate_json(raw)
                if registered_at is not None and record.registered_at != registered_at:
                    return False
                changed = change(record)
                if changed is None:
                    return False
                if changed == record:
                    return True
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.set(key, changed.model_dump_json())
                pipe.hset(keys.list_lengths(keys.cell_of(worker_id)), keys.REGISTRY_VERSION, new_registry_version())
                await pipe.execute()
                return True
            except WatchError:  # the record changed under us: read it again
                continue


async def mark_gone(redis: RedisClient, worker_id: str) -> None:
    """Declare the worker dead now (it is shutting down) so no new job is routed to it; a drain asked
    of it is done."""
    await redis.delete(keys.heartbeat_key(worker_id), keys.drain_key(worker_id))


# Only a worker with nothing left in its lists leaves the registry: the reaper finds jobs
# through the registry, so removing one that still holds jobs would lose them.
@dataclass(frozen=True)
class _DeregisterKeys:
    record_key: str
    heartbeat: str
    workers: str
    drain: str
    lengths: str  # its `REGISTRY_VERSION` field gets a new token
    lists: tuple[str, ...]  # its processing list and every band of its queue


@dataclass(frozen=True)
class _DeregisterArgs:
    worker_id: str
    version_field: str
    version: str


_DEREGISTER = Script(
    _DeregisterKeys,
    _DeregisterArgs,
    """
for _, held in ipairs(lists) do
  if redis.call('LLEN', held) > 0 then return 0 end
end
redis.call('DEL', record_key, heartbeat, drain)
redis.call('SREM', workers, worker_id)
redis.call('HSET', lengths, version_field, version)
return 1
""",
)


async def deregister(redis: RedisClient, worker_id: str) -> bool:
    """Remove the worker from the pool if its queue and processing list are empty, else only mark it gone.

    Returns whether it left the registry. The hash of its secret stays (a worker's Redis user need
    not write it); it only matters while a worker with this id is alive.
    """
    cell = keys.cell_of(worker_id)
    left = await _DEREGISTER.run(
        redis,
        _DeregisterKeys(
            record_key=keys.worker_key(worker_id),
            heartbeat=keys.heartbeat_key(worker_id),
            workers=keys.workers(cell),
            drain=keys.drain_key(worker_id),
            lengths=keys.list_lengths(cell),
            lists=(keys.processing_key(worker_id), *keys.worker_queue_keys(worker_id)),
        ),
        _DeregisterArgs(worker_id=worker_id, version_field=keys.REGISTRY_VERSION, version=new_registry_version()),
    )
    if not left:
        await mark_gone(redis, worker_id)
    return bool(left)


@dataclass(frozen=True)
class _ForgetKeys:
    record_key: str
    heartbeat: str
    workers: str
    drain: str
    secret: str
    grace: str  # `liveness:grace`: while it holds, an absent heartbeat proves nothing
    lengths: str  # its `REGISTRY_VERSION` field gets a new token
    lists: tuple[str, ...]  # its processing list and every band of its queue


@dataclass(frozen=True)
class _ForgetArgs:
    worker_id: str
    version_field: str
    version: str


_FORGET_DEAD = Script(
    _ForgetKeys,
    _ForgetArgs,
    """
if redis.call('EXISTS', heartbeat, grace) > 0 then return 0 end
for _, held in ipairs(lists) do
  if redis.call('LLEN', held) > 0 then return 0 end
end
redis.call('DEL', record_key, drain, secret)
redis.call('SREM', workers, worker_id)
redis.call('HSET', lengths, version_field, version)
return 1
""",
)


async def forget_dead(redis: RedisClient, worker_id: str) -> bool:
    """Remove a dead worker whose lists are empty from the registry, its secret with it (the reaper,
    once it has been dead for `GPUTORRENT_DEAD_WORKER_RETENTION_S`). Nothing changes, and it returns
    False, if the worker beats again or registered anew, if `liveness:grace` holds, or if it still
    holds jobs. In one script, so a worker that registers meanwhile keeps its new record and secret."""
    cell = keys.cell_of(worker_id)
    return bool(
        await _FORGET_DEAD.run(
            redis,
            _ForgetKeys(
                record_key=keys.worker_key(worker_id),
                heartbeat=keys.heartbeat_key(worker_id),
                workers=keys.workers(cell),
                drain=keys.drain_key(worker_id),
                secret=keys.worker_secret_key(worker_id),
                grace=keys.liveness_grace(cell),
                lengths=keys.list_lengths(cell),
                lists=(keys.processing_key(worker_id), *keys.worker_queue_keys(worker_id)),
            ),
            _ForgetArgs(worker_id=worker_id, version_field=keys.REGISTRY_VERSION, version=new_registry_version()),
        )
    )


# Workers read per round trip: between them the coordinator's other requests run, so a pool of
# thousands is read in steps of a few milliseconds of its time (and well under one of Redis's)
# rather than one long pause.
SNAPSHOT_CHUNK = 200


@dataclass
class KnownCell:
    """The registrations of one cell as a reader of the pool read them last, with the cell's
    `REGISTRY_VERSION` then: while it has not moved, the next read takes the ids and records from
    here and reads only the heartbeats. A record changed another way (by hand) is seen at the next
    full read, every `FULL_READ_EVERY`th (or at once: `HDEL lengths registry`)."""

    version: str | None = None
    ids: list[str] = field(default_factory=list)
    records: dict[str, str] = field(default_factory=dict)  # worker id -> its record's text
    reads_since_full: int = 0


@dataclass
class KnownRecords:
    """What a reader of the pool read last of each cell (`snapshot(known=...)`), kept between its reads,
    and what the last read's lengths index showed beyond the workers' own lists: the jobs in each
    cell's shared queues, and the workers holding jobs in a cell other than their own."""

    cells: dict[int, KnownCell] = field(default_factory=dict)
    shared_queued: dict[tuple[int, str], int] = field(default_factory=dict)  # (cell, model) -> jobs
    held_abroad: set[tuple[int, str]] = field(default_factory=set)  # (cell, worker id)


FULL_READ_EVERY = 20


async def snapshot(redis: RedisClient, known: KnownRecords | None = None) -> list[WorkerState]:
    """Every registered worker with its state, load and queue length, sorted by id, read cell by cell.

    Per cell, one round trip for the lengths of every non-empty list (`keys.list_lengths(cell)`, which
    also holds the cell's registry version), one for the ids, then one per `SNAPSHOT_CHUNK` workers for
    their records and heartbeats: plain reads, a few microseconds of Redis a worker, where reading its
    eleven lists in a script cost about eight. With `known`, and the version where `known` read it,
    the ids and records come from `known` and only the heartbeats are read, which at 10,000 workers
    costs Redis less than half as much (docs/scaling.md); every `FULL_READ_EVERY`th read is full all
    the same. A worker's jobs held in a cell other than its own count with the rest it holds."""
    queued: dict[str, int] = {}
    held: dict[str, int] = {}
    read: list[tuple[int, list[str], list[str | None], list[str | None]]] = []
    shared_queued: dict[tuple[int, str], int] = {}
    held_abroad: set[tuple[int, str]] = set()
    for cell in keys.cells():
        known_cell = None if known is None else known.cells.setdefault(cell, KnownCell())
        lengths = await redis.hgetall(keys.list_lengths(cell))
        _count_lists(lengths, cell, queued, held, shared_queued, held_abroad)
        version = lengths.get(keys.REGISTRY_VERSION)
        read.append((cell, *await _read_cell(redis, cell, None if version is None else str(version), known_cell)))
    states: list[WorkerState] = []
    records: dict[str, WorkerRecord] = {}
    for _, ids, record_texts, heartbeat_texts in read:
        for worker_id, record_raw, heartbeat_raw in zip(ids, record_texts, heartbeat_texts, strict=True):
            state = _state(worker_id, record_raw, heartbeat_raw, queued.get(worker_id, 0), held.get(worker_id, 0),
                           records=records)  # fmt: skip
            if state is not None:
                states.append(state)
    if len(read) > 1:
        states.sort(key=lambda state: state.worker_id)
    if known is not None:
        known.shared_queued, known.held_abroad = shared_queued, held_abroad
    _records_parsed.clear()  # only the records of this read are kept: the cache is never larger than the pool
    _records_parsed.update(records)
    return states


def _count_lists(
    lengths: Mapping[Any, Any], cell: int, queued: dict[str, int], held: dict[str, int],
    shared_queued: dict[tuple[int, str], int], held_abroad: set[tuple[int, str]],
) -> None:  # fmt: skip
    """Add the jobs in a cell's lists (its `lengths` index) to each worker's count, queued or held, and to
    its shared queues' (by model); note the workers of other cells that hold jobs here."""
    for list_key, length in lengths.items():
        if (owner := keys.worker_list_of(str(list_key), cell)) is not None:
            worker_id, is_held = owner
            counts = held if is_held else queued
            counts[worker_id] = counts.get(worker_id, 0) + int(length)
            if is_held and keys.cell_of(worker_id) != cell:
                held_abroad.add((cell, worker_id))
        elif (model := keys.shared_list_of(str(list_key), cell)) is not None:
            shared_queued[(cell, model)] = shared_queued.get((cell, model), 0) + int(length)


async def _read_cell(
    redis: RedisClient, cell: int, version: str | None, known: KnownCell | None
) -> tuple[list[str], list[str | None], list[str | None]]:
    """The ids of the cell's workers, sorted, with their records' and heartbeats' texts (`snapshot`).
    `version`: the cell's registry version now (None in a pool written before the version was: every
    read full)."""
    full = known is None or version is None or version != known.version or known.reads_since_full + 1 >= FULL_READ_EVERY
    if full:
        # Only the cell's own: a pool on a cluster from before its twelve cells left every worker's id in
        # cell 0's `workers` (docs/operations.md), and one read names keys of one cell only.
        members = map(str, await redis.smembers(keys.workers(cell)))
        ids = sorted(worker_id for worker_id in members if keys.cell_of(worker_id) == cell)
    else:
        ids = known.ids  # type: ignore[union-attr]  # not full: `known` is given
    record_texts: list[str | None] = []
    heartbeat_texts: list[str | None] = []
    for start in range(0, len(ids), SNAPSHOT_CHUNK):
        chunk = ids[start : start + SNAPSHOT_CHUNK]
        beats = [keys.heartbeat_key(worker_id) for worker_id in chunk]
        if full:
            async with redis.pipeline(transaction=False) as pipe:
                # By name: redis-py's cluster pipeline refuses `mget`, though one cell's keys are in one slot.
                pipe.execute_command("MGET", *(keys.worker_key(worker_id) for worker_id in chunk))
                pipe.execute_command("MGET", *beats)
                chunk_records, chunk_beats = await pipe.execute()
        else:
            chunk_records, chunk_beats = [known.records.get(w) for w in chunk], await redis.mget(beats)  # type: ignore[union-attr]
        record_texts += chunk_records
        heartbeat_texts += chunk_beats
    if known is not None:
        known.reads_since_full = 0 if full else known.reads_since_full + 1
        known.version, known.ids = version, ids
        known.records = {worker_id: text for worker_id, text in zip(ids, record_texts, strict=True) if text}
    return ids, record_texts, heartbeat_texts


async def with_telemetry(redis: RedisClient, workers: Sequence[WorkerState]) -> list[WorkerState]:
    """`workers` (rows of `snapshot`) with the telemetry of their heartbeats, which `snapshot` leaves
    out; read in steps of `SNAPSHOT_CHUNK`, for the listings that show it. Each row's `registered_at`
    is read again with it, so that the two always belong to one run of the worker (`/metrics` tells a
    restart by it, and the snapshot may be seconds old). A dead worker has no telemetry, and neither
    has one whose record or heartbeat is gone since, or whose telemetry cannot be read."""
    filled: list[WorkerState] = []
    records: dict[str, WorkerRecord] = {}
    for start in range(0, len(workers), SNAPSHOT_CHUNK):
        chunk = workers[start : start + SNAPSHOT_CHUNK]
        by_cell: dict[int, list[int]] = {}  # one MGET names keys of one cell only
        for at, worker in enumerate(chunk):
            by_cell.setdefault(keys.cell_of(worker.worker_id), []).append(at)
        record_texts: list[str | None] = [None] * len(chunk)
        heartbeat_texts: list[str | None] = [None] * len(chunk)
        async with redis.pipeline(transaction=False) as pipe:
            for places in by_cell.values():
                pipe.execute_command("MGET", *(keys.worker_key(chunk[at].worker_id) for at in places))  # as above
                pipe.execute_command("MGET", *(keys.heartbeat_key(chunk[at].worker_id) for at in places))
            replies = await pipe.execute()
        for places, cell_records, cell_beats in zip(by_cell.values(), replies[::2], replies[1::2], strict=True):
            for at, record_raw, heartbeat_raw in zip(places, cell_records, cell_beats, strict=True):
                record_texts[at], heartbeat_texts[at] = record_raw, heartbeat_raw
        for worker, record_raw, heartbeat_raw in zip(chunk, record_texts, heartbeat_texts, strict=True):
            filled.append(_with_telemetry(worker, record_raw, heartbeat_raw, records))
    return filled


def _with_telemetry(
    worker: WorkerState, record_raw: str | None, heartbeat_raw: str | None, records: dict[str, WorkerRecord]
) -> WorkerState:
    if worker.state == "dead" or not record_raw or not heartbeat_raw:
        return worker
    record = _record(worker.worker_id, record_raw, records)
    telemetry = _telemetry(worker.worker_id, heartbeat_raw)
    if record is None or telemetry is None:
        return worker
    return worker.model_copy(update={"telemetry": telemetry, "registered_at": record.registered_at})


class _TelemetryOnly(BaseModel):
    """A heartbeat's telemetry alone: a field this coordinator does not know (a newer worker's) is let be."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    telemetry: Telemetry | None = None


def _telemetry(worker_id: str, raw: str) -> Telemetry | None:
    try:
        return _TelemetryOnly.model_validate_json(raw).telemetry
    except ValidationError as e:
        log.warning("worker %s: unreadable telemetry, left out: %s", worker_id, e.errors()[:1])
        return None


def _state(
    worker_id: str, record_raw: str | None, heartbeat_raw: str | None, queue_length: int, held: int, *,
    records: dict[str, WorkerRecord],
) -> WorkerState | None:  # fmt: skip
    """One worker's row of the snapshot (its parsed record kept in `records`); None for an id whose
    record is gone (it left meanwhile)."""
    if not record_raw:
        return None
    record = _record(worker_id, record_raw, records)
    if record is None:  # still listed, dead: the reaper hands on whatever its lists hold
        record = WorkerRecord(worker_id=worker_id, models=[], backend="", slots=1, hardware=Hardware(),
                              registered_at=0.0)  # fmt: skip
        heartbeat_raw = None
    heartbeat = _read(BeatLoad, worker_id, heartbeat_raw) if heartbeat_raw else None
    # Every part was validated as it was read. A copy of a model made once costs a third of
    # `model_construct`'s work, which a read of a pool of thousands does for every worker.
    return _ROW.model_copy(update=dict(
        worker_id=worker_id,
        models=record.models,
        backend=record.backend,
        slots=record.slots,
        hardware=record.hardware,
        state=heartbeat.condition if heartbeat else "dead",
        state_reason=heartbeat.reason if heartbeat else None,
        jobs_in_flight=heartbeat.jobs_in_flight if heartbeat else 0,
        queue_length=queue_length,
        last_heartbeat_at=heartbeat.at if heartbeat else None,
        registered_at=record.registered_at,
        jobs_held=held,
        tokens_per_s=heartbeat.tokens_per_s if heartbeat else None,
        can_pull=record.can_pull,
        swarm=record.swarm,
        group=record.group,
    ))  # fmt: skip


_ROW = WorkerState(worker_id="-", models=[], backend="", slots=1, hardware=Hardware(), state="dead", jobs_in_flight=0,
                   queue_length=0, last_heartbeat_at=None, registered_at=0.0)  # fmt: skip


def _record(worker_id: str, raw: str, records: dict[str, WorkerRecord]) -> WorkerRecord | None:
    """The worker's registration, parsed once per text (and added to `records`): records change only
    when a worker registers or its models or group change, while a large pool's snapshot reads
    thousands of them each time."""
    record = _records_parsed.get(raw) or _read(WorkerRecord, worker_id, raw)
    if record is not None:
        records[raw] = record
    return record


_records_parsed: dict[str, WorkerRecord] = {}  # the records of the last snapshot, by their text


def _read(model: type[M], worker_id: str, raw: str) -> M | None:
    """The stored record or heartbeat; None (the worker counts as dead) when it cannot be read, so
    one bad entry never breaks every reader of the pool."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        log.warning("worker %s: unreadable %s, taken as dead: %s", worker_id, model.__name__, e.errors()[:1])
        return None
