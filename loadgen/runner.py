"""Run a scenario headless with Locust and write its run directory (docs/contracts.md §4).

Importing this module imports Locust, which monkey-patches the process with gevent: import it
at the start of a process that runs load (``ctxload run``, ``ctxload demo``), not from a test
process — tests run ``ctxload run`` as a subprocess.

For each target in turn, the load shape's generator yields stages; for each stage the runner
sets Locust's user count, opens the stage in the controller (which hands out jobs until the
stage's request budget or duration is spent) and waits for the last request to end.  Under
``placement: by_gpu`` the targets of a wave (GPUs of their own, loadgen.placement) run at the
same time, each with its own Locust runner and controller in this process, writing into the
one ``requests.jsonl``; stage indices stay unique across the run.  Records
are appended to ``requests.jsonl`` as each request ends; ``metrics.jsonl`` gets a scrape of
every target on an interval.  With ``processes > 1`` the users run in Locust worker processes
(loadgen.distributed) and their records travel back to this one.
"""

from __future__ import annotations

from locust.env import Environment  # first: Locust's gevent monkey-patching

import contextlib
import dataclasses
import datetime as dt
import gc
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

import gevent

from loadgen import scenario as sc
from loadgen import exporter, shapes, targets
from loadgen.controller import REFUSED_IN_A_ROW, Controller, Stage
from loadgen.exporter import ClientMetrics
from loadgen.progress import Progress
from loadgen.job import Job
from loadgen.records import RecordWriter
from loadgen.scrape import Scraper, ScraperProcess
from loadgen.user import SPARE, StreamingUser
from rundir.max_context import MaxContextRecord
from servers.process import ServerFailed


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _packages() -> dict:
    out = {}
    for name in ("ctxload", "torch", "transformers", "locust", "aiohttp", "pydantic", "prometheus-client",
                 "numpy", "geventhttpclient"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def _memory_bytes() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def _gpus() -> list[dict]:
    with contextlib.suppress(Exception):
        import pynvml  # optional

        pynvml.nvmlInit()
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            out.append({"name": name.decode() if isinstance(name, bytes) else name,
                        "memory_total_bytes": pynvml.nvmlDeviceGetMemoryInfo(h).total,
                        "driver": str(pynvml.nvmlSystemGetDriverVersion())})
        return out
    return []


def write_env(path: Path, run_id: str, started: str, live: list, finished: str | None = None,
              earlier: list | None = None) -> None:
    env = {"schema_version": 1, "run_id": run_id, "ctxload_version": _packages().get("ctxload"),
           "started_at": started, "finished_at": finished,
           "host": {"hostname": socket.gethostname(), "platform": platform.platform(),
                    "cpu_count": os.cpu_count(), "memory_bytes": _memory_bytes()},
           "python": sys.version.split()[0], "packages": _packages(), "gpus": _gpus(),
           "targets": [t.describe() for t in live]}
    if earlier:
        env["earlier"] = earlier  # the sessions this run was resumed from, oldest first
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(env, indent=2))
    tmp.replace(path)


def new_run_id(name: str) -> str:
    return f"{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{name}"


def _tick(prog: Progress) -> None:
    while True:
        gevent.sleep(1.0)
        prog.tick()


def _job_base(scenario: sc.Scenario, lt: targets.LiveTarget) -> Job:
    prompt = scenario.prompt
    return {"target": lt.name, "url": lt.url, "model": lt.spec.model, "family": lt.spec.family,
            "engine": lt.spec.engine, "api": scenario.api, "max_tokens": scenario.output.max_tokens,
            "ignore_eos": scenario.output.ignore_eos, "api_key_env": lt.spec.api_key_env,
            "timeout_s": scenario.request_timeout_s, "tokenizer": lt.tokenizer(),
            "prompt_path": getattr(prompt, "path", None), "unique_prefix": prompt.unique_prefix,
            "shared_prefix": prompt.shared_prefix.model_dump() if prompt.shared_prefix else None}


