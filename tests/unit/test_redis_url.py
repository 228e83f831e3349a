"""Redis URLs: a Sentinel URL's parts, and clear errors (without the password) for bad ones."""

from __future__ import annotations

import pytest

from gputorrent.redis_client import (
    ClusterTarget,
    RedisUrlError,
    SentinelTarget,
    check_url,
    is_cluster_url,
    is_sentinel_url,
    parse_cluster_url,
    parse_sentinel_url,
    redacted_url,
)


def test_a_sentinel_url_names_the_sentinels_the_primary_and_the_database() -> None:
    target = parse_sentinel_url("redis+sentinel://s1.lan:26380,s2.lan,[::1]:26381/pool/3")
    assert target == SentinelTarget(
        sentinels=(("s1.lan", 26380), ("s2.lan", 26379), ("::1", 26381)), master_name="pool", db=3
    )
    assert not target.tls and not target.sentinel_tls


def test_the_user_part_is_the_redis_servers_credentials_and_the_sentinels_have_their_own() -> None:
    target = parse_sentinel_url(
        "redis+sentinel://gputorrent:p%40ss@s1/pool?sentinel_password=spw&sentinel_username=sen"
    )
    assert (target.username, target.password) == ("gputorrent", "p@ss")
    assert (target.sentinel_username, target.sentinel_password) == ("sen", "spw")
    assert target.server_kwargs()["password"] == "p@ss"
    assert target.sentinel_kwargs() == {"username": "sen", "password": "spw"}


def test_credentials_and_the_database_may_be_query_parameters() -> None:
    target = parse_sentinel_url("redis+sentinel://s1/pool?username=u&password=pw&db=5")
    assert (target.username, target.password, target.db) == ("u", "pw", 5)
    assert parse_sentinel_url("redis+sentinel://:pw@s1/pool").username is None


def test_rediss_sentinel_uses_tls_for_the_servers_and_the_sentinels_unless_told_otherwise() -> None:
    target = parse_sentinel_url("rediss+sentinel://s1/pool?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required")
    assert target.tls and target.sentinel_tls
    assert target.server_kwargs()["ssl"] is True
    assert target.server_kwargs()["ssl_ca_certs"] == "/ca.pem"
    assert target.sentinel_kwargs()["ssl_ca_certs"] == "/ca.pem"
    plain_sentinels = parse_sentinel_url("rediss+sentinel://s1/pool?sentinel_tls=false")
    assert plain_sentinels.tls and not plain_sentinels.sentinel_tls
    assert "ssl" not in plain_sentinels.sentinel_kwargs()


@pytest.mark.parametrize(
    ("url", "names"),
    [
        ("redis+sentinel://s1:26379", "primary's name is missing"),
        ("redis+sentinel://s1:26379/", "primary's name is missing"),
        ("redis+sentinel://s1?db=1", "primary's name is missing"),
        ("redis+sentinel://s1:port/pool", "port of Sentinel address 's1:port'"),
        ("redis+sentinel://s1:70000/pool", "port of Sentinel address 's1:70000'"),
        ("redis+sentinel://s1,,s2/pool", "Sentinel address is empty"),
        ("redis+sentinel://:26379/pool", "has no host"),
        ("redis+sentinel://[::1/pool", "is not [IPV6]:PORT"),
        ("redis+sentinel://s1/pool/x", "database must be a number, not 'x'"),
        ("redis+sentinel://s1/pool/1/2", "/MASTER_NAME or /MASTER_NAME/DB"),
        ("redis+sentinel://s1/pool/1?db=2", "database is given twice"),
        ("redis+sentinel://s1/pool?pasword=x", "unknown query parameter 'pasword'"),
        ("redis+sentinel://s1/pool?db=1&db=2", "'db' is given twice"),
        ("redis+sentinel://u:pw@s1/pool?password=pw2", "credentials are given twice"),
        ("redis+sentinel://s1/pool?ssl_ca_certs=/ca.pem", "use rediss+sentinel:// for TLS"),
        ("rediss+sentinel://s1/pool?ssl_cert_reqs=maybe", "ssl_cert_reqs must be one of"),
        ("rediss+sentinel://s1/pool?sentinel_tls=perhaps", "sentinel_tls must be true or false"),
    ],
)
def test_a_bad_sentinel_url_is_refused_naming_what_is_wrong(url: str, names: str) -> None:
    with pytest.raises(RedisUrlError, match="Redis Sentinel URL") as caught:
        check_url(url)
    assert names in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://user:hunter2@s1:x/pool",
        "redis+sentinel://s1/pool?password=hunter2&bogus=1",
        "redis+sentinel://s1/pool?sentinel_password=hunter2&db=x",
        "redis+cluster://user:hunter2@n1:x",
        "http://:hunter2@redis.lan:6379",
    ],
)
def test_no_error_message_shows_a_password(url: str) -> None:
    with pytest.raises(RedisUrlError) as caught:
        check_url(url)
    assert "hunter2" not in str(caught.value)
    assert "***" in str(caught.value)


