"""Admin routes (an admin key): API keys, and draining or removing workers."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response

from gputorrent import auth, keys, registry
from gputorrent.coordinator.deps import RedisDep
from gputorrent.coordinator.security import AdminDep
from gputorrent.errors import Conflict, NotFound
from gputorrent.protocol import ApiKeyInfo, ApiKeyRequest, CreatedApiKey, WorkerState

log = logging.getLogger(__name__)
router = APIRouter(prefix="/admin", tags=["admin"])

DRAIN_REQUEST_TTL_S = 3600  # a drain asked of a worker that never beats again lapses


@router.post("/keys", status_code=201, response_model=CreatedApiKey)
async def create_key(body: ApiKeyRequest, redis: RedisDep, caller: AdminDep) -> CreatedApiKey:
    """A new API key; the answer is the only place the key itself ever appears."""
    info, key = await auth.create_key(redis, body.name, body.scope)
    log.info("API key %s (%s) created by key %s", info.key_id, info.scope, caller.key_id)
    return CreatedApiKey(key=key, info=info)


@router.get("/keys", response_model=list[ApiKeyInfo])
async def list_keys(redis: RedisDep, caller: AdminDep) -> list[ApiKeyInfo]:
    """Every key: id, name, scope, creation time; never a secret."""
    return await auth.list_keys(redis)


@router.delete("/keys/{key_id}", status_code=204, responses={404: {"description": "no such key"}})
async def revoke_key(key_id: str, request: Request, redis: RedisDep, caller: AdminDep) -> Response:
    """Revoke a key: every coordinator refuses it from the next request on."""
    if not await auth.revoke_key(redis, key_id):
        raise NotFound(f"no API key with id {key_id!r}")
    # This coordinator's own cache drops it now, not when its listener hears the announcement: a
    # request that follows the 204 at once may come before that.
    request.app.state.key_cache.revoked(key_id)
    log.info("API key %s revoked by key %s", key_id, caller.key_id)
    return Response(status_code=204)


@router.post(
    "/workers/{worker_id}/drain", status_code=202, response_model=WorkerState,
    responses={404: {"description": "no such worker"}},
)  # fmt: skip
async def drain_worker(worker_id: str, redis: RedisDep, caller: AdminDep) -> WorkerState:
    """Ask a worker to drain and stop, as SIGTERM would: it takes no new job, hands its queue on,
    finishes what it runs (within its drain grace period) and leaves. It hears it at its next heartbeat."""
    worker = await _worker(redis, worker_id)
    await redis.set(keys.drain_key(worker_id), caller.key_id, ex=DRAIN_REQUEST_TTL_S)
    log.info("worker %s asked to drain by key %s", worker_id, caller.key_id)
    [shown] = await registry.with_telemetry(redis, [worker])  # its row as `/workers` shows it
    return shown


@router.delete(
    "/workers/{worker_id}", status_code=204,
    responses={404: {"description": "no such worker"}, 409: {"description": "it is alive, or still holds jobs"}},
)  # fmt: skip
async def remove_worker(worker_id: str, redis: RedisDep, caller: AdminDep) -> Response:
    """Remove a dead worker from the registry (a live one is drained or revoked first)."""
    worker = await _worker(redis, worker_id)
    if worker.state != "dead":
        raise Conflict(
            f"worker {worker_id!r} is {worker.state}; drain it first (POST /admin/workers/{{id}}/drain), "
            "or revoke it (POST /admin/workers/{id}/revoke)"
        )
    if not await registry.deregister(redis, worker_id):
        raise Conflict(f"worker {worker_id!r} still holds jobs; the reaper is handing them on, try again shortly")
    await redis.delete(keys.worker_secret_key(worker_id))
    log.info("worker %s removed by key %s", worker_id, caller.key_id)
    return Response(status_code=204)


@router.post(
    "/workers/{worker_id}/revoke", status_code=204, response_class=Response,
    responses={404: {"description": "no such worker"}},
)  # fmt: skip
async def revoke_worker(worker_id: str, redis: RedisDep, caller: AdminDep) -> None:
    """Revoke a worker whatever its state, without its cooperation (unlike a drain): its secret is
    deleted, so every later call it makes to `/worker` is a 401, and it is dead from now on, so the
    reaper hands its queued and held jobs to other workers. It stays listed (dead) until removed
    with `DELETE /admin/workers/{id}`. A worker linked to Redis keeps its Redis credentials: change them."""
    await _worker(redis, worker_id)
    # The secret first: a beat that passed its check before this is then not written (leases.beat).
    await redis.delete(keys.worker_secret_key(worker_id))
    await registry.mark_gone(redis, worker_id)
    log.warning("worker %s revoked by key %s", worker_id, caller.key_id)


async def _worker(redis: RedisDep, worker_id: str) -> WorkerState:
    for worker in await registry.snapshot(redis):
        if worker.worker_id == worker_id:
            return worker
    raise NotFound(f"no worker with id {worker_id!r}")