def _slo_missed(scenario: sc.Scenario, res: shapes.StageResult) -> str | None:
    s = scenario.slos
    for name, have, bound in (("ttft_s", res.ttft_p50, s.ttft_s), ("tpot_s", res.tpot_p50, s.tpot_s),
                              ("itl_s", res.itl_p99, s.itl_s)):
        if bound is not None and have is not None and have > bound:
            return f"{name} {have:.4g} > {bound:g}"
    return None


def run(scenario_or_path, runs_dir="runs", run_id=None, progress=print, *, processes: int = 1,
        target_urls: dict[str, str] | None = None, master_bind_host: str = "127.0.0.1",
        master_port: int | None = None, external_workers: int = 0, web_port: int | None = None,
        resume: str | os.PathLike | None = None, live_line: bool | None = None) -> Path:
    """Run the scenario; return the run directory.

    ``processes > 1`` spawns that many local Locust workers; ``external_workers = N`` instead
    waits for N workers started elsewhere to connect to ``master_bind_host:master_port``.
    ``web_port`` serves Locust's web UI there (on ``master_bind_host``).
    ``progress`` takes the run's log lines; ``live_line`` draws a live line per stage under them
    (default: when they go to a terminal through ``print``).
    ``resume``: a run directory to go on with (its own scenario; ``scenario_or_path`` unused):
    targets it completed are skipped, and the stages a target already ran in full are not run
    again (after its warm-up)."""
    say = progress or (lambda *_: None)
    hub = gevent.get_hub()  # a Ctrl-C still stops the run; gevent need not print it as an error
    hub.NOT_ERROR = tuple({*hub.NOT_ERROR, KeyboardInterrupt})
    started = _now_iso()
    past = Resumed.read(Path(resume)) if resume else Resumed()
    if resume:
        run_dir = Path(resume)
        run_id = run_dir.name
        scenario = sc.load(run_dir / "scenario.yaml")
        say(f"run {run_id}: resuming {scenario.name} in {run_dir} ({len(past.completed)} target(s) done)")
    else:
        scenario = sc.coerce(scenario_or_path)
        run_id = run_id or new_run_id(scenario.name)
        run_dir = Path(runs_dir) / run_id
        if run_dir.exists() and any(run_dir.iterdir()):
            raise FileExistsError(f"run directory {run_dir} already exists and is not empty "
                                  f"(`ctxload run --resume {run_dir}` goes on with it)")
    if target_urls:
        scenario = override_urls(scenario, target_urls)
    if scenario.placement == "by_gpu" and (processes > 1 or external_workers):
        raise sc.ScenarioError("placement: by_gpu runs the targets of a wave at once in this process; it cannot "
                               "be combined with --processes or --external-workers (distributed users)")
    if not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "scenario.yaml").write_text(scenario.resolved_yaml())
        say(f"run {run_id}: {scenario.name} → {run_dir}")
    writer = RecordWriter(run_dir / "requests.jsonl")
    metrics = ClientMetrics()
    controller = Controller(writer, on_record=metrics.record)
    if live_line is None:
        live_line = progress is print and sys.stdout.isatty()
    prog = Progress(controller, say, live=live_line)
    say = prog.message
    greenlets = []
    with contextlib.ExitStack() as stack:
        stack.callback(prog.close)
        stack.callback(writer.close)
        live = targets.prepare(scenario, say)
        save_env = lambda **kw: write_env(run_dir / "env.json", run_id, started, live,  # noqa: E731
                                          earlier=past.earlier, **kw)
        if scenario.placement == "by_gpu":
            for i, wave in enumerate(_waves(scenario, live)):
                for lt in wave:
                    lt.wave = i
        for lt in live:
            if lt.name in past.completed:
                lt.completed, lt.before = True, past.targets.get(lt.name)
        if scenario.keep_targets_resident:
            for lt in live:
                if lt.completed:
                    continue
                targets.start(lt, stack, run_dir, say, profile=scenario.profile_of(lt.spec),
                              reuse=scenario.reuses_prefixes())
        save_env()
        exporter_port = exporter.port_override()
        if exporter_port is None:
            exporter_port = scenario.metrics.exporter_port
        if exporter_port is not None:
            port = metrics.serve(exporter_port)
            stack.callback(metrics.close)
            say(f"client metrics on http://{exporter.bind_host()}:{port}/metrics")
        sources = _exporter_sources(scenario)
        stage_file = Path(tempfile.mkdtemp(prefix="ctxload-")) / "stage"
        scraper = ScraperProcess(run_dir / "metrics.jsonl", sources, scenario.metrics.scrape_interval_s, stage_file)
        scraper.set_stage(None, resident=_resident(live))
        stack.callback(shutil.rmtree, stage_file.parent, True)
        stack.callback(scraper.close)
        env = Environment(user_classes=[StreamingUser])
        env.ctxload = controller
        if processes > 1 or external_workers:
            from loadgen import distributed

            workers = external_workers or processes
            runner = distributed.start_master(env, controller, workers, stack, say, bind_host=master_bind_host,
                                              port=master_port, spawn_local=not external_workers, wait_s=0)
        else:
            runner = env.create_local_runner()
        stack.callback(SPARE.drain)  # after the users stop (LIFO): their queued records, then the writer closes
        stack.callback(runner.quit)
        if web_port is not None:  # up while the master waits for its workers
            # Locust's UI parses sys.argv with its own parser (ui_extra_args_dict) on every page:
            # ours are not its options, so it would exit the process.
            sys.argv = sys.argv[:1]
            web = env.create_web_ui(host=master_bind_host, port=web_port)
            stack.callback(web.stop)
            say(f"Locust web UI on http://{master_bind_host}:{web_port}/")
        if processes > 1 or external_workers:
            distributed.wait_for_workers(runner, workers, 3600.0 if external_workers else 120.0)
        greenlets.append(gevent.spawn(_tick, prog))
        stack.callback(lambda: gevent.killall(greenlets, block=False))
        run_deadline = (time.monotonic() + scenario.stop.max_duration_s) if scenario.stop.max_duration_s else None
        gc.collect()
        gc.freeze()  # setup's objects leave the collector's view: fewer, shorter pauses mid-stream
        base = _Ctx(scenario, runner, controller, metrics, scraper, prog, say, run_dir, run_deadline, live,
                    _Indices(past.next_stage_index), save_env)
        for wave in _waves(scenario, live):
            todo = []
            for lt in wave:
                if lt.completed:
                    say(f"{lt.name}: completed earlier in this run; skipped")
                else:
                    todo.append(lt)
            if not todo:
                continue
            if run_deadline and time.monotonic() > run_deadline:
                say(f"{', '.join(lt.name for lt in todo)}: not run: the run's max_duration_s is spent")
                break
            if len(todo) > 1:
                for c in _run_wave(base, todo, past):  # the run's totals count the wave's requests too
                    controller.total += c.total
                    controller.errors += c.errors
                continue
            (lt,) = todo
            with contextlib.ExitStack() as own:  # stops the target after its stages (unless resident)
                if not _start(base, lt, own):
                    continue
                lt.completed = _run_target(base.of(lt, past), lt)
                base.leave(lt)
            scraper.set_stage(None, resident=_resident(live))
            save_env()
        controller.stopping = True
        scraper.close(final=True)
        save_env(finished=_now_iso())
        say(f"done: {controller.total} requests, {controller.errors} errors; run directory {run_dir}")
    return run_dir


