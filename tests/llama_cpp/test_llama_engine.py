"""The Engine on llama.cpp: requests join while others run, cancel frees sequence
slots, and a request's greedy tokens do not depend on what else is in flight."""

from __future__ import annotations

from pathlib import Path

from backends.llama_cpp import from_gguf
from ssd_core import Engine, SamplingParams, SSDConfig, generate

GREEDY = SamplingParams(temperature=0.0)


def test_requests_join_and_cancel_on_llama_cpp(tiny_gguf: Path) -> None:
    target = from_gguf(tiny_gguf, n_threads=1, n_ctx=256, n_seq_max=8)
    draft = from_gguf(tiny_gguf, n_threads=1, n_ctx=256, n_seq_max=32, batch_invariant=False)
    config = SSDConfig(k=3, fanout=4)
    try:
        solo = generate(target, draft, prompts=[[5, 6, 7]], sampling=GREEDY, max_new_tokens=24,
                        config=config).tokens[0]  # fmt: skip
        with Engine(target, draft, mode="ssd", config=config, max_batch=4) as engine:
            long = engine.submit([1, 2], sampling=GREEDY, max_new_tokens=200)
            next(iter(long))
            probe = engine.submit([5, 6, 7], sampling=GREEDY, max_new_tokens=24)
            doomed = engine.submit([9], sampling=GREEDY, max_new_tokens=200)
            next(iter(doomed))
            doomed.cancel()
            assert doomed.result().finish_reason == "cancelled"
            assert list(probe.result().tokens) == solo
            long.cancel()
            long.result()
        assert target.open_handles == 0 and draft.open_handles == 0
    finally:
        target.free()
        draft.free()
