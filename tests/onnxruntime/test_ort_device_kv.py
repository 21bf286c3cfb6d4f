"""KV caches that stay where the graph runs: zero-copy pasts, one reused IOBinding,
logits as torch tensors, and what still copies (counted in ``model.stats``).

Run with torch buffers on the CPU (``kv_on_device=True`` on the CPU provider): the same
calls as on ``cuda:N``, minus the device.
"""

from __future__ import annotations

import numpy as np
import pytest

from ssd_core import ConfigError, SamplingParams, SSDConfig, generate

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

from backends.onnxruntime import CPU, CUDA  # noqa: E402
from backends.onnxruntime._model import with_user_stream  # noqa: E402
from backends.onnxruntime._runner import BoundRunner  # noqa: E402

TOL = 1e-4
PROMPT = [3, 17, 42, 8, 5, 77, 1]


@pytest.fixture
def dev(onnx_files, oh):
    return oh.load(onnx_files["target"], io_binding=True, kv_on_device=True)


def test_logits_are_torch_tensors_where_the_kv_lives(dev, oh):
    assert dev.kv_on_device and isinstance(dev._run, BoundRunner)
    h = dev.open(PROMPT)
    out = dev.extend([(h, [1, 2])])
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert out.device.type == "cpu" and tuple(out.shape) == (2, oh.VOCAB)
    assert not dev.check_finite  # a device read per call is left to the core


def test_one_handle_feeds_its_row_without_copies(dev, oh):
    h = dev.open(PROMPT)
    dev.extend([(h, [1])])
    for t in range(5):
        dev.extend([(h, [t + 2])])
    assert dev.stats["kv_copied_bytes"] == 0
    assert dev.stats["kv_zero_copy_runs"] == 5
    # one IOBinding for the model's life: inputs rebound only when a buffer changed
    assert dev._run.rebinds <= 6 * (3 + 4)


def test_a_batch_extended_together_is_fed_as_is(dev, oh):
    """AR at batch 4: after the first (gathering) step every step reuses the last
    present buffer; truncations (rejected drafts) only unmark slots."""
    hs = [dev.open(PROMPT[: 3 + i]) for i in range(4)]
    dev.extend([(h, [1]) for h in hs])  # nothing cached yet: no copy either
    copied = dev.stats["kv_copied_bytes"]
    for step in range(4):
        out = dev.extend([(h, [10 + step, 11]) for h in hs])
        for h in hs:
            dev.truncate(h, len(dev.tokens(h)) - 1)  # reject the last token
    assert dev.stats["kv_copied_bytes"] == copied
    assert tuple(out.shape) == (8, oh.VOCAB)
    last = np.asarray(dev.extend([(h, [5]) for h in hs]))
    for i, h in enumerate(hs):
        want = np.asarray(oh.fresh_logits(dev, dev.tokens(h)))[-1]
        np.testing.assert_allclose(last[i], want, atol=TOL, rtol=0)


def test_tree_copies_the_prefix_once_then_steps_in_place(dev, oh):
    root = dev.open(PROMPT)
    dev.extend([(root, [1])])
    branches = [dev.fork(root, len(PROMPT) + 1) for _ in range(4)]
    before = dev.stats["kv_copied_bytes"]
    dev.extend([(b, [20 + i]) for i, b in enumerate(branches)])
    first = dev.stats["kv_copied_bytes"] - before
    per_token = first // (4 * (len(PROMPT) + 1))
    assert first == 4 * (len(PROMPT) + 1) * per_token > 0  # N x prefix, once
    for step in range(3):
        out = dev.extend([(b, [30 + step]) for b in branches])
    assert dev.stats["kv_copied_bytes"] == before + first  # later steps: no copy
    for i in range(len(branches)):
        ctx = PROMPT + [1, 20 + i, 30, 31, 32]
        np.testing.assert_allclose(
            np.asarray(out[i]), np.asarray(oh.fresh_logits(dev, ctx))[-1], atol=TOL, rtol=0
        )


def test_rows_with_many_holes_are_compacted(dev, oh):
    h = dev.open(PROMPT)
    dev.extend([(h, [1])])
    for _ in range(40):  # SD rounds that reject everything: 3 new slots, 2 unmarked
        dev.extend([(h, [2, 3, 4])])
        dev.truncate(h, len(dev.tokens(h)) - 2)
    kv = dev._kv[h]  # unmarked slots stay bounded: rows are compacted before feeding
    assert len(kv.valid) <= 2 * max(64, kv.length) + 8
    assert dev.stats["kv_copied_bytes"] > 0
    got = np.asarray(dev.extend([(h, [9])]))
    np.testing.assert_allclose(
        got, np.asarray(oh.fresh_logits(dev, dev.tokens(h)))[-1:], atol=TOL, rtol=0
    )


def test_generate_on_device_buffers_is_greedy_identical(onnx_files, oh):
    t = oh.load(onnx_files["target"], io_binding=True, kv_on_device=True)
    d = oh.load(onnx_files["draft"], io_binding=True, kv_on_device=True)
    greedy = SamplingParams(temperature=0.0)
    prompts = [[1, 2, 3], [4, 5], [6]]
    ar = generate(t, d, prompts=prompts, mode="ar", max_new_tokens=12, sampling=greedy)
    for mode in ("sd", "ssd"):
        res = generate(
            t,
            d,
            prompts=prompts,
            mode=mode,
            max_new_tokens=12,
            sampling=greedy,
            config=SSDConfig(k=3, fanout=4),
        )
        assert res.tokens == ar.tokens, mode
    assert t.open_handles == 0 and d.open_handles == 0


def test_cuda_gets_a_user_stream():
    made = []

    class Stream:
        def __init__(self, i):
            self.cuda_stream = 1000 + i
            made.append(i)

    providers, stream = with_user_stream([(CUDA, {"device_id": 1}), CPU], Stream)
    assert made == [1] and stream.cuda_stream == 1001
    assert providers == [
        (CUDA, {"device_id": 1, "user_compute_stream": "1001", "has_user_compute_stream": "1"}),
        CPU,
    ]
    same, none = with_user_stream([CPU], Stream)
    assert same == [CPU] and none is None


def test_bfloat16_graphs_need_torch_buffers(tmp_path, oh):
    from backends.onnxruntime import export_tiny_llama

    path = export_tiny_llama(
        tmp_path / "bf16.onnx",
        dtype="bfloat16",
        vocab_size=20,
        num_layers=1,
        hidden_size=8,
        num_heads=2,
        num_kv_heads=1,
    )
    # the CPU provider has no bfloat16 matmul: a clear ConfigError, not a crash
    with pytest.raises(ConfigError, match="cannot run"):
        oh.load(path)


def test_copied_bytes_are_the_marked_slots(dev, oh):
    root = dev.open(PROMPT)
    dev.extend([(root, [1])])
    kids = [dev.fork(root, 5), dev.fork(root, 3)]
    dev.extend([(k, [2]) for k in kids])  # gathers 5 + 3 slots
    per_slot = 2 * 2 * 2 * 8 * 4  # layers x (key, value) x kv_heads x head_dim x float32
    assert dev.stats["kv_copied_bytes"] == (5 + 3) * per_slot