def _prepare(stage: Stage, runner=None) -> None:
    """Build the stage's prompt bodies now, while nothing is in flight: a long prompt built
    inside a user would stall the event loop that times every other stream."""
    from loadgen.controller import build_prompt

    spec = stage.spec
    lengths = [spec.prompt_tokens] if spec.prompt_tokens else [n for n, _ in spec.mix]
    if spec.trace:  # its builder, at least (each request's blocks are its own)
        lengths = [spec.trace[0].input_length]
    if spec.conversation:
        lengths = [spec.conversation.first_tokens, spec.conversation.turn_tokens]
    jobs = [dict(stage.base, prompt_tokens=n, seq=0) for n in lengths]
    for job in jobs:
        build_prompt(job)
    if hasattr(runner, "ctxload_prepare"):  # distributed: the workers build them too
        runner.ctxload_prepare(jobs)


def spawn_rate(users: int, now: int) -> int:
    """Users started or stopped per second as a stage opens with ``users`` where ``now`` run:
    all within about a second, at most 100 a second. Locust stops users at the spawn rate too:
    rated by the new count alone, 64 streams down to a warm-up's one took 63 s."""
    return min(max(users, now, 1), 100)


def _run_stage(runner, controller, stage: Stage, users: int, timeout_s: float) -> None:
    _prepare(stage, runner)
    # What _prepare loaded the first time (transformers and a tokenizer: ~10^6 objects) leaves
    # the collector's view too; left in it, the first full collection mid-stage took 190 ms,
    # holding every stream's reads (2026-11-30, 200 streams).
    gc.collect()
    gc.freeze()
    runner.start(users, spawn_rate=spawn_rate(users, runner.user_count))  # the stage opens once all are up
    if getattr(runner, "spawning_greenlet", None) is not None:
        runner.spawning_greenlet.join()
    controller.open(stage)
    limit = (stage.spec.duration_s or 0) + timeout_s * max(1, (stage.spec.requests or 1)) + 60
    if not stage.done.wait(limit):
        stage.closed = True
    controller.close()


