"""Hypothesis against the real ssm-server (tiny Mamba2 on loopback): 1,000 generated requests —
well-formed, malformed and hostile fields on every route — and not one 5xx, no hang, no slot or
running request left behind, a healthy server afterwards."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import tiny_ssm_server

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]
VOCAB = 2048

_num = st.one_of(st.integers(-3, 10), st.integers(-(1 << 70), 1 << 70), st.floats(allow_nan=True),
                 st.just(1e-45), st.just(None), st.text(max_size=5), st.booleans())
_ids = st.lists(st.one_of(st.integers(0, VOCAB - 1), st.integers(-(1 << 64), 1 << 64)), max_size=40)
_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=60)
_prompt = st.one_of(_text, _ids, st.lists(_text, max_size=2), st.lists(_ids, max_size=2), _num,
                    st.dictionaries(st.text(max_size=3), _num, max_size=2))
_part = st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(_text, _num)}),
                  st.dictionaries(st.text(max_size=4), _num, max_size=2))
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "robot", 5]),
                                  "content": st.one_of(_text, st.lists(_part, max_size=3), _num)})
_sampling = {"max_tokens": st.one_of(st.integers(-2, 6), _num), "temperature": _num, "top_p": _num,
             "top_k": _num, "seed": _num, "stop": st.one_of(_text, st.lists(_text, max_size=2), _num),
             "stop_token_ids": st.one_of(_ids, _num), "stream": st.booleans(), "ignore_eos": _num,
             "min_tokens": _num, "n": _num, "logprobs": _num, "echo": _num, "best_of": _num,
             "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": _num}), _num),
             "model": st.one_of(st.just("tiny"), _text)}
_completion = st.fixed_dictionaries({"prompt": _prompt}, optional=_sampling)
_chat = st.fixed_dictionaries({"messages": st.one_of(st.lists(_message, max_size=3), _num)}, optional=_sampling)
_tokenize = st.fixed_dictionaries({}, optional={"prompt": _prompt, "messages": st.lists(_message, max_size=2)})
_detokenize = st.fixed_dictionaries({"tokens": st.one_of(_ids, _num)})
REQUESTS = st.one_of(st.tuples(st.just("/v1/completions"), _completion),
                     st.tuples(st.just("/v1/chat/completions"), _chat),
                     st.tuples(st.just("/tokenize"), _tokenize),
                     st.tuples(st.just("/detokenize"), _detokenize),
                     st.tuples(st.sampled_from(["/v1/completions", "/tokenize"]), _num))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tiny_ssm_server(tmp_path_factory.mktemp("fuzz"), "ssm-fuzz", "--max-num-seqs", "4", "--max-model-len", "256") as srv:
        yield srv


def gauge(server, name: str) -> float:
    text = urllib.request.urlopen(server.url + "/metrics", timeout=10).read().decode()
    return float(re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M).group(1))


@settings(max_examples=1000, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(case=REQUESTS)
def _fuzz(server, seen, case):
    path, body = case
    data = json.dumps(body).encode()  # NaN and Infinity go out as JSON's common extension
    req = urllib.request.Request(server.url + path, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, raw = r.status, r.read()  # a stream is read to its end
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    seen[status] = seen.get(status, 0) + 1
    assert status < 500, (path, body, status, raw[:300])
    if status >= 400:
        err = json.loads(raw)["error"]
        assert err["message"] and err["code"], raw
    elif raw.startswith(b"data: "):  # a stream: no error event for a request that was accepted
        assert b'"error"' not in raw, (path, body, raw[-300:])


def test_a_thousand_generated_requests_get_no_5xx_and_leave_nothing_behind(server):
    seen: dict[int, int] = {}
    _fuzz(server, seen)
    print("statuses of the generated requests:", dict(sorted(seen.items())))
    # derandomized, yet the mix was not the same in every checkout (72 × 200 in one, 44 × 200 in
    # a fresh clone): the bounds only say that accepted requests are among the generated ones
    assert sum(seen.values()) >= 1000 and seen.get(200, 0) >= 10 and seen.get(400, 0) >= 500, seen
    assert gauge(server, "ssm:num_requests_running") == 0
    assert gauge(server, "ssm:state_slots_used") == 0
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
        assert r.status == 200
    body = json.dumps({"prompt": [1, 2, 3], "max_tokens": 5, "ignore_eos": True}).encode()
    with urllib.request.urlopen(urllib.request.Request(server.url + "/v1/completions", body,
                                                       {"Content-Type": "application/json"}), timeout=30) as r:
        assert json.loads(r.read())["usage"]["completion_tokens"] == 5
