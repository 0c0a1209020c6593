"""benchmarks/gpu/text_ttft_vs_raw.py's CPU side: the served TTFT per swept length, the first
request after ready against it, and the longest one-shot reference cuBLAS takes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "gpu"))

import text_ttft_vs_raw as t  # noqa: E402


def _rec(stage, prompt, ttft, target="m", status="ok", counted=None):
    return dict(target=target, stage=stage, status=status, prompt_tokens_requested=prompt,
                prompt_tokens=counted or prompt, ttft_s=ttft)


def test_the_median_per_length_and_the_first_request_after_ready(tmp_path):
    recs = [_rec("warmup", 1024, 0.030), _rec("prompt=1024", 1024, 0.010), _rec("prompt=1024", 1024, 0.014),
            _rec("prompt=1024", 1024, 0.012), _rec("prompt=4096", 4096, 0.5, status="error"),
            _rec("prompt=4096", 4096, 0.040, counted=4097), _rec("prompt=1024", 1024, 9.0, target="other"),
            _rec("users=64", 1024, 9.0)]
    (tmp_path / "requests.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    got = t.served(tmp_path, "m")
    assert got == {1024: (0.012, 1024, 3), 4096: (0.040, 4097, 1)}
    assert t.first_after_ready(tmp_path, "m", got).endswith("TTFT 30.0 ms against 12.0 ms steady at 1,024 tokens (2.50×)")
    assert "no warm-up request" in t.first_after_ready(tmp_path, "m", {4096: got[4096]})


def test_the_one_shot_limit_keeps_one_gemm_under_2_to_the_31_elements():
    # Mamba2-780m's in_proj: 6,448 outputs a token — 256K tokens fit, 512K do not
    assert t.one_shot_limit(6448) == 262144
    assert 262144 * 6448 < 1 << 31 <= 524288 * 6448
    assert t.one_shot_limit(1) == 1 << 30
