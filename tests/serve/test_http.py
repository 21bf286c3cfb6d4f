"""Raw HTTP with httpx: the SSE framing, OpenAI-style error bodies (400, never 422 or
500, for bad input), authentication, /health and /metrics."""

from __future__ import annotations

import json

import pytest

from .conftest import sse_events

GOOD = {"model": "reference", "prompt": [1, 2, 3], "max_tokens": 4}


def _is_error(resp, status, *, param=None, code=None):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == {400: "invalid_request_error", 401: "invalid_request_error",
                           404: "invalid_request_error", 405: "invalid_request_error",
                           429: "rate_limit_error", 503: "server_error"}[status]  # fmt: skip
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def test_sse_framing(serve, client):
    live = serve()
    c = client(live)
    with c.stream("POST", "/v1/completions", json={**GOOD, "stream": True, "max_tokens": 9}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    # Every event is one "data: <json>" line followed by a blank line; the last is [DONE].
    assert raw.endswith("data: [DONE]\n\n")
    events = raw[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    payloads = [e[len("data: ") :] for e in events]
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert {ch["object"] for ch in chunks} == {"text_completion"}
    assert len({ch["id"] for ch in chunks}) == 1
    ids = [t for ch in chunks for choice in ch["choices"] for t in choice.get("token_ids", [])]
    assert len(ids) == 9
    assert [choice["finish_reason"] for choice in chunks[-1]["choices"]] == ["length"]
    assert all(choice["finish_reason"] is None for ch in chunks[:-1] for choice in ch["choices"])


def test_sse_without_usage_has_no_usage_chunk(serve, client):
    live = serve()
    with client(live).stream("POST", "/v1/completions", json={**GOOD, "stream": True}) as r:
        payloads = sse_events(r.iter_lines())
    assert payloads[-1] == "[DONE]"
    assert all("usage" not in json.loads(p) for p in payloads[:-1])


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**GOOD, "bogus": 1}, "bogus"),
        ({**GOOD, "temperature": "1.0"}, "temperature"),
        ({**GOOD, "temperature": -0.5}, "temperature"),
        ({**GOOD, "temperature": 2.5}, "temperature"),
        ({**GOOD, "top_p": 0}, "top_p"),
        ({**GOOD, "top_p": 1.5}, "top_p"),
        ({**GOOD, "top_k": -2}, "top_k"),
        ({**GOOD, "min_p": 2}, "min_p"),
        ({**GOOD, "max_tokens": -1}, "max_tokens"),
        ({**GOOD, "max_tokens": True}, "max_tokens"),
        ({**GOOD, "max_tokens": 4.5}, "max_tokens"),
        ({**GOOD, "seed": -1}, "seed"),
        ({**GOOD, "seed": 1 << 64}, "seed"),
        ({**GOOD, "n": 0}, "n"),
        ({**GOOD, "stream": "yes"}, "stream"),
        ({**GOOD, "stop": [""]}, "stop"),
        ({**GOOD, "stop": 3}, "stop"),
        ({**GOOD, "presence_penalty": 0.5}, "presence_penalty"),
        ({**GOOD, "logprobs": 2}, "logprobs"),
        ({**GOOD, "echo": True}, "echo"),
        ({**GOOD, "logit_bias": {"5": 1.0}}, "logit_bias"),
        ({**GOOD, "stream_options": {"include_usage": True, "x": 1}}, "stream_options"),
        ({"model": "reference", "max_tokens": 4}, "prompt"),
        ({**GOOD, "prompt": [1, "a"]}, "prompt"),
        ({**GOOD, "prompt": {"a": 1}}, "prompt"),
        ({**GOOD, "prompt": []}, "prompt"),
        ({**GOOD, "prompt": [1, 2, 64]}, "prompt"),
        ({**GOOD, "prompt": [[1], []]}, "prompt"),
        ({**GOOD, "max_tokens": 3, "max_completion_tokens": 4}, None),
    ],
)
def test_bad_completion_requests_are_400(serve, client, body, param):
    live = serve()
    _is_error(client(live).post("/v1/completions", json=body), 400, param=param)


