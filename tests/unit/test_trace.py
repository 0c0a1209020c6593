"""Trace replay's pieces (loadgen.trace): the reader against a hand-made trace with bad lines,
the shared blocks it finds, the prompts built from hash ids, and the scenario kind."""

from __future__ import annotations

import json

import pytest

from loadgen import scenario as sc
from loadgen import trace
from loadgen.prompts import LocalTokenizer, PromptBuilder
from tests.conftest import build_tiny

GOOD = [
    {"timestamp": 2000, "input_length": 300, "output_length": 8, "hash_ids": [1, 2, 3]},
    {"timestamp": 0, "input_length": 250, "output_length": 4, "hash_ids": [1, 2, 9]},
    {"timestamp": 3000, "input_length": 200, "output_length": 4, "hash_ids": [1, 2]},
    {"timestamp": 4000, "input_length": 250, "output_length": 4, "hash_ids": [7, 2, 3]},
]


def _write(tmp_path, lines):
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


def test_the_reader_sorts_finds_shared_blocks_and_names_bad_lines(tmp_path):
    bad = ["not json", json.dumps([1, 2]),
           json.dumps({"timestamp": 5, "input_length": 0, "output_length": 1, "hash_ids": []}),
           json.dumps({"timestamp": 5, "input_length": 300, "output_length": 1, "hash_ids": [1]}),
           json.dumps({"timestamp": -1, "input_length": 10, "output_length": 1, "hash_ids": [1]}),
           json.dumps({"timestamp": 5, "input_length": 10, "output_length": 1, "hash_ids": ["a"]})]
    rows, problems = trace.read(_write(tmp_path, GOOD[:2] + bad + GOOD[2:]), block_tokens=100)
    assert [p.split(" ")[0] for p in problems] == [f"t.jsonl:{i}:" for i in range(3, 9)]
    assert "3 hash_ids" not in problems[3] and "1 hash_ids for 300 tokens" in problems[3]
    assert [r.at_s for r in rows] == [0.0, 2.0, 3.0, 4.0]  # sorted, from the first request
    # shared: leading whole blocks an earlier request began with ([1, 2] of the first; a
    # partial last block never; [7, …] starts elsewhere)
    assert [r.shared_tokens for r in rows] == [0, 200, 200, 0]
    assert rows[1].output_length == 8 and rows[1].hash_ids == (1, 2, 3)


def test_the_shipped_example_reads_clean():
    rows, problems = trace.read("shipped")
    assert problems == [] and len(rows) == 48 and sum(r.shared_tokens for r in rows) > 0
    assert json.loads(trace.SHIPPED.read_text().splitlines()[0]) == trace.synthesize()[0]


def test_prompts_from_hash_ids_are_exact_and_share_their_blocks():
    b = PromptBuilder(LocalTokenizer(build_tiny("tiny-llama")))
    enc = lambda text: b.tok._tok(text)["input_ids"]  # noqa: E731
    x, y, z = (enc(b.build_blocks(n, ids, 100)) for n, ids in ((300, [1, 2, 3]), (250, [1, 2, 9]), (250, [7, 2, 3])))
    assert (len(x), len(y), len(z)) == (300, 250, 250)
    assert x[:200] == y[:200] and x[200:250] != y[200:250]
    assert x[:100] != z[:100]


def test_the_trace_kind_is_one_open_loop_stage(tmp_path):
    p = _write(tmp_path, GOOD)
    s = sc.parse(f"name: t\ntargets: [{{name: a, url: 'http://127.0.0.1:9'}}]\n"
                 f"load: {{kind: trace, path: {p}, block_tokens: 100, speed: 2, limit: 3, max_users: 4}}\n")
    (spec,) = list(s.load.stages())
    assert spec.label == "trace" and spec.users == 4 and spec.requests == 3 and spec.speed == 2
    assert [e.input_length for e in spec.trace] == [250, 300, 200]
    broken = _write(tmp_path, GOOD + ["{"])
    with pytest.raises(sc.ScenarioError) as e:  # refused as the scenario is read, one line naming it
        sc.parse(f"name: t\ntargets: [{{name: a, url: 'http://127.0.0.1:9'}}]\n"
                 f"load: {{kind: trace, path: {broken}, block_tokens: 100}}\n", "s.yaml")
    assert str(e.value) == "s.yaml:3: load: `path`: 1 bad line(s) in the trace; first: t.jsonl:5: skipped " \
                           "(JSONDecodeError: Expecting property name enclosed in double quotes: line 2 column 1 (char 2))"
    with pytest.raises(sc.ScenarioError, match="cannot read the trace /nope.jsonl: No such file"):
        sc.parse("name: t\ntargets: [{name: a, url: 'http://127.0.0.1:9'}]\nload: {kind: trace, path: /nope.jsonl}\n")