def test_a_cluster_url_names_seed_nodes_with_the_redis_port_by_default() -> None:
    target = parse_cluster_url("redis+cluster://n1.lan:7000,n2.lan,[::1]:7001/")
    assert target == ClusterTarget(seeds=(("n1.lan", 7000), ("n2.lan", 6379), ("::1", 7001)))
    assert parse_cluster_url("redis+cluster://n1") == ClusterTarget(seeds=(("n1", 6379),))
    with_login = parse_cluster_url("redis+cluster://gputorrent:p%40ss@n1,n2:7000")
    assert (with_login.username, with_login.password) == ("gputorrent", "p@ss")
    assert parse_cluster_url("redis+cluster://n1?password=pw").password == "pw"
    assert parse_cluster_url("redis+cluster://n1/?username=u&password=pw").username == "u"
    tls = parse_cluster_url("rediss+cluster://n1:7000/?ssl_ca_certs=/ca.pem")
    assert tls.tls and tls.server_kwargs()["ssl"] is True and tls.server_kwargs()["ssl_ca_certs"] == "/ca.pem"
    assert is_cluster_url("REDIS+CLUSTER://n1") and not is_cluster_url("redis+sentinel://s1/pool")


@pytest.mark.parametrize(
    ("url", "names"),
    [
        ("redis+cluster://n1/0", "a cluster has one database"),
        ("redis+cluster://n1:port", "port of node address 'n1:port'"),
        ("redis+cluster://n1,,n2", "node address is empty"),
        ("redis+cluster://n1/?db=1", "unknown query parameter 'db'"),
        ("redis+cluster://n1/?sentinel_password=x", "unknown query parameter 'sentinel_password'"),
        ("redis+cluster://u:pw@n1/?password=pw2", "credentials are given twice"),
        ("redis+cluster://n1/?ssl_ca_certs=/ca.pem", "use rediss+cluster:// for TLS"),
    ],
)
def test_a_bad_cluster_url_is_refused_naming_what_is_wrong(url: str, names: str) -> None:
    with pytest.raises(RedisUrlError, match="Redis Cluster URL") as caught:
        check_url(url)
    assert names in str(caught.value)
    assert "pw" not in str(caught.value).replace("***", "")


def test_plain_urls_are_left_to_redis_py_unchanged() -> None:
    for url in ("redis://localhost:6379", "redis://:pw@h:1/2", "rediss://h:6380/0?ssl_cert_reqs=none", "unix:///s"):
        check_url(url)
        assert not is_sentinel_url(url)
    assert is_sentinel_url("REDIS+SENTINEL://s1/pool")


def test_redacted_url_masks_user_part_and_password_parameters() -> None:
    url = "rediss+sentinel://u:a%3Ab@s1,s2/pool?password=x&sentinel_password=y&db=1"
    assert redacted_url(url) == "rediss+sentinel://u:***@s1,s2/pool?password=***&sentinel_password=***&db=1"
    assert redacted_url("redis://h:6379/0") == "redis://h:6379/0"
