"""Which engine served each target, and which targets can fairly be compared.

A figure is as much the engine's as the model's: a Transformer on vLLM with CUDA graphs and
a Mamba2 on ssm-server's transformers backend (eager PyTorch) are not a Transformer against
an SSM. Each target is therefore given its engine and an *engine class*:

- ``serving engine`` — what a deployment runs on a GPU: vLLM with CUDA graphs, ssm-server's
  native mamba_ssm backend;
- ``eager research path`` — on a GPU without CUDA graphs or through eager PyTorch:
  ssm-server's transformers backend, vLLM with ``--enforce-eager``;
- ``portable path (CPU)`` — anything on a CPU (there every engine runs its portable path);
- ``synthetic (no model)`` — a reference server that only sleeps;
- ``unknown`` — the run does not say (never compared).

Where it comes from, first that applies: the latest ``ssm:engine_info`` gauge the target's
server exported (``backend``, ``device``, ``dtype``, ``cuda_graphs`` labels); env.json's
``targets[].launch_args`` (``--backend``, ``--device``, ``--enforce-eager``,
``--no-cuda-graphs``); what a backend can serve (ssm-server's native backend serves only
Mamba2 on CUDA); else it is unknown, and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from analysis.records import RunData
from servers import process

SERVING, EAGER, CPU, SYNTHETIC, UNKNOWN = ("serving engine", "eager research path",
                                           "portable path (CPU)", "synthetic (no model)", "unknown")
INFO_METRIC = "ssm:engine_info"
EAGER_MARK = "⚠"
"""Put beside a target served by an eager research path, in tables and legends."""
NAMES = {"vllm": "vLLM", "ssm-server": "ssm-server", "synthetic": "synthetic"}


@dataclass(frozen=True)
class Engine:
    name: str
    """``vllm``, ``ssm-server``, ``synthetic``, … (env.json, else the records)."""
    label: str
    """For display: ``vLLM``, ``ssm-server (native)``, ``ssm-server (transformers, eager)``."""
    klass: str
    """One of SERVING, EAGER, CPU, SYNTHETIC, UNKNOWN."""
    source: str
    """How it is known: ``ssm:engine_info``, ``launch_args``, an inference, or why unknown."""
    backend: str | None = None
    device: str | None = None

    @property
    def eager(self) -> bool:
        return self.klass == EAGER


def latest_info(run: RunData) -> dict[str, dict[str, str]]:
    """target → the labels of its latest ``ssm:engine_info`` sample (value 1)."""
    out: dict[str, tuple[float, dict[str, str]]] = {}
    for s in run.scrapes:
        for name, labels, value in s.samples:
            if name == INFO_METRIC and value == 1 and (s.target not in out or s.time >= out[s.target][0]):
                out[s.target] = (s.time, labels)
    return {t: labels for t, (_time, labels) in out.items()}


def _model_type(run: RunData, target: str) -> str | None:
    name = run.target_info(target).get("preset")
    if not name:
        return None
    try:
        from servers import presets

        return presets.get(name).model_type
    except Exception:  # unknown or unimportable preset
        return None


def _auto_device(run: RunData) -> bool:
    """Whether ssm-server's default device was ``auto`` in this run (ctxload from 2026-12-02:
    scrapes that name the running target came in with it)."""
    return any(s.resident is not None for s in run.scrapes[:50])


def _ssm_server(run: RunData, target: str, info: dict[str, str] | None, args: list[str] | None) -> Engine:
    e = "ssm-server"
    if info:
        backend, device = info.get("backend", ""), info.get("device", "")
        graphs = info.get("cuda_graphs", "").lower() == "true"
        return _ssm_engine(backend, device, graphs, INFO_METRIC)
    if args is None:
        if not run.env.get("gpus"):
            return Engine(e, "ssm-server (transformers, CPU)", CPU, "no GPU in env.json", "hf", "cpu")
        return Engine(e, "ssm-server (backend unknown)", UNKNOWN,
                      "no ssm:engine_info scrape and no launch arguments in env.json")
    if process.arg_value(args, "--engine") == "synthetic":
        return Engine(e, "ssm-server (synthetic)", SYNTHETIC, "--engine synthetic in launch_args", "synthetic")
    # ssm-server's default device: auto (cuda where the run had a GPU; before 2026-12, cpu)
    device = process.arg_value(args, "--device") or ("cuda" if run.env.get("gpus") and _auto_device(run) else "cpu")
    graphs = "--no-cuda-graphs" not in args
    backend = process.arg_value(args, "--backend") or "auto"
    if backend != "auto":
        return _ssm_engine(backend, device, graphs, f"--backend {backend} in launch_args")
    if device == "cpu":
        return _ssm_engine("hf", device, graphs, "on CPU the transformers backend is the only one")
    mt = _model_type(run, target)
    if mt is not None and mt != "mamba2":
        return _ssm_engine("hf", device, graphs, f"--backend auto with model_type {mt}: "
                                                 "the native backend serves only Mamba2")
    return Engine(e, "ssm-server (backend unknown)", UNKNOWN,
                  "--backend auto on CUDA: native or transformers, depending on whether mamba_ssm "
                  "was installed; no ssm:engine_info scrape says which", None, device)


def _ssm_engine(backend: str, device: str, graphs: bool, source: str) -> Engine:
    e = "ssm-server"
    if backend == "synthetic":
        return Engine(e, "ssm-server (synthetic)", SYNTHETIC, source, backend, device)
    if device.startswith("cpu"):
        return Engine(e, "ssm-server (transformers, CPU)", CPU, source, backend, device)
    if backend == "mamba_ssm":
        if graphs:
            return Engine(e, "ssm-server (native)", SERVING, source, backend, device)
        return Engine(e, "ssm-server (native, no CUDA graphs)", EAGER, source, backend, device)
    if backend == "hf":
        return Engine(e, "ssm-server (transformers, eager)", EAGER, source, backend, device)
    return Engine(e, f"ssm-server ({backend or 'backend unknown'})", UNKNOWN, source, backend, device)


def _vllm(run: RunData, args: list[str] | None) -> Engine:
    if not run.env.get("gpus") or (args and process.arg_value(args, "--device") == "cpu"):
        return Engine("vllm", "vLLM (CPU)", CPU, "no GPU in env.json", None, "cpu")
    if args is None:
        return Engine("vllm", "vLLM", SERVING, "launch arguments not recorded: vLLM's default "
                      "(CUDA graphs) assumed", None, "cuda")
    if "--enforce-eager" in args:
        return Engine("vllm", "vLLM (enforce-eager)", EAGER, "--enforce-eager in launch_args", None, "cuda")
    return Engine("vllm", "vLLM", SERVING, "launch_args without --enforce-eager", None, "cuda")


def identify(run: RunData) -> dict[str, Engine]:
    """Every target's :class:`Engine`."""
    info = latest_info(run)
    out = {}
    for t in run.targets():
        ti = run.target_info(t)
        name = ti.get("engine") or next((r.engine for r in run.requests if r.target == t and r.engine), "")
        args = ti.get("launch_args")
        args = [str(a) for a in args] if isinstance(args, list) else None
        if t in info or name == "ssm-server":
            out[t] = _ssm_server(run, t, info.get(t), args)
        elif name == "vllm":
            out[t] = _vllm(run, args)
        elif name == "synthetic":
            out[t] = Engine(name, "synthetic", SYNTHETIC, "engine synthetic", "synthetic")
        elif name:
            klass = CPU if not run.env.get("gpus") else UNKNOWN
            out[t] = Engine(name, NAMES.get(name, name), klass, "no backend information for this engine")
        else:
            out[t] = Engine("", "engine unknown", UNKNOWN, "no engine in env.json or the records")
    return out