@dataclass
class Learned:
    """What the stages a target served in full taught the max-context search after them."""

    known_ok: int = 0
    """The longest prompt every request of a stage got through on this target so far: a
    max-context search after a sweep starts above it."""
    served: dict = field(default_factory=dict)
    """Prompt length -> the longest request (s) of a batch-1 stage this target served in full:
    what a max-context probe's deadline is extrapolated from (``shapes.probe_timeout``)."""

    def learn(self, spec: shapes.StageSpec, res: shapes.StageResult, probe: bool) -> None:
        """What a stage served in full teaches the searches after it."""
        if not (spec.prompt_tokens and res.requests and res.ok == res.requests):
            return
        if not probe:
            self.known_ok = max(self.known_ok, spec.prompt_tokens)
        if spec.users == 1 and res.e2e_max:
            self.served[spec.prompt_tokens] = max(self.served.get(spec.prompt_tokens, 0.0), res.e2e_max)


@dataclass
class _Ctx:
    """What every stage of the run needs."""

    scenario: sc.Scenario
    runner: object
    controller: Controller
    metrics: ClientMetrics
    scraper: ScraperProcess
    prog: Progress
    say: object
    run_dir: Path
    run_deadline: float | None
    live: list
    indices: "_Indices"
    save_env: Callable[..., None]
    """Rewrites env.json (``finished=`` the end's time)."""
    done: set = field(default_factory=set)
    """Stage labels this target ran in full earlier in a resumed run: not run again."""
    learned: Learned = field(default_factory=Learned)
    wave: "_Wave | None" = None
    """Targets running at once: what they share; None when targets run one at a time."""

    def of(self, lt: targets.LiveTarget, past: "Resumed", **kw) -> "_Ctx":
        """This context for ``lt``'s stages: what an earlier session of the run left of them."""
        return dataclasses.replace(self, done=past.stages_done.get(lt.name, set()),
                                   learned=past.learned.get(lt.name) or Learned(), **kw)

    def resident(self) -> dict:
        """The servers up now, less those a wave is done with (stopping)."""
        out = _resident(self.live)
        if self.wave is not None and not self.scenario.keep_targets_resident:
            out = {k: v for k, v in out.items() if k not in self.wave.left}
        return out

    def set_stage(self, lt: targets.LiveTarget, label: str, index: int) -> None:
        if self.wave is None:
            self.scraper.set_stage(label, target=lt.name, index=index, resident=self.resident())
            return
        self.wave.running[lt.name] = {"stage": label, "stage_index": index}
        self.scraper.set_stage(None, stages=dict(self.wave.running), resident=self.resident())

    def leave(self, lt: targets.LiveTarget) -> None:
        """``lt`` runs no more stages: the scraper leaves its server alone before it stops."""
        if self.wave is None:
            self.scraper.set_stage(None, resident={k: v for k, v in self.resident().items()
                                                   if k != lt.name or self.scenario.keep_targets_resident})
            return
        self.wave.running.pop(lt.name, None)
        self.wave.left.add(lt.name)
        self.scraper.set_stage(None, stages=dict(self.wave.running), resident=self.resident())

    def scrape_now(self, lt: targets.LiveTarget, label: str, index: int) -> None:
        """One scrape as a stage ends, while nothing of it is in flight: a stage shorter than
        the scrape interval still has its readings. Every source; in a wave, the exporters and
        ``lt``'s own server (the others are mid-stage: their pages are not parsed in this loop)."""
        if self.wave is None:
            state = {"stage": label, "stage_target": lt.name, "stage_index": index, "resident": self.resident()}
            servers = None
        else:
            state, servers = {"stages": dict(self.wave.running), "resident": self.resident()}, {lt.name}
        one = Scraper(self.run_dir / "metrics.jsonl", _exporter_sources(self.scenario), stage=lambda: state,
                      servers=servers)
        try:
            one.once()
        finally:
            one.close()


