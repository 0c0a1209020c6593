"""The scenario: one experiment, read from YAML and validated at the edge.

A scenario names its targets (servers to measure, or models to serve first), where prompts come
from, how long the output is, the load shape (a ``kind`` per variant), the SLOs and the stop
conditions.  Every model forbids unknown fields, and :func:`load` turns a validation error into
one message naming the field path and the YAML line it sits on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, field_validator,
                      model_validator)

from loadgen import placement
from loadgen.shapes import Shape, StageSpec, bisect
from rundir.slos import Slos  # the run directory's contract: loadgen and analysis judge alike

SCHEMA_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- targets ---------------------------------------------------------------------------------

class Serve(_Model):
    """Ask ``ctxload run`` to start the server itself (on a free loopback port)."""

    engine: Literal["ssm-server", "vllm"]
    """Which server to start."""
    preset: str | None = None
    """A preset of servers.presets; its tiny model directory is built on demand."""
    model_dir: str | None = None
    """A model directory (or a hub id vLLM can load); instead of ``preset``."""
    args: list[str] = Field(default_factory=list)
    """Extra command-line arguments for the server."""
    startup_timeout_s: PositiveFloat = 600.0
    memory_budget: str | None = None
    """Device memory the server may use, e.g. ``24GiB`` (default: the scenario's
    ``memory_budget``), on each of its GPUs. ssm-server gets ``--gpu-memory-budget``; vLLM's
    launch profile turns it into its memory share of the card and a ``max_num_seqs`` whose
    state fits."""
    gpus: list[Annotated[int, Field(ge=0)]] | None = None
    """The GPUs the server runs on, numbered as NVML and nvidia-smi number them; its process
    sees only these (``CUDA_VISIBLE_DEVICES``). vLLM spreads the model over several
    (``parallel``); ssm-server runs on one. Default: whatever the server picks (the first
    visible GPU)."""
    parallel: Literal["tensor", "data"] = "tensor"
    """How vLLM uses several ``gpus``: tensor parallelism (``--tensor-parallel-size``, the
    model split across them) or data parallelism (``--data-parallel-size``, one replica on
    each)."""

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, v):
        if v is not None:
            if not v:
                raise ValueError("`gpus` lists no GPU: give at least one index, or leave it out")
            twice = sorted({g for g in v if v.count(g) > 1})
            if twice:
                raise ValueError(f"`gpus` lists GPU {twice[0]} twice")
        return v

    def memory_budget_bytes(self) -> int | None:
        from servers.sizes import parse_bytes

        return parse_bytes(self.memory_budget) if self.memory_budget is not None else None

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _size(cls, v):
        if v is None:
            return None
        from servers.sizes import parse_bytes

        parse_bytes(v)  # a readable error naming the field
        return str(v)

    @model_validator(mode="after")
    def _one_model(self) -> "Serve":
        if (self.preset is None) == (self.model_dir is None):
            raise ValueError("give exactly one of `preset` or `model_dir`")
        if self.engine == "ssm-server" and self.gpus and len(self.gpus) > 1:
            raise ValueError(f"ssm-server runs on one GPU; `gpus` lists {len(self.gpus)}: give one index")
        if self.preset is not None:
            from servers import presets

            try:
                presets.get(self.preset)
            except presets.UnknownPreset as e:
                raise ValueError(str(e)) from None
        return self


class Target(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """Label of the target in records and reports."""
    url: str | None = None
    """Base URL of a running OpenAI-compatible server (``http://host:port``)."""
    serve: Serve | None = None
    """Or: start this server for the run and stop it afterwards."""
    model: str | None = None
    """Model name sent in requests; defaults to the target's name."""
    family: Literal["transformer", "ssm", "hybrid"] | None = None
    """Architecture family; taken from the preset or model directory when served."""
    engine: str | None = None
    """Engine label for the records (``vllm``, ``ssm-server``, ``synthetic``…)."""
    api_key_env: str | None = None
    """Environment variable holding a bearer token for this target."""
    tokenizer: str | None = None
    """Local tokenizer directory for prompt synthesis; default: the served model directory,
    else the target's ``/tokenize``."""
    prompt_tokens: Sweep | None = None
    """This target's own prompt lengths in a ``context_sweep`` (default: the load's), e.g. a
    Transformer's sweep ending at 256K while the SSMs go on to 1M."""
    max_prompt_tokens: PositiveInt | None = None
    """Longest prompt ever sent to this target, by any load (a max-context search stops
    there too): for a server too slow for long prompts."""

    @model_validator(mode="after")
    def _url_or_serve(self) -> "Target":
        if (self.url is None) == (self.serve is None):
            raise ValueError("give exactly one of `url` or `serve`")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError("`url` must start with http:// or https://")
        if self.serve is not None and self.serve.preset and self.family is None:
            from servers import presets

            self.family = presets.get(self.serve.preset).family
        if self.engine is None and self.serve is not None:
            self.engine = self.serve.engine
        if self.model is None:
            self.model = self.name
        return self


# ---- prompts and output ----------------------------------------------------------------------

class SharedPrefix(_Model):
    """Long-document QA: groups of consecutive requests share one document (a prefix cache can
    reuse it), each with a question of its own at the end. A request of ``prompt_tokens`` is a
    document of ``prompt_tokens − question_tokens`` and a question of ``question_tokens``."""

    question_tokens: PositiveInt = 256
    """The unique end of each request."""
    group_size: PositiveInt = 16
    """Consecutive requests sharing one document."""


class SyntheticPrompt(_Model):
    kind: Literal["synthetic"] = "synthetic"
    """Plain English words cycled to the exact token length."""
    unique_prefix: bool = True
    """Start every request with a different few tokens, so prefix caching cannot skip prefill
    (with ``shared_prefix``: every group's document)."""
    shared_prefix: SharedPrefix | None = None
    """Groups of requests share their first tokens (``SharedPrefix``)."""


class FilePrompt(_Model):
    kind: Literal["file"]
    """A real long text, repeated when shorter than the length asked."""
    path: str = "shipped"
    """A text file, or ``shipped`` for the text that comes with ctxload."""
    unique_prefix: bool = True
    shared_prefix: SharedPrefix | None = None


PromptSource = Annotated[Union[SyntheticPrompt, FilePrompt], Field(discriminator="kind")]


class Output(_Model):
    max_tokens: PositiveInt = 64
    """Tokens to generate per request."""
    ignore_eos: bool = True
    """Generate exactly ``max_tokens`` (vLLM's extension), so output length is controlled."""


# ---- load shapes -----------------------------------------------------------------------------

class Doubling(_Model):
    """Lengths or user counts ``start, start*factor, …`` up to ``stop`` inclusive."""

    start: PositiveInt
    stop: PositiveInt
    factor: float = Field(2.0, gt=1.0)

    @model_validator(mode="after")
    def _order(self) -> "Doubling":
        if self.stop < self.start:
            raise ValueError("`stop` must be >= `start`")
        return self

    def values(self) -> list[int]:
        out, v = [], float(self.start)
        while round(v) <= self.stop:
            if not out or round(v) != out[-1]:
                out.append(round(v))
            v *= self.factor
        return out


Sweep = Union[list[PositiveInt], Doubling]
Target.model_rebuild()  # its ``prompt_tokens`` is a Sweep


def sweep_values(s: Sweep) -> list[int]:
    return s.values() if isinstance(s, Doubling) else list(s)


class _Load(_Model):
    """A load kind: it owns its stages (what :func:`loadgen.runner` runs, one after another),
    the warm-up before them and how many requests each stage sends in full."""

    def stages(self) -> Shape:
        """The stages, as a generator that is sent each stage's result (loadgen.shapes)."""
        raise NotImplementedError

    def first_length(self) -> int | None:
        """The prompt length of the warm-up requests (None: no warm-up)."""
        return None

    def for_target(self, target: "Target") -> "_Load":
        """This load as ``target`` runs it (a target may set its own prompt lengths)."""
        return self

    def warmup(self) -> StageSpec | None:
        """The warm-up stage before a target's first stage, when there is one."""
        n, k = self.first_length(), getattr(self, "warmup_requests", 0)
        return StageSpec("warmup", 1, n, requests=k) if n and k else None

    def planned_requests(self, label: str) -> int | None:
        """The requests its stage labelled ``label`` sends in full (1 for a timed stage), or
        None when no stage of this load has that label: a resumed run runs again only the
        stages that got fewer."""
        return None

    def _planned(self) -> int:
        return 1 if getattr(self, "duration_s", None) or not getattr(self, "requests", None) else self.requests


class _Stages(_Load):
    requests: PositiveInt | None = None
    """Requests per stage (all users together)."""
    duration_s: PositiveFloat | None = None
    """Or: seconds per stage."""
    warmup_requests: int = Field(0, ge=0)
    """Requests sent before each target's first stage, recorded under stage ``warmup``."""

    @model_validator(mode="after")
    def _one_budget(self):
        if self.requests is None and self.duration_s is None:
            self.requests = 1
        return self


class ContextSweep(_Stages):
    kind: Literal["context_sweep"]
    prompt_tokens: Sweep
    """Prompt lengths, one stage each: a list or ``{start, stop, factor}``."""
    users: PositiveInt = 1
    """Concurrent streams in every stage (1 = the paper's batch 1)."""
    max_stage_tokens: PositiveInt | None = None
    """Fewer requests at the long end: a stage sends at most this many prompt tokens in all,
    at least one request (``requests: 3, max_stage_tokens: 32768``: 3 up to 8K, 2 at 16K, 1 at
    32K). With ``requests`` only."""

    def requests_at(self, prompt_tokens: int) -> int | None:
        """The requests of the stage at this length."""
        if self.requests is None or self.max_stage_tokens is None:
            return self.requests
        return max(1, min(self.requests, self.max_stage_tokens // prompt_tokens))

    def stages(self) -> Shape:
        for n in sweep_values(self.prompt_tokens):
            yield StageSpec(f"prompt={n}", self.users, n, requests=self.requests_at(n), duration_s=self.duration_s)

    def first_length(self) -> int:
        return sweep_values(self.prompt_tokens)[0]

    def for_target(self, target: "Target") -> "ContextSweep":
        """The target's own ``prompt_tokens``, where it sets them, instead of the scenario's."""
        return self.model_copy(update={"prompt_tokens": target.prompt_tokens}) if target.prompt_tokens is not None else self

    def planned_requests(self, label: str) -> int | None:
        if not label.startswith("prompt="):
            return None
        if self.duration_s or not self.requests:
            return 1
        return self.requests_at(int(label.split("=", 1)[1])) or 1


class ConcurrencySweep(_Stages):
    kind: Literal["concurrency_sweep"]
    prompt_tokens: PositiveInt
    """The one prompt length of every request."""
    users: Sweep
    """Concurrent streams, one stage each."""

    def stages(self) -> Shape:
        for u in sweep_values(self.users):
            yield StageSpec(f"users={u}", u, self.prompt_tokens, requests=self.requests, duration_s=self.duration_s)

    def first_length(self) -> int:
        return self.prompt_tokens

    def planned_requests(self, label: str) -> int | None:
        return self._planned() if label.startswith("users=") else None


class MixEntry(_Model):
    prompt_tokens: PositiveInt
    weight: PositiveFloat = 1.0


class Poisson(_Stages):
    kind: Literal["poisson"]
    rate: list[PositiveFloat]
    """Mean arrival rates (requests/s), one stage each; arrivals are a Poisson process."""
    mix: list[MixEntry] = Field(min_length=1)
    """Prompt lengths drawn with these weights."""
    max_users: PositiveInt = 64
    """At most this many requests in flight; later arrivals wait (and their wait is recorded)."""
    seed: int = 0

    def stages(self) -> Shape:
        mix = tuple((m.prompt_tokens, m.weight) for m in self.mix)
        for i, r in enumerate(self.rate):
            yield StageSpec(f"rate={r:g}", self.max_users, None, mix, requests=self.requests,
                            duration_s=self.duration_s, rate=r, seed=self.seed + i)

    def first_length(self) -> int:
        return self.mix[0].prompt_tokens

    def planned_requests(self, label: str) -> int | None:
        return self._planned() if label.startswith("rate=") else None


class Trace(_Load):
    """Replay a request trace (loadgen.trace: Mooncake's JSONL format) in one stage: each
    request at its time, with its prompt and output lengths, the blocks it shares with others
    shared in its prompt too (a prefix cache can reuse them)."""

    kind: Literal["trace"]
    path: str = "shipped"
    """A JSONL trace, or ``shipped`` for the small generated example that comes with ctxload."""
    block_tokens: PositiveInt = 512
    """Prompt tokens per hash id (Mooncake's: 512)."""
    speed: PositiveFloat = 1.0
    """Replay this many times faster than recorded."""
    limit: PositiveInt | None = None
    """Only the first this many requests."""
    max_users: PositiveInt = 64
    """At most this many requests in flight; later arrivals wait (and their wait is recorded)."""
    warmup_requests: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _readable(self) -> "Trace":
        self.entries()  # a scenario whose trace cannot be replayed is refused as it is read
        return self

    def entries(self):
        """The requests to replay; ValueError names the trace's first bad line."""
        from loadgen import trace

        try:
            rows, problems = trace.read(self.path, self.block_tokens)
        except OSError as e:
            raise ValueError(f"`path`: cannot read the trace {self.path}: {e.strerror or e}") from None
        if problems:
            raise ValueError(f"`path`: {len(problems)} bad line(s) in the trace; first: {problems[0]}")
        if not rows:
            raise ValueError(f"`path`: the trace {self.path} has no request")
        return rows[:self.limit] if self.limit else rows

    def stages(self) -> Shape:
        rows = tuple(self.entries())
        yield StageSpec("trace", self.max_users, None, requests=len(rows), trace=rows, speed=self.speed,
                        block_tokens=self.block_tokens)

    def first_length(self) -> int:
        return self.entries()[0].input_length

    def planned_requests(self, label: str) -> int | None:
        return len(self.entries()) if label == "trace" else None


class MaxContext(_Load):
    kind: Literal["max_context"]
    min_tokens: PositiveInt = 1024
    """A length expected to work (checked first)."""
    max_tokens: PositiveInt = 1 << 20
    """The largest length tried."""
    tolerance: float = Field(0.01, gt=0, lt=1)
    """Stop when (fail − ok) / ok is at most this."""
    requests_per_probe: PositiveInt = 1
    max_probes: PositiveInt = 40

    @model_validator(mode="after")
    def _order(self) -> "MaxContext":
        if self.max_tokens < self.min_tokens:
            raise ValueError("`max_tokens` must be >= `min_tokens`")
        return self

    def stages(self) -> Shape:
        """The plain search; the runner gives it what it learned (:func:`loadgen.shapes.bisect`)."""
        return bisect(self)

    def planned_requests(self, label: str) -> int | None:
        return self.requests_per_probe if label.startswith("probe=") else None


class Conversation(_Load):
    """Multi-turn chat in one stage: ``users`` conversations at a time, each of ``turns``
    requests to ``/v1/chat/completions`` that resend the whole history — every earlier user
    message and the reply the server streamed to it — with a new user message at the end,
    ``think_time_s`` after the previous reply; a new conversation starts when one ends. A
    prefix cache can reuse the history (each record's ``shared_tokens``)."""

    kind: Literal["conversation"]
    conversations: PositiveInt = 8
    """Conversations in all."""
    turns: int = Field(4, ge=1)
    """Requests per conversation."""
    first_tokens: PositiveInt = 4096
    """The first user message (a document, from the scenario's prompt source)."""
    turn_tokens: PositiveInt = 256
    """Each later user message."""
    think_time_s: float = Field(0.0, ge=0)
    """Between a reply's end and the next turn of its conversation."""
    users: PositiveInt = 1
    """Conversations under way at once."""
    warmup_requests: int = Field(0, ge=0)

    @property
    def requests(self) -> int:
        return self.conversations * self.turns

    def stages(self) -> Shape:
        yield StageSpec("conversation", self.users, None, requests=self.requests, conversation=self)

    def first_length(self) -> int:
        return self.first_tokens

    def planned_requests(self, label: str) -> int | None:
        return self.requests if label == "conversation" else None


Load = Annotated[Union[ContextSweep, ConcurrencySweep, Poisson, Trace, Conversation, MaxContext],
                 Field(discriminator="kind")]


# ---- profiling -------------------------------------------------------------------------------

class Profile(_Model):
    """Where a served target's device time goes: after its loads, one prefill and a few decode
    steps at each length, traced by the server's own profiler (vLLM's ``--profiler-config``,
    ssm-server's ``--profile-dir``) and summed by kernel into ``operators.jsonl``. Targets it
    profiles are started with their profiler ready; nothing else pays for it."""

    prompt_tokens: list[PositiveInt] = Field(default_factory=lambda: [4096], min_length=1)
    """The prompt lengths profiled."""
    decode_steps: PositiveInt = 16
    """Decode steps traced per length (after the first token, in a request of its own)."""
    targets: list[str] | None = None
    """Which targets, by name (default: every target ctxload serves; a ``url:`` target's traces
    are out of reach)."""
    keep_traces: bool = False
    """Keep the raw traces under ``profiles/<target>/`` (they are large); by default only the
    per-kernel sums are kept."""


# ---- SLOs, stop conditions, metrics ----------------------------------------------------------

class Stop(_Model):
    max_error_rate: float = Field(1.0, ge=0, le=1)
    """Stop a target's remaining stages after a stage whose error rate exceeds this; a stage
    stops issuing requests once past it (after 20 requests), or after 5 connections refused in
    a row (a dead server is not hammered)."""
    on_slo_violation: bool = False
    """Stop a target's remaining stages after a stage whose median request misses an SLO."""
    max_duration_s: PositiveFloat | None = None
    """Stop the whole run after this many seconds."""


class Metrics(_Model):
    scrape_interval_s: PositiveFloat = 2.0
    """How often every target's ``/metrics`` is scraped into metrics.jsonl."""
    extra_urls: dict[str, str] = Field(default_factory=dict)
    """More exporters to scrape, e.g. ``{gpu: http://127.0.0.1:9400/metrics}``."""
    exporter_port: int | None = Field(None, ge=0, le=65535)
    """Serve the client's own view (``ctxload:`` metrics) on this port (0 = a free one)."""


class Scenario(_Model):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    description: str = ""
    targets: list[Target] = Field(min_length=1)
    api: Literal["completions", "chat"] = "completions"
    prompt: PromptSource = Field(default_factory=SyntheticPrompt)
    output: Output = Field(default_factory=Output)
    load: Load
    then: list[Load] = Field(default_factory=list)
    """More load shapes run on each target after ``load``, in order, while its server is up
    (e.g. a max-context search after a context sweep)."""
    slos: Slos = Field(default_factory=Slos)
    stop: Stop = Field(default_factory=Stop)
    metrics: Metrics = Field(default_factory=Metrics)
    request_timeout_s: PositiveFloat = 600.0
    """A request not finished after this long is recorded as a timeout."""
    memory_budget: str | None = None
    """Device memory each served target may use (``24GiB``), unless its ``serve`` says
    otherwise; the report draws each target's own budget."""
    profile: Profile | None = None
    """An operator breakdown of each served target after its loads (``Profile``)."""
    keep_targets_resident: bool = False
    """Start every served target first and keep them all up for the whole run. By default
    targets run one at a time: start, warm up, run its stages, stop, then the next, so that a
    shared device's memory, power and energy belong to the target that ran."""
    placement: Literal["serial", "by_gpu"] = "serial"
    """``serial``: one target after another. ``by_gpu``: targets on GPUs of their own
    (disjoint ``serve.gpus``) run at the same time, each through all its stages; targets that
    share a GPU, name none or are given by URL run in turn (:mod:`loadgen.placement`)."""

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _size(cls, v):
        return Serve._size(v)

    @field_validator("placement")
    @classmethod
    def _placement_helps(cls, v, info):
        targets = info.data.get("targets")
        if v == "by_gpu" and targets and all(len(w) == 1 for w in placement.group(targets)):
            raise ValueError("by_gpu runs targets on GPUs of their own at once, but no two targets here have "
                             "disjoint `serve.gpus`: give them their GPUs, or leave placement out (serial)")
        return v

    @field_validator("prompt", mode="before")
    @classmethod
    def _synthetic_by_default(cls, v):
        """A prompt section without a ``kind`` is the synthetic source's, as no section is."""
        return {"kind": "synthetic", **v} if isinstance(v, dict) and "kind" not in v else v

    @model_validator(mode="after")
    def _unique_names(self) -> "Scenario":
        names = [t.name for t in self.targets]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"target names must be unique; repeated: {', '.join(dup)}")
        for t in self.targets:
            if t.serve is not None and t.serve.memory_budget is None:
                t.serve.memory_budget = self.memory_budget
        if self.profile is not None and self.profile.targets is not None:
            unknown = [n for n in self.profile.targets if n not in names]
            if unknown:
                raise ValueError(f"profile.targets: no target named {', '.join(unknown)}")
            by_name = {t.name: t for t in self.targets}
            urls = [n for n in self.profile.targets if by_name[n].serve is None]
            if urls:
                raise ValueError(f"profile.targets: {', '.join(urls)} not served by ctxload (a `url:` "
                                 f"target): its server's traces are out of reach")
        return self

    def waves(self) -> list[list["Target"]]:
        """The targets in the groups that run at once, in order (:func:`loadgen.placement.waves`):
        each target alone unless ``placement: by_gpu``."""
        if self.placement != "by_gpu":
            return [[t] for t in self.targets]
        return placement.group(self.targets)

    def profile_of(self, target: "Target") -> Profile | None:
        """The profile pass when it runs on ``target`` (its server starts with a profiler), else None."""
        p = self.profile
        if p is not None and target.serve is not None and (p.targets is None or target.name in p.targets):
            return p
        return None

    def reuses_prefixes(self) -> bool:
        """Whether requests share prompt prefixes (a ``shared_prefix`` source, a trace, a
        conversation): then prefix caching is on for every vLLM target it serves."""
        return self.prompt.shared_prefix is not None or any(
            isinstance(x, (Trace, Conversation)) for x in self.loads())

    def loads(self) -> list:
        """The load shapes in the order they run on each target."""
        return [self.load, *self.then]

    def resolved_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---- loading with readable errors ------------------------------------------------------------

class ScenarioError(ValueError):
    """A scenario that cannot be used; the message names the field and the YAML line."""


def _node_at(node: yaml.Node | None, loc: tuple) -> yaml.Node | None:
    """The deepest YAML node on the path ``loc`` (pydantic's error location)."""
    best = node
    for key in loc:
        if isinstance(key, str) and key in _BRANCHES:
            continue
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if k.value == str(key)), None)
            if nxt is None:  # an unknown field reported under its own name: point at the key
                nxt = next((k for k, _ in node.value if k.value == str(key)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            nxt = node.value[key]
        else:
            nxt = None
        if nxt is None:
            break
        node = best = nxt
    return best


def _format(err: ValidationError, root: yaml.Node | None, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        shown = ".".join(str(p) for p in loc if not (isinstance(p, str) and p in _BRANCHES)) or "(top)"
        node = _node_at(root, loc)
        where = f"{source}:{node.start_mark.line + 1}" if node is not None else source
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{where}: {shown}: {msg}")
    return "\n".join(lines)


#: Names pydantic puts in an error's location for the branch of a union, not a YAML key.
_BRANCHES = {"context_sweep", "concurrency_sweep", "poisson", "trace", "max_context", "synthetic", "file",
             "list[int]", "list[constrained-int]", "Doubling", "function-after[_order(), Doubling]"}


def parse(text: str, source: str = "<scenario>") -> Scenario:
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise ScenarioError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: a scenario is a mapping of fields (name, targets, load, …)")
    try:
        return Scenario.model_validate(data)
    except ValidationError as e:
        raise ScenarioError(_format(e, root, source)) from None


BUILTIN = Path(__file__).resolve().parent / "scenarios"
"""The scenarios shipped with ctxload (package data; ``scenarios/`` in the repository links here):
``ctxload run demo`` finds ``demo.yaml`` there."""


def load(path: str | os.PathLike) -> Scenario:
    p = Path(path)
    if not p.exists():
        builtin = BUILTIN / f"{p.name}.yaml"
        if p.suffix == "" and builtin.exists():
            p = builtin
        else:
            raise ScenarioError(f"{path}: no such scenario file")
    return parse(p.read_text(), str(p))


def coerce(scenario_or_path: Any) -> Scenario:
    if isinstance(scenario_or_path, Scenario):
        return scenario_or_path
    if isinstance(scenario_or_path, dict):
        try:
            return Scenario.model_validate(scenario_or_path)
        except ValidationError as e:
            raise ScenarioError(_format(e, None, "<dict>")) from None
    return load(scenario_or_path)