def tag(target: str, engines: dict[str, Engine]) -> str:
    """``qwen2.5-0.5b · vLLM``; an eager research path gets the mark:
    ``falcon-h1-0.5b · ssm-server (transformers, eager) ⚠``."""
    e = engines.get(target)
    if e is None:
        return target
    return f"{target} · {e.label}" + (f" {EAGER_MARK}" if e.eager else "")


def comparable(a: str, b: str, engines: dict[str, Engine]) -> tuple[bool, str]:
    """Whether targets ``a`` and ``b`` ran on the same engine class, and the answer in words
    (``yes — both serving engine``; ``no — eager research path vs serving engine``)."""
    ea, eb = engines.get(a), engines.get(b)
    ka = ea.klass if ea else UNKNOWN
    kb = eb.klass if eb else UNKNOWN
    if UNKNOWN in (ka, kb):
        who = " and ".join(t for t, k in ((a, ka), (b, kb)) if k == UNKNOWN)
        return False, f"no — the engine backend of {who} is unknown"
    if ka == kb:
        return True, f"yes — both {ka}"
    return False, f"no — {ka} vs {kb}"


def not_comparable_why(targets: list[str], engines: dict[str, Engine]) -> str:
    """Why a claim over ``targets`` (of mixed engine classes) cannot be decided, naming each:
    ``only an eager-path qwen2.5-0.5b (ssm-server (transformers, eager)) against a
    serving-engine mamba2-780m (ssm-server (native))``."""
    words = {SERVING: "a serving-engine", EAGER: "an eager-path", CPU: "a CPU", SYNTHETIC: "a synthetic"}
    unknown = [t for t in targets if engines.get(t) is None or engines[t].klass == UNKNOWN]
    if unknown:
        return ("the engine backend of " + " and ".join(unknown)
                + " is unknown (see the Engines table): not compared")
    order = [EAGER, CPU, SYNTHETIC, SERVING]
    groups = [", ".join(f"{words[k]} {t} ({engines[t].label})" for t in targets if engines[t].klass == k)
              for k in order]
    return "only " + " against ".join(g for g in groups if g) + ": different engine classes, not compared"


