"""Multi-turn conversations: the scenario's `kind: conversation`, which turn goes next, the
history each turn resends and what its record says (the run against real servers is
tests/integration/test_reuse_run.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from loadgen import scenario as sc
from loadgen.conversation import Conversations, Turn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import build_tiny  # noqa: E402

BASE = """name: c
targets: [{name: a, url: "http://127.0.0.1:9"}]
load: {kind: conversation, conversations: 3, turns: 2, first_tokens: 300, turn_tokens: 20, users: 2,
       think_time_s: 0.5}
"""


def test_the_conversation_load_and_its_stage():
    s = sc.parse(BASE)
    (spec,) = list(s.load.stages())
    assert spec.label == "conversation" and spec.users == 2 and spec.requests == 6
    assert spec.prompt_tokens is None  # no one length: the turns' prompts grow
    assert s.load.planned_requests("conversation") == 6


@pytest.mark.parametrize("field, says", [
    ("turns: 0", "load.conversation.turns: Input should be greater than or equal to 1"),
    ("think_time_s: -1", "load.conversation.think_time_s: Input should be greater than or equal to 0"),
    ("turn_tokens: 0", "load.conversation.turn_tokens"),
    ("rounds: 3", "load.conversation.rounds: unknown field"),
])
def test_a_bad_conversation_load_is_one_line_naming_the_field(field, says):
    key = field.split(":")[0]
    text = BASE.replace("think_time_s: 0.5", "think_time_s: 0.5" if key != "think_time_s" else "")
    text = text.replace("users: 2,", f"users: 2, {field},")
    with pytest.raises(sc.ScenarioError) as e:
        sc.parse(text, "s.yaml")
    assert says in str(e.value) and str(e.value).startswith("s.yaml:") and "\n" not in str(e.value)


def _rec(ok=True, prompt=310, completion=4):
    return {"status": "ok" if ok else "error", "prompt_tokens": prompt, "completion_tokens": completion}


def test_turns_follow_replies_and_a_failed_turn_ends_its_conversation():
    c = Conversations(sc.parse(BASE).load)
    assert c.first_turns() == [Turn(0, 0), Turn(1, 0)]  # two at a time
    j0 = c.job_fields(Turn(0, 0))
    assert j0["api"] == "chat" and j0["prompt_tokens"] == 300 and j0["messages"] == []
    assert j0["shared_tokens"] is None  # nothing sent before
    j0["messages"].append({"role": "user", "content": "doc"})
    # the reply came: the same conversation's next turn, after the think time
    assert c.done(dict(j0), _rec(), " a reply") == (Turn(0, 1), 0.5)
    j1 = c.job_fields(Turn(0, 1))
    assert j1["prompt_tokens"] == 20 and j1["shared_tokens"] == 314  # the server's 310 + 4
    assert j1["messages"] == [{"role": "user", "content": "doc"}, {"role": "assistant", "content": " a reply"}]
    # conversation 1 fails at its first turn: it ends, and conversation 2 starts at once
    j = c.job_fields(Turn(1, 0))
    j["messages"].append({"role": "user", "content": "other"})
    assert c.done(j, _rec(ok=False), None) == (Turn(2, 0), 0.0)
    # conversation 0's last turn: nothing left to start (2 was the last)
    j1["messages"].append({"role": "user", "content": "q"})
    assert c.done(j1, _rec(prompt=340), "r") == (None, 0.0)
    assert not c.finished
    j2 = c.job_fields(Turn(2, 0))
    j2["messages"].append({"role": "user", "content": "x"})
    c.done(j2, _rec(), "y")
    c.abandon(Turn(2, 1))  # its stage closed before the turn went
    assert c.finished and c.ended == 3


def test_the_controller_issues_every_turn_with_its_history():
    """Stage and Controller as a run uses them (gevent without monkey-patching): each turn's
    job carries the history with the replies, and its new message of exact length."""
    import gevent

    from loadgen.controller import Controller, Stage
    from loadgen.prompts import LocalTokenizer

    class Writer:
        def __init__(self):
            self.lines = []

        def write(self, rec):
            self.lines.append(rec)

    path = build_tiny("tiny-llama")
    load = sc.parse(BASE.replace("think_time_s: 0.5", "think_time_s: 0.05")).load
    (spec,) = list(load.stages())
    base = {"tokenizer": {"kind": "local", "path": str(path)}, "api": "completions", "max_tokens": 4,
            "target": "a", "model": "a"}
    w = Writer()
    ctl = Controller(w)
    st = Stage(spec, 3, base)
    ctl.open(st)
    jobs = []
    while not st.done.is_set():
        job = ctl.take()
        jobs.append(job)
        reply = f" reply {len(jobs)}"
        rec = {"status": "ok", "prompt_tokens": 7 * len(jobs), "completion_tokens": 4, "_reply": reply,
               "error_kind": None, "error_message": None}
        ctl.finish(job, rec)
        gevent.sleep(0)
        st.check()
        if not st.done.is_set() and st.arrivals.empty():
            gevent.sleep(0.1)  # a conversation thinking
    assert [(j["conversation"], j["turn"]) for j in jobs] == [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (2, 1)]
    assert all("_reply" not in r for r in w.lines)  # the reply is resent, not recorded
    from loadgen.job import Job

    assert all(set(j) <= set(Job.__annotations__) for j in jobs)  # every key a job carries is declared
    tok = LocalTokenizer(str(path))
    for j in jobs:
        assert j["api"] == "chat" and j["messages"][-1]["role"] == "user"
        assert tok.count(j["messages"][-1]["content"]) == (300 if j["turn"] == 0 else 20)
    second = jobs[2]  # conversation 0, turn 1: its first message, the reply to it, a new one
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]
    assert second["messages"][0] == jobs[0]["messages"][0] and second["messages"][1]["content"] == " reply 1"
    assert second["shared_tokens"] == 7 + 4


def test_a_scenario_that_reuses_prefixes_caches_them_on_every_vllm_target():
    """Prefix caching on for SSMs and hybrids too, in vLLM's `align` Mamba cache mode, when the
    scenario shares prefixes; the report names the setting."""
    from analysis import engines
    from loadgen import targets

    text = """name: r
