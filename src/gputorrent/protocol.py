"""The wire models every part shares: requests, jobs, results and worker records.

Models that arrive from outside (requests, registrations) forbid unknown fields so a typo
is a 422 that names the field, not a silently ignored option.
"""

from __future__ import annotations

import base64
import ipaddress
import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gputorrent.telemetry import Telemetry

WORKER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
MODEL_NAME_PATTERN = r"^[^\s]{1,256}$"
REQUEST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{7,127}$"
MAX_TOKENS = 32768  # the most tokens one request may ask for
MAX_TIMEOUT_S = 86400.0  # the longest deadline a request may ask for
PRIORITY_MIN, PRIORITY_DEFAULT, PRIORITY_MAX = 0, 5, 9
SESSION_ID_PATTERN = r"^[^\s]{1,256}$"
MAX_SLOTS = 1024  # the most jobs one worker may run at once
MAX_MODELS = 256  # the most models one worker may list
MAX_JOB_TOKENS = 10**9  # beyond any prompt or generation one job can hold
MAX_DURATION_MS = 1e10  # about 115 days: longer than any job waits or runs
MAX_UNIX_TIME_S = 1e10  # the year 2286
MAX_TOKENS_PER_S = 1e7  # what a heartbeat may say at all; the coordinator trusts far less (see routes/worker.py)


def _encodable(value: str) -> str:
    # JSON may carry "\ud800" escapes that decode to lone surrogates, which no UTF-8 encoder accepts.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (a lone surrogate escape is not)") from None
    return value


Text = Annotated[str, AfterValidator(_encodable)]
"""A string that can be written back out as UTF-8: every client-supplied string is one."""


