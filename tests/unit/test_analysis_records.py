"""Reading run directories: malformed lines are named and skipped; partial runs still report."""

from __future__ import annotations

import json

from analysis import synthetic
from analysis.records import load_run
from analysis.report import write_report


def test_malformed_lines_are_named_and_skipped(tmp_path):
    run_dir = synthetic.write(tmp_path / "r")
    good = (run_dir / "requests.jsonl").read_text().splitlines()
    lines = good[:3] + ['{"target": "tiny-llama", "stage"', "[1, 2]",
                        json.dumps({"target": "x"}), json.dumps(dict(json.loads(good[0]), ttft_s="fast"))]
    (run_dir / "requests.jsonl").write_text("\n".join(lines) + "\n")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write("not json\n")
    run = load_run(run_dir)
    assert len(run.requests) == 3
    named = "\n".join(run.problems)
    for line in (4, 5, 6, 7):
        assert f"requests.jsonl:{line}:" in named
    assert "missing field(s) stage, status" in named
    assert "not a finite number: 'fast'" in named
    n_metrics = len((run_dir / "metrics.jsonl").read_text().splitlines())
    assert f"metrics.jsonl:{n_metrics}:" in named
    html = write_report(run_dir).read_text()
    assert "requests.jsonl:4:" in html  # the report says what it skipped


def test_partial_run_reports_what_it_has(tmp_path):
    run_dir = synthetic.write(tmp_path / "r", synthetic.SyntheticRun(finished=False, gpu=False))
    (run_dir / "metrics.jsonl").unlink()
    reqs = (run_dir / "requests.jsonl").read_text().splitlines()
    (run_dir / "requests.jsonl").write_text("\n".join(reqs[:10]) + '\n{"target": "tiny-llama", "sta')
    run = load_run(run_dir)
    assert len(run.requests) == 10
    assert any("metrics.jsonl is missing" in m for m in run.missing)
    assert any("finished_at" in m for m in run.missing)
    html = write_report(run_dir).read_text()
    assert "metrics.jsonl is missing" in html
    assert "target tiny-mamba2 has no request records" in html
    assert "Memory vs prompt length: no data" in html
    assert (run_dir / "report" / "summary.csv").exists()


def test_empty_run_directory_still_reports(tmp_path):
    html = write_report(tmp_path).read_text()
    assert "requests.jsonl is missing" in html and "env.json is missing" in html
    assert "No request was recorded" in html


def test_prompt_length_prefers_the_requested_count(tmp_path):
    run = load_run(synthetic.write(tmp_path / "r"))
    r = run.requests[0]
    assert r.prompt_tokens == r.prompt_tokens_requested + 1
    assert r.prompt_length == r.prompt_tokens_requested


def test_warmup_requests_stay_out_of_the_figures(tmp_path):
    run_dir = synthetic.write(tmp_path / "r")
    first = json.loads((run_dir / "requests.jsonl").read_text().splitlines()[0])
    slow = dict(first, stage="warmup", request_id="w1", ttft_s=99.0)
    with open(run_dir / "requests.jsonl", "a") as f:
        f.write(json.dumps(slow) + "\n")
    run = load_run(run_dir)
    assert len(run.warmup) == 1 and all(r.stage != "warmup" for r in run.requests)
    assert "(+1 warm-up, not counted)" in write_report(run_dir).read_text()


def test_zero_device_memory_is_no_reading(tmp_path):
    from analysis import memory

    run = load_run(synthetic.write(tmp_path / "r", synthetic.SyntheticRun(gpu=False)))
    for s in run.scrapes:
        s.samples = [(n, lab, 0.0 if n == memory.SERVER_MEMORY else v) for n, lab, v in s.samples]
    assert memory.memory_curves(run) == []


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_GARBAGE = st.one_of(
    st.text(alphabet=st.characters(blacklist_characters="\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"),
            min_size=1, max_size=40).filter(lambda s: s.strip()),
    st.builds(json.dumps, st.dictionaries(st.sampled_from(["target", "stage", "status", "ttft_s", "itl_s"]),
                                          st.one_of(st.none(), st.integers(), st.text(max_size=5),
                                                    st.lists(st.integers(), max_size=2)), max_size=2)),
)


@given(st.lists(st.tuples(st.integers(0, 40), _GARBAGE), max_size=6))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_garbage_line_is_named_and_the_rest_is_read(tmp_path, inserts):
    src = synthetic.write(tmp_path / "src", synthetic.SyntheticRun(lengths=(64, 128), concurrency_levels=(1,)))
    good = (src / "requests.jsonl").read_text().splitlines()
    lines = list(good)
    for pos, junk in inserts:
        lines.insert(min(pos, len(lines)), junk)
    d = tmp_path / "mixed"
    d.mkdir(exist_ok=True)
    # lone surrogates become bytes that are not UTF-8: garbage a crashed writer can leave too
    (d / "requests.jsonl").write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogatepass"))
    run = load_run(d)
    assert len(run.requests) + len(run.problems) == len(lines)
    assert len(run.requests) >= len(good)
    bad_numbers = {int(p.split(":")[1]) for p in run.problems}
    assert all(not lines[i - 1] in good for i in bad_numbers)