def test_neutral_values_of_unimplemented_fields_are_accepted(serve, client):
    live = serve()
    body = {**GOOD, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {},
            "user": "u1", "best_of": 1, "echo": False, "top_k": -1}  # fmt: skip
    r = client(live).post("/v1/completions", json=body)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "content",
    [b"not json", b"[1, 2]", b"", b'{"prompt": [1,2], }'],
)
def test_malformed_bodies_are_400(serve, client, content):
    live = serve()
    r = client(live).post(
        "/v1/completions", content=content, headers={"content-type": "application/json"}
    )
    _is_error(r, 400)


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        ([{"role": "wizard", "content": "x"}], "messages"),
        ([{"role": "user"}], "messages"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "messages"),
    ],
)
def test_bad_chat_requests_are_400(serve, client, messages, param):
    live = serve()
    r = client(live).post("/v1/chat/completions", json={"model": "reference", "messages": messages})
    _is_error(r, 400, param=param)


def test_too_many_sequences_is_400(serve, client):
    live = serve(max_batch=2)
    r = client(live).post("/v1/completions", json={**GOOD, "n": 3})
    _is_error(r, 400, param="n", code="too_many_sequences")


def test_unknown_model_route_and_method(serve, client):
    live = serve()
    c = client(live)
    _is_error(c.post("/v1/completions", json={**GOOD, "model": "gpt-9"}), 404, param="model",
              code="model_not_found")  # fmt: skip
    _is_error(c.get("/v1/nothing"), 404)
    _is_error(c.get("/v1/completions"), 405)


def test_auth(serve, client):
    live = serve(api_key="sesame")
    c = client(live)
    assert c.get("/health").status_code == 200  # health needs no key
    for path in ("/v1/models", "/metrics"):
        err = _is_error(c.get(path), 401, code="invalid_api_key")
        assert "Bearer" in err["message"]
    r = c.post("/v1/completions", json=GOOD, headers={"Authorization": "Bearer nope"})
    _is_error(r, 401)
    assert r.headers["www-authenticate"] == "Bearer"
    r = c.post("/v1/completions", json=GOOD, headers={"Authorization": "Basic sesame"})
    _is_error(r, 401)
    ok = {"Authorization": "Bearer sesame"}
    assert c.post("/v1/completions", json=GOOD, headers=ok).status_code == 200
    assert c.get("/metrics", headers=ok).status_code == 200


def test_health_and_metrics(serve, client):
    live = serve()
    c = client(live)
    assert c.get("/health").json() == {"status": "ok"}
    for _ in range(2):
        assert (
            c.post("/v1/completions", json={**GOOD, "max_tokens": 10, "stream": True}).status_code
            == 200
        )
    c.post("/v1/completions", json={**GOOD, "bogus": 1})
    r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    assert samples["ssd_generated_tokens_total"] == 20
    assert samples["ssd_completion_tokens_total"] == 20
    assert samples["ssd_prompt_tokens_total"] == 6
    assert samples['ssd_requests_total{finish_reason="length",route="completions"}'] == 2
    assert samples['ssd_requests_rejected_total{status="400"}'] == 1
    assert samples["ssd_requests_running"] == 0 and samples["ssd_requests_waiting"] == 0
    assert samples["ssd_time_to_first_token_seconds_count"] == 2
    assert samples["ssd_request_duration_seconds_count"] == 2
    assert samples["ssd_inter_token_latency_seconds_count"] >= 1
    assert samples['ssd_lane_busy_seconds_total{lane="target"}'] > 0
    assert samples['ssd_lane_busy_seconds_total{lane="draft"}'] > 0
    accepted = samples["ssd_draft_tokens_accepted_total"]
    rejections = samples["ssd_draft_rejections_total"]
    assert samples["ssd_acceptance_per_token"] == pytest.approx(accepted / (accepted + rejections))
    passes = samples["ssd_sequence_rounds_total"]
    assert samples["ssd_tokens_per_target_pass"] == pytest.approx(20 / passes)
    assert 0 <= samples["ssd_cache_hit_rate"] <= 1
    assert any(k.startswith("ssd_server_info{") for k in samples)