def _ip_address(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None


IPAddressText = Annotated[str, AfterValidator(_ip_address)]
"""An IPv4 or IPv6 address, written the standard way (a host name is not one)."""


# A real schema nests a few levels; a job's JSON must stay readable by every part (pydantic parses
# JSON about 200 levels deep, and writes no deeper than about 250).
FORMAT_MAX_DEPTH = 64


def _nested_deeper_than(value: object, limit: int) -> bool:
    pending: list[tuple[object, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            pending.extend((inner, depth + 1) for inner in item.values())
        elif isinstance(item, list):
            pending.extend((inner, depth + 1) for inner in item)
    return False


def _output_format(value: object) -> object:
    if value is None or value == "json":
        return value
    if not isinstance(value, dict):
        raise ValueError('expected "json" or a JSON schema (an object)')
    if _nested_deeper_than(value, FORMAT_MAX_DEPTH):
        raise ValueError(f"a JSON schema may nest at most {FORMAT_MAX_DEPTH} levels deep")
    _encodable(json.dumps(value, ensure_ascii=False))  # every string in it, keys included
    return value


OutputFormat = Annotated[Literal["json"] | dict[str, Any] | None, BeforeValidator(_output_format)]
"""`InferenceOptions.format`, checked whole so an error names the field alone (see `Text` for the encoding)."""


class WireModel(BaseModel):
    # No NaN or infinity: JSON has neither, so one would be stored as null and fail every later read.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class InferenceOptions(WireModel):
    """Sampling options; the names follow the OpenAI API."""

    max_tokens: int = Field(default=256, ge=1, le=MAX_TOKENS)
    temperature: float = Field(default=0.8, ge=0.0, le=2.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    stop: list[Text] = Field(default_factory=list, max_length=16)
    # Structured output: "json" for a JSON object, or a JSON Schema the output must match (Ollama's
    # `format`, OpenAI's `response_format`); the backend constrains generation to it. None: free text,
    # left out of a job's JSON so that workers older than this field still read every job without it.
    format: OutputFormat = Field(default=None, exclude_if=lambda value: value is None)

    @property
    def reproducible(self) -> bool:
        """Greedy (temperature 0) or seeded: the same request must give the same text on the same
        model file and build, whatever the worker ran before (docs/reliability.md)."""
        return self.temperature == 0 or self.seed is not None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: object) -> object:
        # OpenAI accepts a single string or a list; keep one shape inside.
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        return value


class ChatMessage(WireModel):
    role: Literal["system", "user", "assistant"]
    content: Text


class InferenceRequest(WireModel):
    """What a client submits to `POST /inference`: a prompt or a chat, never both."""

    model: Text = Field(pattern=MODEL_NAME_PATTERN)
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    options: InferenceOptions = Field(default_factory=InferenceOptions)
    stream: bool = False
    request_id: str | None = Field(
        default=None,
        pattern=REQUEST_ID_PATTERN,
        description="your own id for the request (8 to 128 characters): submitting it again returns the same job",
    )
    timeout_s: float | None = Field(
        default=None, gt=0, le=MAX_TIMEOUT_S, description="end the job as failed (code `timeout`) after this long"
    )
    priority: int = Field(
        default=PRIORITY_DEFAULT, ge=PRIORITY_MIN, le=PRIORITY_MAX,
        description="0 to 9: a queued job of higher priority is taken first",
    )  # fmt: skip
    session_id: Text | None = Field(
        default=None, pattern=SESSION_ID_PATTERN,
        description="requests with one session id go to one worker while it is not overloaded (its prompt cache)",
    )  # fmt: skip

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> InferenceRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of 'prompt' or 'messages' is required")
        return self


class EmbeddingRequest(WireModel):
    """Texts to embed with a model: one vector per text."""

    model: Text = Field(pattern=MODEL_NAME_PATTERN)
    input: list[Text] = Field(min_length=1, max_length=2048)
    timeout_s: float | None = Field(default=None, gt=0, le=MAX_TIMEOUT_S)
    priority: int = Field(default=PRIORITY_DEFAULT, ge=PRIORITY_MIN, le=PRIORITY_MAX)


class Job(WireModel):
    """An admitted request as it travels through `queue:{worker_id}` (or a model's shared queue): a
    generation, an embedding, or a model pull."""

    request_id: str
    worker_id: str  # empty while a shared job waits: the worker that takes it fills it in
    model: str
    # `pull`: fetch `model` onto this worker's backend (see coordinator/pulls.py); bound to its worker
    kind: Literal["generate", "embed", "pull"] = "generate"
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    input: list[str] | None = None  # the texts of an embedding job
    options: InferenceOptions = Field(default_factory=InferenceOptions)
    enqueued_at: float  # unix time, seconds
    admission_ms: float = Field(default=0.0, ge=0)  # the coordinator's time on it before the enqueue
    stream: bool = False  # the worker writes tokens to `stream:{request_id}` as they come
    attempt: int = 1  # 1 on admission; +1 each time a dead worker's job is handed to another
    deadline: float | None = None  # unix time, seconds: past it the job ends with code `timeout`
    # Set by the worker that re-runs a streamed job whose earlier attempt already sent text: the
    # backend continues after it, so the client's stream neither loses nor repeats a token.
    continuation: str | None = None
    continuation_tokens: int = 0
    priority: int = PRIORITY_DEFAULT  # the band it waits in: higher is taken first
    shared: bool = False  # queued on its model's shared queue (pull routing); handed back there, not to a worker
    insecure: bool = False  # a pull job: the registry may be reached without TLS checks (Ollama's `insecure`)


class Usage(WireModel):
    prompt_tokens: int = Field(default=0, ge=0, le=MAX_JOB_TOKENS)
    completion_tokens: int = Field(default=0, ge=0, le=MAX_JOB_TOKENS)


class Timings(WireModel):
    """Where a job's time went, in ms: admitted, queued, dispatched, run. `overhead_ms` is set by the
    coordinator that answers (see coordinator/overhead.py): everything but inference."""

    # the coordinator until it built the job: the key check, the pool snapshot, routing
    admission_ms: float = Field(default=0.0, ge=0, le=MAX_DURATION_MS)
    queued_ms: float = Field(default=0.0, ge=0, le=MAX_DURATION_MS)  # from the enqueue until a worker took it
    # the worker: from taking it until the backend started
    dispatch_ms: float = Field(default=0.0, ge=0, le=MAX_DURATION_MS)
    inference_ms: float = Field(default=0.0, ge=0, le=MAX_DURATION_MS)
    # from the start of inference to the first token (none for embeddings)
    first_token_ms: float | None = Field(default=None, ge=0, le=MAX_DURATION_MS)
    # queued, dispatching and relaying: all of the request's time but inference
    overhead_ms: float | None = Field(default=None, ge=0, le=MAX_DURATION_MS)


class ErrorInfo(WireModel):
    code: str
    message: str


class Resumed(WireModel):
    """How a streamed job that lost its worker mid-stream was finished by another."""

    after_tokens: int  # the tokens the client already had from the earlier attempt
    exact: bool  # true only when checked: the new worker's replay wrote the text sent, so the whole is one run's
    note: str


class JobResult(WireModel):
    """The finished job, stored at `result:{request_id}`."""

    request_id: str
    status: Literal["completed", "failed"]
    model: str
    worker_id: str
    output: str | None = None
    finish_reason: str | None = None
    embeddings: list[list[float]] | None = None  # an embedding job's vectors, one per input
    usage: Usage = Field(default_factory=Usage)
    timings: Timings = Field(default_factory=Timings)
    error: ErrorInfo | None = None
    resumed: Resumed | None = None  # set when another worker continued the stream after a failure


class JobStatus(WireModel):
    """What `GET /result/{request_id}` answers (202) before the result exists."""

    request_id: str
    status: Literal["queued", "running"]
    worker_id: str | None  # None while it waits on its model's shared queue (pull routing)
    model: str
    stream: bool = False  # its tokens can be followed at `GET /stream/{request_id}`
    position: int | None = None  # while queued: how many jobs will be taken before it
    eta_s: float | None = None  # while queued: about when it starts, from recent job times (None: no data)


class Accepted(WireModel):
    """The 202 answer of `POST /inference`."""

    request_id: str
    worker_id: str | None  # None when queued on the model's shared queue (pull routing): any worker may take it
    status: Literal["queued"] = "queued"
    replayed: bool = False  # true when the request id or idempotency key was seen before: the same job


class GPUInfo(WireModel):
    name: Text
    memory_total_bytes: int | None = Field(default=None, ge=0)


class Hardware(WireModel):
    gpus: list[GPUInfo] = Field(default_factory=list, max_length=64)
    cpu_cores: int | None = Field(default=None, ge=1)
    ram_total_bytes: int | None = Field(default=None, ge=0)


MAX_BYTES = 2**60  # more memory than any machine lends


class ShardRegistration(WireModel):
    """The body of `POST /shards`: a shard host (`gputorrent shard`) lends the memory and compute of
    the `ggml-rpc-server` at `address:port` to one group's leader at a time."""

    shard_id: str | None = Field(default=None, pattern=WORKER_ID_PATTERN)
    address: IPAddressText  # where leaders connect: one address (not 0.0.0.0), checked below
    port: int = Field(ge=1, le=65535)
    memory_bytes: int = Field(ge=0, le=MAX_BYTES)  # what it lends: its devices' free memory at start, or less

    @field_validator("address")
    @classmethod
    def _one_address(cls, address: str) -> str:
        if ipaddress.ip_address(address).is_unspecified:
            raise ValueError("must be the one address leaders connect to, not every interface")
        return address

    devices: list[Text] = Field(default_factory=list, max_length=64)  # what ggml-rpc-server exposes, for people
    llama_cpp: Text = Field(max_length=64)  # the version its ggml-rpc-server was built from: a leader's must match


class Shard(ShardRegistration):
    """A shard host as the coordinator lists it (`GET /shards`)."""

    shard_id: str
    alive: bool
    group: str | None  # the group (its leader's) that holds it now


class ShardAssign(WireModel):
    """The body of `POST /shards/assign`: a leader asks for shard hosts for `group`.

    With `count` it gets that many (the ones that lend most); without, the fewest that lend
    `memory_bytes` together. `exclude`: hosts it could not reach."""

    group: str = Field(pattern=WORKER_ID_PATTERN)
    memory_bytes: int = Field(ge=0, le=MAX_BYTES)
    count: int | None = Field(default=None, ge=1, le=64)
    llama_cpp: Text = Field(max_length=64)
    exclude: list[str] = Field(default_factory=list, max_length=1024)


class ShardLease(WireModel):
    """The body of `POST /shards/renew` and `POST /shards/release`: a group keeps (or gives back) its hosts."""

    group: str = Field(pattern=WORKER_ID_PATTERN)
    shard_ids: list[str] = Field(default_factory=list, max_length=64)


class GroupHost(WireModel):
    """One part of a split model: the leader itself (`shard_id` null) or a shard host."""

    shard_id: str | None
    address: str
    port: int | None
    layers: int = Field(ge=0)
    memory_bytes: int = Field(ge=0)


class Group(WireModel):
    """A model split over machines: its leader serves it, its hosts hold the layers (`GET /workers`)."""

    hosts: list[GroupHost] = Field(max_length=65)


SHA256_PATTERN = r"^[0-9a-f]{64}$"
MAX_TORRENT_BYTES = 512 * 1024  # swarm.MAX_PIECES pieces of 32 bytes, and room to spare; under the body limit


class SwarmPeer(WireModel):
    """Where a worker's libtorrent session listens (`gputorrent/swarm.py`): other workers fetch from it."""

    address: IPAddressText
    port: int = Field(ge=1, le=65535)


class SwarmFile(WireModel):
    """A model file in the pool's catalogue: its file name, size, SHA-256 and v2 torrent (base64)."""

    # A bare file name, not hidden: it is written into the models directory, beside `.swarm/`.
    name: str = Field(pattern=r"^[^./\\\s\x00][^/\\\s\x00]{0,254}$")
    size: int = Field(ge=1)
    sha256: str = Field(pattern=SHA256_PATTERN)
    torrent: str = Field(min_length=1, max_length=MAX_TORRENT_BYTES * 4 // 3 + 4, repr=False)

    @field_validator("torrent")
    @classmethod
    def _base64(cls, torrent: str) -> str:
        try:
            base64.b64decode(torrent, validate=True)
        except ValueError:
            raise ValueError("must be base64") from None
        return torrent


class SwarmFetch(WireModel):
    """The body of `POST /swarm/fetch`: a worker about to fetch `model`, listening at `peer`."""

    model: Text = Field(pattern=MODEL_NAME_PATTERN)
    peer: SwarmPeer


class SwarmProgress(WireModel):
    """The body of `POST /swarm/progress`: how a fetch announced with `POST /swarm/fetch` goes."""

    model: Text = Field(pattern=MODEL_NAME_PATTERN)
    peer: SwarmPeer
    done_bytes: int = Field(ge=0)
    total_bytes: int = Field(ge=1)
    rate_bps: float = Field(ge=0, le=1e13)
    peers: int = Field(ge=0, le=100_000)
    paused: bool = False  # no holder sends: it waits for one to come back


class SwarmTransfer(SwarmProgress):
    """A fetch under way as the dashboard shows it (`/pool`): its last progress, and when it came."""

    at: float


class SwarmSource(WireModel):
    """The answer of `POST /swarm/fetch`: the file, the live workers that hold it, the other workers
    fetching it (they trade the pieces they have), and every address the fetching worker may exchange
    pieces with (live workers', and fetchers')."""

    file: SwarmFile
    holders: list[SwarmPeer]
    fetching: list[SwarmPeer]
    members: list[str]


class SwarmMembers(WireModel):
    """The answer of `GET /swarm/members`: the addresses a worker's swarm may talk to, and who is
    fetching which model now (a holder connects to them)."""

    members: list[str]
    fetching: dict[str, list[SwarmPeer]]  # model → fetchers


class WorkerRegistration(WireModel):
    """The body of `POST /register`. A worker that gives no id is given one."""

    worker_id: str | None = Field(default=None, pattern=WORKER_ID_PATTERN)
    models: list[Text] = Field(min_length=1, max_length=MAX_MODELS)
    backend: Text = Field(min_length=1, max_length=64)
    slots: int = Field(default=1, ge=1, le=MAX_SLOTS)
    hardware: Hardware = Field(default_factory=Hardware)
    version: Text | None = Field(default=None, max_length=64)
    can_pull: bool = False  # its backend can fetch models it is asked to (`POST /api/pull`)
    swarm: SwarmPeer | None = None  # where it seeds the model files it holds (llama.cpp workers)
    group: Group | None = None  # its model is split over it and these shard hosts (`--split`)
    files: dict[str, SwarmFile] = Field(default_factory=dict, max_length=MAX_MODELS)  # model → its file
    # Needed only to replace the registration of a live worker with this id: that worker's secret.
    worker_secret: str | None = Field(default=None, max_length=256, repr=False)

    @field_validator("models")
    @classmethod
    def _model_names(cls, models: list[str]) -> list[str]:
        for name in models:
            if not name or len(name) > 256 or any(ch.isspace() for ch in name):
                raise ValueError(f"invalid model name {name!r}")
        return models

    @field_validator("files")
    @classmethod
    def _files_of_served_models(cls, files: dict[str, SwarmFile], info: ValidationInfo) -> dict[str, SwarmFile]:
        if unknown := sorted(set(files) - set(info.data.get("models") or [])):
            raise ValueError(f"{unknown[0]!r} is not among the models it registers")
        if files and info.data.get("swarm") is None:
            raise ValueError("a worker that publishes files must give its swarm address")
        return files


class WorkerRecord(WireModel):
    """The registration as stored at `worker:{worker_id}`."""

    worker_id: str
    models: list[str]
    backend: str
    slots: int
    hardware: Hardware
    version: str | None = None
    registered_at: float
    can_pull: bool = False
    swarm: SwarmPeer | None = None
    group: Group | None = None


class Registered(WireModel):
    """The answer of `POST /register`."""

    worker_id: str
    # Proves the worker is the one that registered the id: re-registering it must present this.
    worker_secret: str = Field(default="", repr=False)
    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    # The record's `registered_at`: a worker linked to Redis tells by it whether the id is still its own.
    registered_at: float | None = None


WorkerCondition = Literal["alive", "draining", "unhealthy"]
"""What a live worker says of itself: taking jobs, finishing its jobs before it stops, or its backend failing."""


class BeatLoad(WireModel):
    """A heartbeat as the pool snapshot reads it: all but its telemetry, which routing does not use.
    With one model's telemetry a heartbeat is about 900 bytes, and parsing it made some 30 objects
    and took about 10 µs, against 3 µs without: the snapshot kept every worker's, for the collector
    to walk (`registry.with_telemetry` reads it for the listings that show it)."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    at: float = Field(ge=0, le=MAX_UNIX_TIME_S)
    jobs_in_flight: int = Field(default=0, ge=0, le=MAX_SLOTS)
    condition: WorkerCondition = "alive"
    reason: str | None = None  # why it is unhealthy
    # measured generation speed (recent jobs, weighted); None before any
    tokens_per_s: float | None = Field(default=None, ge=0, le=MAX_TOKENS_PER_S)


class Heartbeat(BeatLoad):
    """What a worker writes at `heartbeat:{worker_id}` on every beat."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    telemetry: Telemetry | None = None  # the machine and the jobs done so far


class WorkerState(WireModel):
    """One row of `GET /workers`."""

    worker_id: str
    models: list[str]
    backend: str
    slots: int
    hardware: Hardware
    state: Literal["alive", "draining", "unhealthy", "dead"]  # only `alive` workers are given jobs
    state_reason: str | None = None  # why a worker is unhealthy: its backend's last failure
    jobs_in_flight: int
    queue_length: int  # jobs queued for this worker alone, every priority band
    last_heartbeat_at: float | None
    registered_at: float
    # from the last heartbeat (none once the worker is dead): in `/workers`, `/pool` and `/metrics`, not in
    # the snapshot that routing reads (see `BeatLoad`)
    telemetry: Telemetry | None = None
    jobs_held: int = 0  # jobs in its processing list now: read live, unlike `jobs_in_flight` (last heartbeat)
    tokens_per_s: float | None = None  # measured generation speed, from the last heartbeat
    can_pull: bool = False  # its backend can fetch models (`POST /api/pull` sends it pull jobs)
    swarm: SwarmPeer | None = None  # where it seeds its models' files (its models in the catalogue)
    group: Group | None = None  # its model split over it and shard hosts: where each part is


class TokenChunk(WireModel):
    """A piece of generated text, as a backend yields it."""

    text: str


class GenerationDone(WireModel):
    """The last item a backend yields: token counts and why generation stopped."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"


class PullProgress(WireModel):
    """One progress line of a model pull, as Ollama's `/api/pull` streams it (its `success` and
    `error` lines end the pull instead)."""

    # Ollama may add fields; only these travel on.
    model_config = ConfigDict(extra="ignore", frozen=True)

    status: str = Field(max_length=1000)
    digest: str | None = Field(default=None, max_length=200)
    total: int | None = Field(default=None, ge=0)
    completed: int | None = Field(default=None, ge=0)


class Embeddings(WireModel):
    """What a backend returns for an embedding job."""

    # Taken as the backend gives it: the executor fails a job with non-finite values as the
    # backend's error (`backend_error`), and the result it stores admits none.
    model_config = ConfigDict(allow_inf_nan=True)

    vectors: list[list[float]]
    prompt_tokens: int


class ApiKeyInfo(WireModel):
    """An API key as listed: never its secret."""

    key_id: str
    name: str
    scope: Literal["client", "admin", "join"]
    created_at: float


class ApiKeyRequest(WireModel):
    """The body of `POST /admin/keys`."""

    name: Text = Field(min_length=1, max_length=128)
    scope: Literal["client", "admin", "join"] = "client"


class CreatedApiKey(WireModel):
    """The answer of `POST /admin/keys`: the only time the key itself is shown."""

    key: str = Field(repr=False)
    info: ApiKeyInfo


class WorkerBeat(WireModel):
    """The body of `POST /worker/heartbeat`: the beat, and the jobs the worker is running now."""

    heartbeat: Heartbeat
    running: list[str] = Field(default_factory=list, max_length=1024)  # request ids


class BeatAnswer(WireModel):
    """The answer to a beat: whether an admin asked the worker to drain, and which of its running
    jobs were ended elsewhere (cancelled, timed out, handed on): it stops them at their next token."""

    drain: bool = False
    # Another process registered this worker's id since this one did (a worker linked to Redis reads its
    # record to know): it stops at once, and leaves that id's queue, held jobs and registration alone.
    replaced: bool = False
    ended: list[str] = Field(default_factory=list)
    # Changes whenever a worker joins the swarm or starts a fetch: the worker then reads the members again.
    swarm_epoch: int = 0


class StreamText(WireModel):
    """Text for a job's token stream: appended by `POST /worker/jobs/{id}/stream`, or what an earlier
    attempt of the job already sent (`GET`)."""

    text: str = Field(max_length=1_000_000)
    tokens: int = Field(ge=0, le=10_000_000)  # how many tokens `text` holds


class HandOn(WireModel):
    """The body of `POST /worker/hand-on`: which of the worker's lists go to other workers."""

    held: bool = False  # also the jobs it holds (a drain that stopped them), not only its queue


class Orphans(WireModel):
    """The body of `POST /worker/orphans`: the jobs the worker's consumers hold, and those it found
    unheld on the previous look (request ids)."""

    held: list[str] = Field(default_factory=list, max_length=1024)
    suspects: list[str] = Field(default_factory=list, max_length=4096)


class Taken(WireModel):
    """A job leased to the worker that asked (`POST /worker/take`)."""

    job: Job
    streamed_before: bool  # its stream had entries already: read them (GET .../stream) to continue after them


class Moved(WireModel):
    """How many jobs a worker's request moved: handed on, failed or queued again."""

    jobs: int = 0


class OrphanCheck(WireModel):
    """The answer of `POST /worker/orphans`: jobs queued again, and those unheld now (orphans if
    they are still unheld on the next look)."""

    jobs: int = 0
    suspects: list[str] = Field(default_factory=list)


class Left(WireModel):
    """The answer of `POST /worker/leave`: whether the worker left the registry (its lists were empty)."""

    left: bool
