"""The job request every tier accepts, validated the same way at each of them."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.config import JsonDict

from rbee.errors import RequestError
from rbee.link.bounds import grammar_problems, schema_problems

MAX_PROMPT_CHARS = 200_000
MAX_TOKENS_LIMIT = 32_768


DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?$")


def seconds(value: Any) -> Any:
    """A keep-alive as Ollama takes it: seconds (a number or "300"), "30s", "5m", "1h30m";
    0 unloads right after, any negative keeps the model loaded."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return -1.0 if value < 0 else value
    if not isinstance(value, str):
        return value  # pydantic says what is wrong
    text = value.strip()
    if text.startswith("-"):
        return -1.0
    match = DURATION.match(text)
    if not text or match is None:
        raise ValueError(f"{value!r} is not a duration: seconds, or like 30s, 5m, 1h30m; 0 unloads at once, "
                         "-1 keeps the model loaded")
    hours, minutes, secs = (float(part or 0) for part in match.groups())
    return hours * 3600 + minutes * 60 + secs


#: seconds; from a number or "5m"-style text
Duration = Annotated[float, BeforeValidator(seconds), Field(ge=-1, le=10 * 365 * 86400)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=MAX_PROMPT_CHARS)
    #: an assistant turn's calls, in OpenAI's shape ({"id", "type", "function": {"name", "arguments"}})
    tool_calls: list[dict[str, Any]] | None = Field(default=None, max_length=128)
    #: a tool turn: which call this is the result of
    tool_call_id: str | None = Field(default=None, max_length=200)


#: Which tier reads a job field (``json_schema_extra`` of each field, in the OpenAPI document too):
#: the queen routes, the hive finds the model and places a worker, the worker generates. Each
#: tier passes on only what the tiers below it read (``JobRequest.for_tier``).
ROUTING: JsonDict = {"x-rbee-group": "routing"}  # the queen
MODEL: JsonDict = {"x-rbee-group": "model"}  # the hive: which model, in which form
PLACEMENT: JsonDict = {"x-rbee-group": "placement"}  # the hive: which worker, how big, how long
CONTENT: JsonDict = {"x-rbee-group": "content"}  # the worker: what to read
SAMPLING: JsonDict = {"x-rbee-group": "sampling"}  # the worker: how to generate
READ_BY: dict[str, tuple[str, ...]] = {
    "hive": ("model", "placement", "content", "sampling"),
    "worker": ("content", "sampling"),
}


