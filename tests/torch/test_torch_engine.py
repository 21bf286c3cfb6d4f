"""The Engine on the torch backend: a request joins while another runs and gets the
tokens it gets alone; a cancel frees its handles."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from ssd_core import Engine, SamplingParams, SSDConfig, generate  # noqa: E402


def test_requests_join_and_cancel_on_torch(th) -> None:
    target = th.make_model("llama", 0)
    draft = th.make_model("llama", 1)
    config = SSDConfig(k=3, fanout=4)
    params = SamplingParams(temperature=1.0)
    solo = generate(target, draft, prompts=[[5, 6, 7]], sampling=params, max_new_tokens=16,
                    config=config, seed=3).tokens[0]  # fmt: skip
    with Engine(target, draft, mode="ssd", config=config) as engine:
        long = engine.submit([1, 2], sampling=params, max_new_tokens=100, seed=1)
        next(iter(long))
        probe = engine.submit([5, 6, 7], sampling=params, max_new_tokens=16, seed=3)
        assert list(probe.result().tokens) == solo
        long.cancel()
        assert long.result().finish_reason == "cancelled"
    assert target.open_handles == 0 and draft.open_handles == 0
