"""Hybrid-aware prefix-reuse checks, on the cache settings vLLM 0.26 reported on an H200
(tests/fixtures/runs/h200-profile: Qwen2.5-0.5B with prefix caching and 16-token blocks,
Falcon-H1-0.5B without, its blocks 800 tokens): a warning where a target could not reuse what
its prompts shared, and a caveat where a KV-usage gauge counts Mamba state."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from analysis.analyze import analyze
from analysis.records import load_run

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "runs" / "h200-profile"


def _with_shared_requests(tmp_path: Path, shared: int, prefix_caching_on_falcon: bool) -> Path:
    run = shutil.copytree(FIXTURE, tmp_path / "run")
    recs = [json.loads(x) for x in (run / "requests.jsonl").read_text().splitlines()]
    extra = []
    for r in recs:  # each target's measured request, said to share `shared` tokens of its prompt
        if r["stage"] != "warmup":
            extra.append(dict(r, stage="shared", stage_index=90, shared_tokens=shared, cached_tokens=0))
    (run / "requests.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs + extra))
    if prefix_caching_on_falcon:
        lines = []
        for line in (run / "metrics.jsonl").read_text().splitlines():
            if '"falcon-h1-0.5b-vllm"' in line:
                line = line.replace('"enable_prefix_caching":"False"', '"enable_prefix_caching":"True"')
            lines.append(line)
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


def test_a_target_without_prefix_caching_is_warned_about(tmp_path):
    a = analyze(load_run(_with_shared_requests(tmp_path, 3000, prefix_caching_on_falcon=False)))
    warned = [v for v in a.verdict if v.startswith("⚠")]
    assert warned == ["⚠ falcon-h1-0.5b-vllm: its prompts shared prefixes, but vLLM ran with prefix caching off: "
                      "it could reuse none of them",
                      "⚠ mamba2-780m-vllm: its prompts shared prefixes, but vLLM ran with prefix caching off: "
                      "it could reuse none of them"]


def test_a_shared_part_shorter_than_a_hybrids_block_is_warned_about(tmp_path):
    a = analyze(load_run(_with_shared_requests(tmp_path, 500, prefix_caching_on_falcon=True)))
    warned = [v for v in a.verdict if v.startswith("⚠") and "falcon" in v]
    # Qwen's 16-token blocks hold 500 shared tokens; Falcon-H1's 800-token blocks do not
    assert warned == ["⚠ falcon-h1-0.5b-vllm shared: the shared part of its prompts (500 tokens a request) is "
                      "shorter than its prefix cache's block (800 tokens): vLLM reuses whole blocks only"]
    assert not [v for v in a.verdict if v.startswith("⚠ qwen")]


def test_a_kv_usage_gauge_that_counts_mamba_state_is_not_read_as_kv():
    a = analyze(load_run(FIXTURE))
    said = [m for m in a.missing if "counts its Mamba state blocks" in m]
    assert [m.split(":")[0] for m in said] == ["falcon-h1-0.5b-vllm", "mamba2-780m-vllm"]
    assert not any(m.startswith("qwen") for m in said)  # a Transformer's gauge is KV alone