class SplitMain(BaseModel):
    """What the queen tells the hive that runs a split job's main worker (rbee.queen.split): the
    unix sockets, on this host, that lead to each helper's RPC share, and how much goes where.
    Set by the queen only; a client's job that carries it is refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: one per helper, in llama.cpp's device order (the last holds the output projection)
    sockets: list[str] = Field(min_length=1, max_length=16)
    #: the layers the helpers take, the output projection counted (llama.cpp's n_gpu_layers)
    gpu_layers: int = Field(ge=1, le=10_000)
    #: each helper's part of those layers (llama.cpp's tensor_split over the RPC devices)
    tensor_split: list[float] = Field(default_factory=list, max_length=16)
    #: what the main worker itself holds on this host
    bytes: int = Field(ge=0)
    #: the helpers' hive names, for messages
    helpers: list[str] = Field(default_factory=list, max_length=16)


class JobRequest(BaseModel):
    """``POST /v1/jobs`` at queen, hive and worker: a raw ``prompt`` or chat ``messages``
    (formatted by the worker, which knows the model's chat template)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # content ------------------------------------------------------------------------------------
    prompt: str | None = Field(default=None, min_length=1, max_length=MAX_PROMPT_CHARS, json_schema_extra=CONTENT)
    #: texts to embed instead of a generation: a vector each, from a worker loaded for embeddings
    input: list[Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]] | None = Field(
        default=None, min_length=1, max_length=2048, json_schema_extra=CONTENT)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=256, json_schema_extra=CONTENT)
    #: with ``prompt``: "auto" sends it as one user turn through the model's own chat template when
    #: the model has one, and as a plain completion when it has none (what `rbee infer` asks for)
    template: Literal["auto"] | None = Field(default=None, json_schema_extra=CONTENT)
    #: functions the model may call, in OpenAI's shape: shown to it through its chat template
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=128, json_schema_extra=CONTENT)

    # routing and model --------------------------------------------------------------------------
    node: str | None = Field(default=None, min_length=1, max_length=100, json_schema_extra=ROUTING)
    model: str | None = Field(default=None, min_length=1, max_length=500, json_schema_extra=MODEL)
    #: a logical model's forms, e.g. {"gguf": "hf:…", "mlx": "hf:…"}; the hive picks one for its engine
    forms: dict[Literal["gguf", "mlx"], str] | None = Field(default=None, json_schema_extra=MODEL)

    # placement ----------------------------------------------------------------------------------
    #: engine: auto (the hive decides), mlx or llama-cpp
    backend: Literal["auto", "mlx", "llama-cpp"] | None = Field(default=None, json_schema_extra=PLACEMENT)
    #: context length in tokens; omitted = the model's trained length, as far as memory allows
    ctx: int | None = Field(default=None, ge=256, le=1_048_576, json_schema_extra=PLACEMENT)
    #: layers llama.cpp offloads to the GPU: -1 all (the default where the build supports it), 0 none, N
    gpu_layers: int | None = Field(default=None, ge=-1, le=10_000, json_schema_extra=PLACEMENT)
    #: may a model too big for any one GPU be split over several (the hive's `gpu_split =`)
    gpu_split: bool | None = Field(default=None, json_schema_extra=PLACEMENT)
    #: sequences a new worker decodes together, and how many may wait (the model's `parallel =`, `queue =`)
    parallel: int | None = Field(default=None, ge=1, le=64, json_schema_extra=PLACEMENT)
    queue: int | None = Field(default=None, ge=0, le=10_000, json_schema_extra=PLACEMENT)
    #: how long the worker stays loaded once idle, in seconds: 0 unloads after this job, -1 keeps it
    #: (default: the hive's `keep_alive`, else RBEE_WORKER_IDLE_TIMEOUT)
    keep_alive: Duration | None = Field(default=None, json_schema_extra=PLACEMENT)
    #: only load the model (a worker ready for it), generate nothing: Ollama's empty prompt
    load_only: bool | None = Field(default=None, json_schema_extra=PLACEMENT)
    #: a split job's main worker (set by the queen: rbee.queen.split)
    split: SplitMain | None = Field(default=None, json_schema_extra=PLACEMENT)

    # sampling -----------------------------------------------------------------------------------
    max_tokens: int = Field(default=256, ge=1, le=MAX_TOKENS_LIMIT, json_schema_extra=SAMPLING)
    temperature: float = Field(default=0.8, ge=0.0, le=2.0, json_schema_extra=SAMPLING)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0, json_schema_extra=SAMPLING)
    top_k: int = Field(default=40, ge=0, le=100_000, json_schema_extra=SAMPLING)
    min_p: float = Field(default=0.05, ge=0.0, le=1.0, json_schema_extra=SAMPLING)
    repeat_penalty: float = Field(default=1.0, gt=0.0, le=10.0, json_schema_extra=SAMPLING)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, json_schema_extra=SAMPLING)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, json_schema_extra=SAMPLING)
    #: a llama.cpp GBNF grammar (rule ``root``) the output must match
    grammar: str | None = Field(default=None, min_length=1, max_length=100_000, json_schema_extra=SAMPLING)
    #: structured output: {"type": "json_object"} or {"type": "json_schema", "schema": {...}}
    response_format: dict[str, Any] | None = Field(default=None, json_schema_extra=SAMPLING)
    #: token id -> bias added to its logit (-100 bans it, 100 all but forces it), as OpenAI's
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        default=None, max_length=1024, json_schema_extra=SAMPLING)
    #: log-probabilities of each generated token, with this many likeliest alternatives (0-20)
    logprobs: int | None = Field(default=None, ge=0, le=20, json_schema_extra=SAMPLING)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1, json_schema_extra=SAMPLING)
    stop: list[str] = Field(default_factory=list, max_length=8, json_schema_extra=SAMPLING)

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> JobRequest:
        given = sum(part is not None for part in (self.prompt, self.messages, self.input))
        if self.load_only and given:
            raise ValueError("load_only loads the model and generates nothing: leave out prompt, messages and input")
        if not self.load_only and given != 1:
            raise ValueError("give exactly one of prompt, messages or input (to embed)")
        return self

    @model_validator(mode="after")
    def _one_constraint(self) -> JobRequest:
        if self.grammar is not None and self.response_format is not None:
            raise ValueError("give a grammar or a response_format, not both")
        if self.response_format is not None and self.response_format.get("type") not in ("json_object",
                                                                                          "json_schema"):
            raise ValueError('response_format.type must be "json_object" or "json_schema"')
        problems = []
        if self.grammar is not None:
            problems = grammar_problems(self.grammar)
        elif self.response_format is not None and self.response_format.get("type") == "json_schema":
            problems = schema_problems(self.response_format.get("schema"), "response_format.schema")
        if problems:  # refused at every tier, before a worker's engine thread sees it
            raise ValueError(f"rbee cannot enforce or bound this output constraint: {'; '.join(problems)}")
        return self

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: list[str]) -> list[str]:
        if any(not item for item in value):
            raise ValueError("stop sequences must not be empty strings")
        return value

    def downstream(self, **changes: Any) -> dict[str, Any]:
        """The whole body, with ``changes`` (a None removes a field)."""
        body = self.model_dump(exclude_none=True, mode="json")
        body.update(changes)
        return {key: value for key, value in body.items() if value is not None}

    def for_tier(self, tier: Literal["hive", "worker"], **changes: Any) -> dict[str, Any]:
        """The body the next tier down gets: the groups it (and the tiers below it) read."""
        groups = READ_BY[tier]
        kept = {name for name, field in type(self).model_fields.items()
                if isinstance(field.json_schema_extra, dict) and field.json_schema_extra["x-rbee-group"] in groups}
        return {key: value for key, value in self.downstream(**changes).items() if key in kept}