targets:
  - {name: t, serve: {engine: vllm, preset: tiny-llama}}
  - {name: h, serve: {engine: vllm, preset: tiny-falcon-h1}}
  - {name: m, serve: {engine: vllm, preset: tiny-mamba2}}
load: {kind: context_sweep, prompt_tokens: [64]}
"""
    plain = sc.parse(text)
    assert not plain.reuses_prefixes()
    assert sc.parse(text + "then: [{kind: conversation}]\n").reuses_prefixes()
    assert sc.parse(text + "prompt: {shared_prefix: {question_tokens: 8}}\n").reuses_prefixes()
    for t in plain.targets:
        build_tiny(t.serve.preset)
        off = targets.command(t, t.serve.preset, 8000)
        on = targets.command(t, t.serve.preset, 8000, reuse=True)
        assert "--enable-prefix-caching" in on and "--no-enable-prefix-caching" not in on
        if t.name == "t":  # a Transformer caches prefixes in every scenario
            assert off == on and "--mamba-cache-mode" not in on
            assert engines.prefix_caching(on[1:]) == "vLLM prefix caching on"
        else:
            assert "--no-enable-prefix-caching" in off and "--mamba-cache-mode" not in off
            assert on[on.index("--mamba-cache-mode") + 1] == "align"
            assert engines.prefix_caching(on[1:]) == "vLLM prefix caching on, Mamba cache mode align"
            assert engines.prefix_caching(off[1:]) == "vLLM prefix caching off"
    assert engines.prefix_caching(["--model", "m"]) is None  # not vLLM's
