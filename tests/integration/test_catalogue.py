"""The swarm's routes in process (gputorrent/catalogue.py, coordinator/routes/swarm.py): the catalogue a
registration publishes, who may ask for it, the members and the transfers, and bad input."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import httpx
from redis.asyncio import Redis

from gputorrent import auth, keys

PEER = {"address": "10.1.2.3", "port": 6881}


def _file(content: bytes, name: str = "m.gguf") -> dict[str, Any]:
    # The catalogue checks names, sizes and hashes; the torrent is opaque to it (workers read it).
    return {"name": name, "size": len(content), "sha256": hashlib.sha256(content).hexdigest(),
            "torrent": base64.b64encode(b"d4:infode").decode()}  # fmt: skip


def _registration(worker_id: str, model: str, file: dict[str, Any], peer: dict[str, Any] = PEER) -> dict[str, Any]:
    return {"worker_id": worker_id, "models": [model], "backend": "llamacpp", "swarm": peer, "files": {model: file}}


async def test_a_registration_publishes_its_files_and_the_first_file_of_a_name_stays_its_file(
    api: httpx.AsyncClient,
) -> None:
    first = await api.post("/register", json=_registration("w1", "m", _file(b"one")))
    assert first.status_code == 200, first.text
    same = await api.post("/register", json=_registration("w2", "m", _file(b"one"), {"address": "10.1.2.4", "port": 1}))
    assert same.status_code == 200, same.text
    other = await api.post("/register", json=_registration("w3", "m", _file(b"two")))
    assert other.status_code == 409
    error = other.json()["error"]
    assert error["field"] == "files.m.sha256" and "serve this file under another model name" in error["message"]
    assert "w3" not in {w["worker_id"] for w in (await api.get("/workers")).json()}  # refused whole

    [entry] = (await api.get("/swarm/catalogue")).json()
    assert entry == {"model": "m", "file": "m.gguf", "size": 3, "sha256": _file(b"one")["sha256"],
                     "holders": ["w1", "w2"]}  # fmt: skip


async def test_a_fetch_is_told_the_holders_and_members_and_the_holders_learn_of_it(
    api: httpx.AsyncClient, redis: Redis
) -> None:
    assert (await api.post("/register", json=_registration("w1", "m", _file(b"one")))).status_code == 200
    epoch = int(await redis.get(keys.swarm_epoch()) or 0)
    fetcher = {"address": "10.9.9.9", "port": 7000}
    source = await api.post("/swarm/fetch", json={"model": "m", "peer": fetcher})
    assert source.status_code == 200, source.text
    body = source.json()
    assert (body["holders"], body["fetching"]) == ([PEER], [])
    assert body["members"] == ["10.1.2.3", "10.9.9.9"] and body["file"]["sha256"] == _file(b"one")["sha256"]
    assert int(await redis.get(keys.swarm_epoch()) or 0) > epoch  # the holders' next beat reads the members

    members = (await api.get("/swarm/members")).json()
    assert members == {"members": ["10.1.2.3", "10.9.9.9"], "fetching": {"m": [fetcher]}}
    progress = {"model": "m", "peer": fetcher, "done_bytes": 1, "total_bytes": 3, "rate_bps": 10.0, "peers": 1}
    assert (await api.post("/swarm/progress", json=progress)).json() == members
    [transfer] = (await api.get("/pool")).json()["transfers"]
    assert (transfer["model"], transfer["done_bytes"], transfer["paused"]) == ("m", 1, False)

    assert (await api.post("/swarm/fetched", json={"model": "m", "peer": fetcher})).status_code == 204
    assert (await api.get("/swarm/members")).json() == {"members": ["10.1.2.3"], "fetching": {}}
    assert (await api.get("/pool")).json()["transfers"] == []
    # A report that was on its way as the fetch ended lands after it, and shows nothing.
    late = await api.post("/swarm/progress", json={**progress, "done_bytes": 2})
    assert late.status_code == 200, late.text
    assert (await api.get("/pool")).json()["transfers"] == []
    assert (await api.get("/swarm/members")).json() == {"members": ["10.1.2.3"], "fetching": {}}


async def test_bad_swarm_input_is_a_4xx_naming_the_field(api: httpx.AsyncClient) -> None:
    missing = await api.post("/swarm/fetch", json={"model": "nowhere", "peer": PEER})
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "model_not_found")
    assert missing.json()["error"]["field"] == "model"
    cases = [
        ("/swarm/fetch", {"model": "m", "peer": {"address": "example.com", "port": 1}}, "peer.address"),
        ("/swarm/fetch", {"model": "m", "peer": {"address": "10.0.0.1", "port": 0}}, "peer.port"),
        (
            "/swarm/progress",
            {"model": "m", "peer": PEER, "done_bytes": -1, "total_bytes": 3, "rate_bps": 0, "peers": 0},
            "done_bytes",
        ),
        ("/register", _registration("w", "m", _file(b"x", name="../up.gguf")), "files.m.name"),
        ("/register", _registration("w", "m", {**_file(b"x"), "sha256": "00"}), "files.m.sha256"),
        ("/register", {**_registration("w", "m", _file(b"x")), "files": {"other": _file(b"x")}}, "files"),
        ("/register", {**_registration("w", "m", _file(b"x")), "swarm": None}, "files"),
    ]
    for path, body, field in cases:
        reply = await api.post(path, json=body)
        assert reply.status_code in (400, 422), (path, body, reply.text)
        assert field in {f["field"] for f in reply.json()["error"]["fields"]}, (field, reply.text)


async def test_the_swarm_routes_need_a_join_key_and_the_catalogue_a_client_key(
    api: httpx.AsyncClient, redis: Redis
) -> None:
    _, client_key = await auth.create_key(redis, "tests", "client")
    _, join_key = await auth.create_key(redis, "tests", "join")
    as_client = {"Authorization": f"Bearer {client_key}"}
    as_join = {"Authorization": f"Bearer {join_key}"}
    fetch = {"model": "m", "peer": PEER}
    assert (await api.post("/swarm/fetch", json=fetch, headers=as_client)).status_code == 403
    assert (await api.get("/swarm/members", headers=as_client)).status_code == 403
    assert (await api.post("/swarm/fetch", json=fetch, headers={"Authorization": ""})).status_code == 401
    assert (await api.get("/swarm/members", headers=as_join)).status_code == 200
    assert (await api.get("/swarm/catalogue", headers=as_join)).status_code == 403
    assert (await api.get("/swarm/catalogue", headers=as_client)).status_code == 200


async def test_an_admin_frees_a_model_name_of_the_catalogue(api: httpx.AsyncClient, redis: Redis) -> None:
    assert (await api.post("/register", json=_registration("w1", "org/m:1", _file(b"one")))).status_code == 200
    _, client_key = await auth.create_key(redis, "tests", "client")
    refused = await api.delete("/swarm/catalogue/org/m:1", headers={"Authorization": f"Bearer {client_key}"})
    assert refused.status_code == 403
    assert (await api.delete("/swarm/catalogue/org/m:1")).status_code == 204
    assert (await api.get("/swarm/catalogue")).json() == []
    gone = await api.delete("/swarm/catalogue/org/m:1")
    assert (gone.status_code, gone.json()["error"]["field"]) == (404, "model")