def parse_job_request(body: dict[str, Any]) -> JobRequest:
    try:
        return JobRequest.model_validate(body)
    except ValidationError as exc:
        raise RequestError(f"invalid job request: {_problems(exc)}") from exc


# Heartbeats and status views ------------------------------------------------------------------
#
# What travels between roles besides jobs. Senders build these models, receivers parse them
# (a malformed body is a 400 naming the field), and the keeper's tables read them.


class Wire(BaseModel):
    """Unknown fields are ignored, so a newer peer may send more than an older one reads."""

    model_config = ConfigDict(extra="ignore")


class Load(Wire):
    """How full a worker is: what the queen's scheduler weighs."""

    slots: int = Field(default=1, ge=0)
    slots_busy: int = Field(default=0, ge=0)
    queue: int = Field(default=0, ge=0)
    tokens_per_s: float = Field(default=0.0, ge=0)
    #: where an engine step's time goes, ms per step since load: ``decode`` (the engine's forward
    #: pass), ``sample`` (the rest of the step), ``loop`` (admission, stops, the hand-off); and ``steps``
    step_ms: dict[str, float] = Field(default_factory=dict)


class WorkerReport(Wire):
    """A worker's heartbeat body and its /health and /ready answer."""

    worker_id: str = Field(min_length=1, max_length=100)
    state: Literal["loading", "ready", "busy", "failed"]
    model_path: str
    backend: str
    n_ctx: int = Field(default=0, ge=0)
    engine: dict[str, Any] = Field(default_factory=dict)
    tokens_generated: int = Field(default=0, ge=0)
    jobs_done: int = Field(default=0, ge=0)
    waiting: int = Field(default=0, ge=0)
    load: Load = Field(default_factory=Load)


PeerStateName = Literal["starting", "up", "busy", "down", "stopping", "stopped"]


class WorkerView(Wire):
    """One worker as its hive describes it (hive heartbeats, `rbee workers list`)."""

    worker_id: str
    state: PeerStateName
    reason: str = ""
    model_path: str
    backend: str
    engine_reason: str = ""
    n_ctx: int = 0
    gpu_layers: int = 0
    placement: str = ""
    engine: dict[str, Any] = Field(default_factory=dict)
    pid: int | None = None
    url: str = ""
    heartbeat_age_s: float | None = None
    tokens_generated: int = 0
    load: Load = Field(default_factory=Load)
    memory: int = 0
    idle_s: float = 0.0
    #: how long it stays loaded once idle (seconds; -1: until stopped), for Ollama's `expires_at`
    keep_alive_s: float | None = None
    #: a split job's main worker: how many helpers' shares hold the rest of its layers (0: not split)
    helpers: int = 0

    @property
    def split_role(self) -> str:
        """Its part in a split, in words ("split main, 2 helpers"), or "" for a worker alone."""
        return f"split main, {self.helpers} helper{'s' if self.helpers > 1 else ''}" if self.helpers else ""


class FleetWorker(WorkerView):
    """A worker in the queen's fleet-wide list (`GET /v1/workers`): which hive it is on."""

    node: str


