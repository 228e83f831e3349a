"""The swarm's routes: the catalogue of model files, and who fetches them from whom (gputorrent/catalogue.py)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from gputorrent import catalogue
from gputorrent.coordinator.deps import RedisDep
from gputorrent.coordinator.security import AdminDep, JoinDep, require_client
from gputorrent.coordinator.snapshot import current_pool
from gputorrent.errors import ModelNotFound
from gputorrent.protocol import SwarmFetch, SwarmMembers, SwarmProgress, SwarmSource

log = logging.getLogger(__name__)
router = APIRouter(tags=["swarm"])


class CatalogueEntry(BaseModel):
    """One model of `GET /swarm/catalogue`: its file, and the live workers that seed it."""

    model: str
    file: str
    size: int
    sha256: str
    holders: list[str]  # worker ids


@router.get("/swarm/catalogue", response_model=list[CatalogueEntry], dependencies=[Depends(require_client)])
async def list_catalogue(redis: RedisDep) -> list[CatalogueEntry]:
    """The pool's model files: a llama.cpp worker started with one of these names (or sent a pull of
    it) fetches it from the workers that hold it."""
    files, workers = await catalogue.entries(redis), await current_pool(redis)
    return [
        CatalogueEntry(
            model=model,
            file=f.name,
            size=f.size,
            sha256=f.sha256,
            holders=[w.worker_id for w in catalogue.holders(model, workers)],
        )
        for model, f in files.items()
    ]


@router.delete(
    "/swarm/catalogue/{model:path}", status_code=204, responses={404: {"description": "not in the catalogue"}}
)
async def forget_model(model: str, redis: RedisDep, caller: AdminDep) -> None:
    """Free a model name (admin key): the catalogue forgets its file. Workers that hold it keep it, and
    one that registers with it publishes it again; stop them first to give the name to another file."""
    if not await catalogue.forget(redis, model):
        raise ModelNotFound(f"model {model!r} is not in the pool's catalogue", field="model")
    log.warning("swarm: %s removed from the catalogue", model)


@router.post("/swarm/fetch", response_model=SwarmSource, responses={404: {"description": "not in the catalogue"}})
async def announce_fetch(body: SwarmFetch, redis: RedisDep, caller: JoinDep) -> SwarmSource:
    """A worker (with a join key) is about to fetch a model: the answer gives the file to check it
    against and the workers to fetch it from, and the holders let the fetcher's address in."""
    source = await catalogue.announce_fetch(redis, body.model, body.peer, await current_pool(redis))
    if source is None:
        raise ModelNotFound(
            f"model {body.model!r} is not in the pool's catalogue: no llama.cpp worker has published its file",
            field="model",
        )
    log.info("swarm: %s:%d fetches %s from %d holders", body.peer.address, body.peer.port, body.model,
             len(source.holders))  # fmt: skip
    return source


@router.post("/swarm/fetched", status_code=204)
async def fetch_ended(body: SwarmFetch, redis: RedisDep, caller: JoinDep) -> None:
    """The fetch announced with this body ended: the holders need not connect to it any more."""
    await catalogue.fetch_done(redis, body.model, body.peer)


@router.post("/swarm/progress", response_model=SwarmMembers)
async def fetch_progress(body: SwarmProgress, redis: RedisDep, caller: JoinDep) -> SwarmMembers:
    """How a fetch goes (the dashboard shows it); the answer is the members, as `GET /swarm/members`'s."""
    return await catalogue.report(redis, body, await current_pool(redis))


@router.get("/swarm/members", response_model=SwarmMembers)
async def swarm_members(redis: RedisDep, caller: JoinDep) -> SwarmMembers:
    """The addresses a worker's swarm accepts (live workers', and fetches under way), and the fetches."""
    return await catalogue.members(redis, await current_pool(redis))