@dataclass
class _Wave:
    """What the targets of a wave (running at once) share."""

    running: dict = field(default_factory=dict)
    """Each running target's stage: ``{target: {"stage", "stage_index"}}`` (the scraper's ``stages``)."""
    left: set = field(default_factory=set)
    """Targets done with their stages: their servers are no longer scraped."""


@dataclass
class _Indices:
    """Stage indices, unique across the run (targets running at once take them in turn)."""

    next: int = 0

    def take(self) -> int:
        self.next += 1
        return self.next - 1


@dataclass
class Resumed:
    """What an earlier session of a run left: targets completed, stages run in full."""

    completed: set = field(default_factory=set)
    targets: dict = field(default_factory=dict)
    stages_done: dict = field(default_factory=dict)
    next_stage_index: int = 0
    earlier: list = field(default_factory=list)
    learned: dict = field(default_factory=dict)
    """Target -> what its stages served in full taught."""

    @classmethod
    def read(cls, run_dir: Path) -> "Resumed":
        if not (run_dir / "scenario.yaml").exists():
            raise FileExistsError(f"--resume {run_dir}: not a run directory (no scenario.yaml)")
        out = cls()
        env = {}
        with contextlib.suppress(OSError, ValueError):
            env = json.loads((run_dir / "env.json").read_text())
        for t in env.get("targets") or []:
            out.targets[t.get("name")] = t
            if t.get("completed"):
                out.completed.add(t.get("name"))
        out.earlier = list(env.get("earlier") or []) + ([{k: v for k, v in env.items()
                                                          if k not in ("targets", "earlier")}] if env else [])
        counts: dict = {}
        stages: dict = {}
        with contextlib.suppress(OSError):
            for line in (run_dir / "requests.jsonl").read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    r = json.loads(line)
                    out.next_stage_index = max(out.next_stage_index, int(r.get("stage_index") or 0) + 1)
                    key = (r["target"], r["stage"])
                    counts[key] = counts.get(key, 0) + 1
                    stages.setdefault((r["target"], r["stage"], r.get("stage_index")), []).append(r)
        scenario = sc.load(run_dir / "scenario.yaml")
        for (t, label), n in counts.items():
            planned = next((k for load in scenario.loads() if (k := load.planned_requests(label)) is not None), None)
            if label != "warmup" and planned is not None and n >= planned:
                out.stages_done.setdefault(t, set()).add(label)
        for (t, label, _), recs in stages.items():
            n = recs[0].get("prompt_tokens_requested")
            if label == "warmup" or not isinstance(n, int):
                continue
            users = max(int(r.get("concurrency") or 1) for r in recs)
            spec = shapes.StageSpec(label, users, n)
            ok = [r for r in recs if r.get("status") == "ok"]
            res = shapes.StageResult(requests=len(recs), ok=len(ok),
                                     e2e_max=max((r["e2e_s"] for r in ok if r.get("e2e_s")), default=None))
            out.learned.setdefault(t, Learned()).learn(spec, res, probe=label.startswith("probe="))
        return out


def _exporter_sources(scenario: sc.Scenario) -> list[tuple[str, str, str]]:
    """The scenario's extra exporters, scraped always: (name, source kind, URL)."""
    return [(n, "gpu" if "gpu" in n else "server", u) for n, u in scenario.metrics.extra_urls.items()]


def _resident(live: list[targets.LiveTarget]) -> dict:
    """The targets up now, with the URL to scrape and the server's process group."""
    return {lt.name: {"url": lt.url, "pid": lt.pid} for lt in live if lt.url and lt.running}


