"""The run directory's records defined once in rundir/: what loadgen writes, analysis reads back
(leniently: unknown fields ignored, a bad line named file:line)."""

from __future__ import annotations

import json
from pathlib import Path

from loadgen import profiling

TRACE = Path(__file__).resolve().parents[1] / "fixtures" / "traces" / "tiny-mamba2-cpu.pt.trace.json.gz"


def test_operators_jsonl_is_one_record_written_and_read(tmp_path):
    """loadgen writes rundir.operators.OperatorRecord, analysis reads it back leniently: an
    unknown field is ignored, a line it cannot place is named file:line and skipped."""
    from analysis.records import load_run
    from rundir.operators import OperatorRecord

    good = profiling.line("t", "vllm", 4096, "prefill", files=[TRACE])
    assert OperatorRecord.from_json(good).to_json() == good
    lines = [json.dumps(dict(good, some_new_field=1)), json.dumps(dict(good, phase="warmup")),
             json.dumps(dict(good, kernels=[{"name": "k", "time_s": -1.0}])), "not json"]
    (tmp_path / "operators.jsonl").write_text("\n".join(lines) + "\n")
    run = load_run(tmp_path)
    assert [r.prompt_tokens for r in run.operators] == [4096]
    assert [p.split(" ")[0] for p in run.problems] == ["operators.jsonl:2:", "operators.jsonl:3:", "operators.jsonl:4:"]


def test_max_context_jsonl_is_one_record():
    """Every line of the committed H200 run reads back into rundir's record and writes out
    the same (the runner writes it from that record)."""
    from rundir.max_context import MaxContextRecord

    path = Path(__file__).resolve().parents[1] / "fixtures" / "runs" / "h200-paper" / "max_context.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 8
    for obj in lines:
        assert MaxContextRecord.from_json(obj).to_json() == obj
    assert MaxContextRecord.from_json({"target": "t", "new_field": 1}).max_ok_tokens is None


def test_error_kinds_are_defined_once_and_documented():
    """requests.jsonl's error_kind: the kinds loadgen writes are rundir.errors', the contract
    lists exactly those, and the client's exporter opens a counter for each (truncated too)."""
    import re
    from pathlib import Path

    from loadgen import records
    from rundir.errors import ERROR_KINDS, ErrorKind

    contract = (Path(__file__).resolve().parents[2] / "docs" / "contracts.md").read_text()
    row = next(line for line in contract.splitlines() if line.strip().startswith("| `error_kind`"))
    assert tuple(re.findall(r"`([a-z_]+)`", row.split("|")[2])) == ERROR_KINDS
    assert records.classify_http(413, "too long") == ErrorKind.REJECTED == "rejected"
    assert records.classify_http(500, "CUDA out of memory") == "oom"
    assert records.classify_exception(ConnectionRefusedError("refused")) == ErrorKind.CONNECTION