class CatalogModel(Wire):
    """A catalog entry as hives report it (``ModelEntry.describe``): enough for a client's model
    list (Ollama's ``/api/tags``) without asking the hive."""

    name: str = Field(min_length=1)
    ref: str = Field(min_length=1)
    size: int = Field(default=0, ge=0)
    path: str = ""
    sha256: str = ""
    format: str = ""
    quantization: str = ""
    architecture: str = ""
    parameters: int = 0
    context_length: int = 0
    #: what a split across hives is planned from (rbee.queen.split.Shape)
    layers: int = 0
    kv_per_token: int = 0
    output_bytes: int = 0
    vocab: int = 0
    modified: float = 0.0  # when it entered the catalog (unix seconds)


class ShareView(Wire):
    """A share of a split model this hive serves (`rbee.hive.shares`): llama.cpp's RPC server."""

    share_id: str
    model: str
    bytes: int = 0
    socket: str = ""
    pid: int | None = None
    state: str = "up"  # up | stopped (SIGSTOP) | how it ended
    since: float | None = None
    #: what its RPC cache holds from the host's own copy of the model, in words (rbee.hive.rpc_cache)
    cache: str = ""


#: a run of a model's layers: (first, count)
Layers = tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]]


class SharePart(Wire):
    """What a share of a split holds: ``layers`` and, with ``output``, the output projection."""

    layers: Layers
    output: bool = False


class PullRequest(Wire):
    """A pull (``POST /v1/catalog/jobs``). With ``share``, the hive then fills its RPC cache with
    that part of the model from the copy it pulled (rbee.hive.rpc_cache), as part of the job, with
    progress: a split's helper is provisioned this way before its share starts."""

    ref: str = Field(min_length=1)
    share: SharePart | None = None


class ShareRequest(Wire):
    """What the queen asks of a helper hive (``POST /v1/shares``): a share of ``bytes`` for a
    split of ``model``; ``layers`` (first, count) and ``output`` say what the share will hold, so
    the hive makes sure its RPC cache holds that part of its own copy of ``ref`` (filled by the
    pull before; rbee.hive.rpc_cache)."""

    model: str = Field(min_length=1)
    bytes: int = Field(gt=0)
    ref: str | None = None
    layers: Layers | None = None
    output: bool = False


class FleetShare(ShareView):
    """A share in the queen's fleet-wide list (`GET /v1/workers`): which hive serves it."""

    node: str


class HiveReport(Wire):
    """A hive's heartbeat body and its /v1/status answer."""

    name: str = Field(min_length=1, max_length=100)
    version: str = ""
    pid: int | None = None
    workers: list[WorkerView] = Field(default_factory=list)
    devices: dict[str, Any] = Field(default_factory=dict)
    #: what admission would grant a new worker now, so the queen's scheduler uses the same rule
    free_memory: int = Field(default=0, ge=0)
    models: list[CatalogModel] = Field(default_factory=list)
    #: the engine proven on this host: build, CPU variant and why (rbee.engine.proof.Verdict.line)
    engine: str = ""
    #: shares of split models served here (their bytes are held like a worker's)
    shares: list[ShareView] = Field(default_factory=list)


class HiveView(Wire):
    """One hive as the queen describes it (`GET /v1/hives`, `rbee fleet status`)."""

    name: str
    url: str = ""
    state: PeerStateName | Literal["not running"]
    reason: str = ""
    since: float | None = None  # when it took this state (unix seconds)
    heartbeat_age_s: float | None = None
    version: str | None = None
    pid: int | None = None
    workers: list[WorkerView] = Field(default_factory=list)
    shares: list[ShareView] = Field(default_factory=list)
    devices: dict[str, Any] = Field(default_factory=dict)
    #: what a new worker may take there now (its last heartbeat: free memory within its `memory` cap)
    free_memory: int = 0
    engine: str = ""
    installed: str | None = None
    ssh: str | None = None


class HostProbe(Wire):
    """What the queen's probe script reports about a host before rbee runs there."""

    system: str
    machine: str
    python: str
    python_full: str = ""
    home: str = ""
    installed: dict[str, Any] | None = None
    venv: bool = False
    hive: dict[str, Any] | None = None
    nvidia: bool = False
    nvcc: bool = False
    cpu: str = ""  # /proc/cpuinfo's first processor, or macOS's sysctl lines (rbee.engine.cpu.parse)
    engine: dict[str, Any] | None = None  # the kept proof of the engine there (rbee.engine.proof.Verdict)


W = TypeVar("W", bound=BaseModel)


def parse_wire(model: type[W], body: Any, what: str) -> W:
    """``body`` as ``model``, or a RequestError (400) naming ``what`` and the bad fields."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise RequestError(f"malformed {what}: {_problems(exc)}") from exc


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()[:5]
    )