def _start(ctx: _Ctx, lt: targets.LiveTarget, stack: contextlib.ExitStack) -> bool:
    """Start ``lt``'s server (its stop entered on ``stack``); False, with why in env.json,
    when it did not start."""
    try:
        targets.start(lt, stack, ctx.run_dir, ctx.say, profile=ctx.scenario.profile_of(lt.spec),
                      reuse=ctx.scenario.reuses_prefixes())
        return True
    except ServerFailed as e:
        lt.error = str(e).splitlines()[0]
        ctx.say(f"{lt.name}: not run: {e}")
        return False
    finally:
        ctx.save_env()
        ctx.scraper.set_stage(None, resident=_resident(ctx.live))


def _waves(scenario: sc.Scenario, live: list[targets.LiveTarget]) -> list[list[targets.LiveTarget]]:
    """The live targets in the scenario's waves (:meth:`loadgen.scenario.Scenario.waves`)."""
    by_name = {lt.name: lt for lt in live}
    return [[by_name[t.name] for t in wave] for wave in scenario.waves()]


def _run_wave(base: _Ctx, wave: list[targets.LiveTarget], past: "Resumed") -> list[Controller]:
    """Start the wave's targets one after another, then run them all at once, each through
    its stages with a Locust runner, a controller and a progress log of its own; each stops
    when its stages are done. Returns their controllers (the run's totals)."""
    say = base.say
    say(f"{', '.join(lt.name for lt in wave)}: at the same time, on GPUs of their own (placement: by_gpu)")
    shared = _Wave()
    controllers, jobs = [], []
    with contextlib.ExitStack() as stack:
        for lt in wave:
            own = stack.enter_context(contextlib.ExitStack())  # its server, stopped after its stages
            if not _start(base, lt, own):
                continue
            controller = Controller(base.controller.writer, on_record=base.metrics.record)
            env = Environment(user_classes=[StreamingUser])
            env.ctxload = controller
            runner = env.create_local_runner()
            own.callback(runner.quit)  # before its server stops (last in, first out)
            prog = Progress(controller, say, live=False)
            own.callback(prog.close)
            controllers.append(controller)
            jobs.append((base.of(lt, past, runner=runner, controller=controller, prog=prog, wave=shared), lt, own))
        ticks = [gevent.spawn(_tick, ctx.prog) for ctx, _, _ in jobs]
        running = [gevent.spawn(_run_in_wave, ctx, lt, own) for ctx, lt, own in jobs]
        try:
            gevent.joinall(running, raise_error=True)
        finally:
            gevent.killall(running + ticks)
            for c in controllers:
                c.stopping = True
    base.scraper.set_stage(None, resident=_resident(base.live))
    base.save_env()
    return controllers


def _run_in_wave(ctx: _Ctx, lt: targets.LiveTarget, own: contextlib.ExitStack) -> None:
    lt.completed = _run_target(ctx, lt)
    ctx.leave(lt)
    own.close()
    ctx.save_env()


def _run_target(ctx: _Ctx, lt: targets.LiveTarget) -> bool:
    """Warm the target up, then run each load of the scenario on it in turn; whether every
    load ran to its end."""
    base = _job_base(ctx.scenario, lt)
    loads = ctx.scenario.loads()
    first = loads[0]
    spec = first.warmup()
    if spec is not None:
        index = ctx.indices.take()
        ctx.set_stage(lt, spec.label, index)
        ctx.prog.stage(f"{lt.name} warmup", spec.requests)
        _run_stage(ctx.runner, ctx.controller, Stage(spec, index, base), 1, ctx.scenario.request_timeout_s)
        ctx.prog.end_stage()
        ctx.scrape_now(lt, spec.label, index)
    for load in loads:
        _run_load(ctx, lt, load, base)
        if isinstance(load, sc.MaxContext):
            ctx.learned.known_ok = 0
        if run_deadline_passed(ctx) or not lt.alive():
            return False
    if ctx.scenario.profile_of(lt.spec) is not None:
        _profile_target(ctx, lt, base)
    return True


