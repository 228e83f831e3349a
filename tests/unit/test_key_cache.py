"""The coordinator's key cache: kept only while revocations are heard, and never a record read across one."""

from __future__ import annotations

import pytest

from gputorrent import auth
from gputorrent.protocol import ApiKeyInfo

INFO = ApiKeyInfo(key_id="0123456789ab", name="laptop", scope="client", created_at=1.0)
HASHED = auth.hash_secret("the secret")


def _listening() -> auth.KeyCache:
    cache = auth.KeyCache()
    cache.subscribed()
    return cache


def test_a_verified_key_is_kept_and_a_revoked_one_dropped() -> None:
    cache = _listening()
    cache.put(INFO, HASHED, cache.generation)
    assert cache.get(INFO.key_id, HASHED) == INFO
    assert cache.get(INFO.key_id, auth.hash_secret("another secret")) is None  # a wrong secret is no hit
    cache.put(INFO, HASHED, cache.generation)
    cache.revoked(INFO.key_id)
    assert cache.get(INFO.key_id, HASHED) is None


def test_a_record_read_while_a_revocation_was_heard_is_not_kept() -> None:
    cache = _listening()
    before_the_read = cache.generation
    cache.revoked("fedcba987654")  # heard while the record was on its way: it may be the one revoked
    cache.put(INFO, HASHED, before_the_read)
    assert cache.get(INFO.key_id, HASHED) is None


def test_nothing_is_kept_while_revocations_may_be_missed() -> None:
    cache = auth.KeyCache()  # not subscribed yet
    cache.put(INFO, HASHED, cache.generation)
    assert cache.get(INFO.key_id, HASHED) is None
    cache.subscribed()
    cache.put(INFO, HASHED, cache.generation)
    cache.lost()  # the listener lost Redis: everything kept goes
    assert cache.get(INFO.key_id, HASHED) is None
    cache.put(INFO, HASHED, cache.generation)
    assert cache.get(INFO.key_id, HASHED) is None


def test_an_entry_lives_at_most_its_max_age(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = _listening()
    monkeypatch.setattr(auth.KeyCache, "MAX_AGE_S", -1.0)
    cache.put(INFO, HASHED, cache.generation)
    assert cache.get(INFO.key_id, HASHED) is None
