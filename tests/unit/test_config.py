import pytest

from gputorrent.config import CoordinatorSettings, WorkerSettings

SEED_VARIABLES = ["REDIS_HOST", "REDIS_PORT", "REDIS_URL", "COORDINATOR_URL", "MODEL_NAME", "HF_TOKEN"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [*SEED_VARIABLES, "GPUTORRENT_BACKEND", "OLLAMA_HOST"]:
        monkeypatch.delenv(name, raising=False)


def test_seed_defaults() -> None:
    coordinator = CoordinatorSettings()
    assert (coordinator.redis_host, coordinator.redis_port) == ("localhost", 6379)
    assert coordinator.redis_url == "redis://localhost:6379"
    worker = WorkerSettings()
    assert worker.coordinator_url == "http://localhost:8000"
    assert worker.redis_url == "redis://localhost:6379"
    assert worker.backend == "ollama"
    assert worker.model == "llama3.2"
    assert worker.hf_token is None
    assert worker.result_ttl_s == 3600


def test_seed_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_HOST", "redis.lan")
    monkeypatch.setenv("REDIS_PORT", "6380")
    monkeypatch.setenv("COORDINATOR_URL", "http://coord:9000")
    monkeypatch.setenv("MODEL_NAME", "qwen3")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert CoordinatorSettings().redis_url == "redis://redis.lan:6380"
    worker = WorkerSettings()
    assert (worker.coordinator_url, worker.model) == ("http://coord:9000", "qwen3")
    assert worker.hf_token is not None and worker.hf_token.get_secret_value() == "hf_secret"
    assert "hf_secret" not in repr(worker)


def test_redis_url_wins_over_host_and_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_HOST", "ignored")
    monkeypatch.setenv("REDIS_URL", "rediss://user:pw@redis.lan:6390/2")
    assert CoordinatorSettings().redis_url == "rediss://user:pw@redis.lan:6390/2"


def test_flags_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_NAME", "from-env")
    assert WorkerSettings(model_name="from-flag").model == "from-flag"


def test_model_default_follows_the_backend() -> None:
    assert WorkerSettings(backend="llamacpp").model == "gemma3:270m"
    assert WorkerSettings(backend="openai").model is None


def test_ollama_host_accepts_ollamas_own_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_HOST", "gpu-box")
    assert WorkerSettings().ollama_host == "http://gpu-box:11434"


def test_bare_field_names_in_the_environment_are_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOST", "0.0.0.0")  # set by many shells and containers; must not expose the coordinator
    monkeypatch.setenv("PORT", "1234")
    monkeypatch.setenv("BACKEND", "fake")
    coordinator = CoordinatorSettings()
    assert (coordinator.host, coordinator.port) == ("127.0.0.1", 8000)
    assert WorkerSettings().backend == "ollama"


def test_replica_wait_defaults_to_auto_with_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    for settings in (CoordinatorSettings(), WorkerSettings()):
        assert (settings.wait_replicas, settings.wait_timeout_ms) == ("auto", 500)
    monkeypatch.setenv("GPUTORRENT_WAIT_REPLICAS", " 2 ")
    monkeypatch.setenv("GPUTORRENT_WAIT_TIMEOUT_MS", "50")
    assert (WorkerSettings().wait_replicas, WorkerSettings().wait_timeout_ms) == (2, 50)
    monkeypatch.setenv("GPUTORRENT_WAIT_REPLICAS", "AUTO")
    assert CoordinatorSettings().wait_replicas == "auto"


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("GPUTORRENT_WAIT_REPLICAS", "two", "must be 'auto' or a whole number of replicas from 0, not 'two'"),
        ("GPUTORRENT_WAIT_REPLICAS", "-1", "not '-1'"),
        ("GPUTORRENT_WAIT_REPLICAS", "", "not ''"),
        ("GPUTORRENT_WAIT_TIMEOUT_MS", "0", "greater than or equal to 1"),  # WAIT's 0 would wait for ever
        ("GPUTORRENT_WAIT_TIMEOUT_MS", "soon", "valid integer"),
    ],
)
def test_a_bad_replica_wait_setting_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, says: str
) -> None:
    monkeypatch.setenv(variable, value)
    for settings_class in (CoordinatorSettings, WorkerSettings):
        with pytest.raises(ValueError, match=variable) as refused:
            settings_class()
        assert says in str(refused.value)