def _profile_target(ctx: _Ctx, lt: targets.LiveTarget, base: dict) -> None:
    """The scenario's profile pass on ``lt`` (loadgen.profiling): a line of operators.jsonl
    per length × phase, written as each is taken."""
    from loadgen import profiling
    from loadgen.controller import build_prompt

    p, say = ctx.scenario.profile, ctx.say
    where = targets.trace_dir(ctx.run_dir, lt.name)
    prof = profiling.Profiler(lt.url, lt.spec.model, where, chat=ctx.scenario.api == "chat",
                              headers=profiling.auth_headers(lt.spec.api_key_env),
                              timeout_s=ctx.scenario.request_timeout_s)
    room = profiling.decode_tokens(p.decode_steps)  # what the decode request asks for
    for n in p.prompt_tokens:
        for phase in ("prefill", "decode"):
            label = f"profile={n} {phase}"
            err = None
            if lt.max_model_len and n + room > lt.max_model_len:
                err = f"not profiled: {n:,} + {room} tokens exceed the server's max_model_len {lt.max_model_len:,}"
            elif lt.spec.max_prompt_tokens and n > lt.spec.max_prompt_tokens:
                err = f"not profiled: longer than the target's max_prompt_tokens {lt.spec.max_prompt_tokens:,}"
            elif not lt.alive() or run_deadline_passed(ctx):
                err = "not profiled: its server has exited" if not lt.alive() else \
                    "not profiled: the run's max_duration_s is spent"
            rec = None
            if err is None:
                stage_index = ctx.indices.take()
                ctx.set_stage(lt, label, stage_index)
                ctx.prog.stage(f"{lt.name} {label}", 1)
                # a prompt of its own, shared with nothing: a cached prefix is no prefill to trace
                prompt = build_prompt(dict(base, prompt_tokens=n, seq=stage_index, shared_prefix=None))
                prefix = f"{lt.name}.{n}-{phase}"
                try:
                    w, files = prof.prefill(prompt, prefix) if phase == "prefill" else \
                        prof.decode(prompt, p.decode_steps, prefix,
                                    room=lt.max_model_len - n - 1 if lt.max_model_len else None)
                    rec = profiling.line(lt.name, lt.spec.engine, n, phase, window=w, files=files)
                    rec["traces"] = profiling.keep_or_delete(files, p.keep_traces, where / f"{n}-{phase}")
                except profiling.ProfileError as e:
                    err = str(e)
                ctx.prog.end_stage()
            if rec is None:
                rec = profiling.line(lt.name, lt.spec.engine, n, phase, error=err)
            with open(ctx.run_dir / "operators.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            say(f"{lt.name} {label}: " + (rec["error"] or profiling.summary(rec)))


def _run_load(ctx: _Ctx, lt: targets.LiveTarget, load, base: dict) -> str | None:
    scenario, runner, controller, metrics, prog, say = (ctx.scenario, ctx.runner, ctx.controller, ctx.metrics,
                                                        ctx.prog, ctx.say)
    cap = lt.spec.max_prompt_tokens
    search = shapes.Search() if isinstance(load, sc.MaxContext) else None
    if search is not None:
        # the server's own limit, when it declares one, is probed first: two probes then
        # settle the search instead of a bisection over long prompts
        hint = lt.max_model_len - scenario.output.max_tokens if lt.max_model_len else None
        gen = shapes.bisect(load, search, hint=hint, cap=cap, known_ok=ctx.learned.known_ok or None)
    else:
        gen = load.for_target(lt.spec).stages()
    res = None
    stop_reason = None
    try:
        spec = next(gen)
        while True:
            if run_deadline_passed(ctx):
                stop_reason = "the run's max_duration_s is spent"
                break
            if not lt.alive():
                stop_reason = "its server has exited"
                break
            if search is None and ((cap and spec.prompt_tokens and spec.prompt_tokens > cap) or spec.label in ctx.done):
                spec = gen.send(None)  # past the target's max_prompt_tokens, or run in full before
                continue
            if lt.max_model_len and spec.prompt_tokens and spec.prompt_tokens + scenario.output.max_tokens > lt.max_model_len \
                    and search is None:
                say(f"{lt.name}: {spec.label} exceeds the server's max_model_len {lt.max_model_len}; sent anyway")
            stage_index = ctx.indices.take()
            ctx.set_stage(lt, spec.label, stage_index)
            metrics.stage(lt.name, spec.label, spec.users, spec.prompt_tokens)
            say(f"{lt.name} stage {stage_index} {spec.label}: {spec.users} users")
            prog.stage(f"{lt.name} {spec.label}", spec.requests if spec.duration_s is None else None, spec.duration_s)
            timeout_s = scenario.request_timeout_s
            if search is not None and spec.prompt_tokens:
                timeout_s = shapes.probe_timeout(ctx.learned.served, spec.prompt_tokens, timeout_s)
            stage = Stage(spec, stage_index, dict(base, timeout_s=timeout_s),
                          max_error_rate=scenario.stop.max_error_rate if search is None else 1.0)
            _run_stage(runner, controller, stage, spec.users, timeout_s)
            prog.end_stage()
            ctx.scrape_now(lt, spec.label, stage_index)
            res = stage.result(scenario.slos)
            say(_summary(lt.name, spec.label, res))
            if stage.stopped:
                say(f"{lt.name} {spec.label}: stopped early: {stage.stopped}")
            if stage.refused >= REFUSED_IN_A_ROW:
                stop_reason = f"its server refuses connections ({stage.stopped})"
                break
            ctx.learned.learn(spec, res, probe=search is not None)
            if res.crashed and not lt.alive():
                stop_reason = "its server crashed (connection lost)"
                break
            if search is None and res.error_rate > scenario.stop.max_error_rate:
                stop_reason = f"error rate {res.error_rate:.0%} > max_error_rate {scenario.stop.max_error_rate:g}"
                break
            missed = _slo_missed(scenario, res) if scenario.stop.on_slo_violation and search is None else None
            if missed:
                stop_reason = f"SLO missed: {missed}"
                break
            spec = gen.send(res)
    except StopIteration:
        pass
    if stop_reason:
        say(f"{lt.name}: no more stages: {stop_reason}")
    if search is not None:
        out = MaxContextRecord(
            target=lt.name, max_ok_tokens=search.max_ok, min_fail_tokens=search.min_fail,
            failure_kind=search.failure_kind, crashed=search.crashed, converged=search.converged,
            tolerance=load.tolerance, max_tried_tokens=search.max_tried, server_max_model_len=lt.max_model_len,
            known_ok_tokens=search.known_ok, probes=search.probes, stopped=stop_reason)
        with open(ctx.run_dir / "max_context.jsonl", "a") as f:
            f.write(json.dumps(out.to_json()) + "\n")
        crash = " — connection lost (crash); not hit again" if search.crashed else ""
        say(f"{lt.name}: max context {search.max_ok} tokens (first failure {search.min_fail}: "
            f"{search.failure_kind}){crash}")
    return stop_reason


def run_deadline_passed(ctx: _Ctx) -> bool:
    return bool(ctx.run_deadline and time.monotonic() > ctx.run_deadline)


def _summary(target: str, label: str, r: shapes.StageResult) -> str:
    f = lambda v: "-" if v is None else f"{v * 1000:.1f} ms"  # noqa: E731
    errs = ", ".join(f"{k} {v}" for k, v in r.errors.items())
    return (f"{target} {label}: {r.ok}/{r.requests} ok, TTFT p50 {f(r.ttft_p50)}, TPOT p50 {f(r.tpot_p50)}, "
            f"ITL p99 {f(r.itl_p99)}" + (f", goodput {r.goodput}/{r.requests}" if r.goodput is not None else "")
            + (f"; errors: {errs}" if errs else ""))


def override_urls(scenario: sc.Scenario, urls: dict[str, str]) -> sc.Scenario:
    data = scenario.model_dump(mode="json")
    names = {t["name"] for t in data["targets"]}
    for name, url in urls.items():
        if name not in names:
            raise sc.ScenarioError(f"--target-url: no target named {name!r} (targets: {', '.join(sorted(names))})")
    for t in data["targets"]:
        if t["name"] in urls:
            t["url"], t["serve"] = urls[t["name"]], None
    return sc.coerce(data)