def notes(engines: dict[str, Engine], on_gpu: bool) -> list[str]:
    """The notes the report shows at its top: eager targets on a GPU, CPU-only runs, unknown
    backends."""
    out = []
    eager = [t for t, e in engines.items() if e.klass == EAGER]
    if eager:
        out.append(f"{EAGER_MARK} Eager research path: " + ", ".join(f"{t} ({engines[t].label})" for t in eager)
                   + (" was" if len(eager) == 1 else " were") + " served on a GPU without a serving "
                   "engine's fast path (eager PyTorch or no CUDA graphs). Their figures show that path, "
                   "not what a deployment would see; tables say which pairs are comparable and the claims "
                   "table decides nothing from a pair on different engine classes.")
    cpu = [t for t, e in engines.items() if e.klass == CPU]
    if cpu and len(cpu) == len(engines):
        out.append("CPU run: every target ran on the CPU, where every engine runs its portable path; "
                   "the figures compare families on this CPU, not serving engines on a GPU.")
    elif cpu and on_gpu:
        out.append("On CPU: " + ", ".join(cpu) + " (portable path), not compared with GPU targets.")
    unknown = [t for t, e in engines.items() if e.klass == UNKNOWN]
    if unknown:
        out.append("Engine backend unknown: " + "; ".join(f"{t} ({engines[t].source})" for t in unknown)
                   + ". Comparisons involving " + ("it" if len(unknown) == 1 else "them")
                   + " are not decided.")
    return out


def prefix_caching(args: list[str]) -> str | None:
    """vLLM's prefix-cache setting, as its command line says (the last flag wins), with the
    Mamba cache mode where one is given; None for a command line that is not vLLM's."""
    flags = [a for a in args if a in ("--enable-prefix-caching", "--no-enable-prefix-caching")]
    if not flags:
        return None
    if flags[-1] == "--no-enable-prefix-caching":
        return "vLLM prefix caching off"
    mode = process.arg_value(args, "--mamba-cache-mode")
    return "vLLM prefix caching on" + (f", Mamba cache mode {mode}" if mode else "")
