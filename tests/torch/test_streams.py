"""Stream and event ordering with a fake ``torch.cuda`` (no GPU needed).

The case that matters: a model on ``cuda:1`` called from a driver thread whose current
device is ``cuda:0``. Its work must run on its private stream *on cuda:1*, that stream
must wait for the caller's work *on cuda:1*, and the caller's stream *on cuda:1* (where
the core reads the logits) must wait for the model's work before reading the logits.
Asking for ``torch.cuda.current_stream()`` without a device gets cuda:0's stream and
orders nothing on cuda:1 -- the defect these tests catch.
"""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")

import fake_cuda  # noqa: E402

from backends.torch._device import DeviceContext, Placement  # noqa: E402


def fake_cuda_of(ctx):
    return ctx.stream.fake


def _run_call(
    fake, ctx, device: int, tensor_device: int, op: str = "forward"
) -> fake_cuda.FakeTensor:
    """What TorchModel.extend does: work inside the context, then hand the result over."""
    with ctx():
        fake.launch(device, op)
    out = fake_cuda.FakeTensor(torch.device("cuda", tensor_device))
    return ctx.hand_over(out)


@pytest.mark.parametrize("index", [0, 1])
def test_result_is_ordered_on_the_models_device(monkeypatch, index):
    fake = fake_cuda.install(monkeypatch)
    dev = torch.device("cuda", index)
    ctx = DeviceContext(dev, use_stream=True)
    private = ctx.stream
    assert private is not None and private.device == index, "private stream on the model's device"
    fake.launch(index, "caller-prep")  # the caller queued work on the model's device first
    out = _run_call(fake, ctx, index, index)
    # the model's work ran on its private stream, not on the caller's
    assert private.ops == ["forward"]
    # the first call waited for the caller's earlier work on the same device
    assert fake.ordered_after(private, fake.defaults[index], "caller-prep")
    # the consumer (the default stream of the logits' device) is ordered after the forward
    assert fake.ordered_after(fake.defaults[index], private, "forward")
    # and the allocator was told the tensor is used on that stream
    assert out.recorded_on == [fake.defaults[index]]


def test_one_event_per_result(monkeypatch):
    fake_cuda.install(monkeypatch)
    ctx = DeviceContext(torch.device("cuda", 1), use_stream=True)
    events = []
    for _ in range(2):
        out = _run_call(ctx.streams and fake_cuda_of(ctx), ctx, 1, 1)
        events.append(ctx.last_event)
        assert out._ssd_ready_event is ctx.last_event  # what ready_event() reads
    assert events[0] is not events[1]
    assert all(e.stream is ctx.stream for e in events)
    assert (events[0].covered, events[1].covered) == (1, 2)  # each after its own forward


def test_cuda1_from_a_driver_thread(monkeypatch):
    """The driver's worker thread never set a device: its current device is cuda:0."""
    fake = fake_cuda.install(monkeypatch)
    ctx = DeviceContext(torch.device("cuda", 1), use_stream=True)
    results = []

    def worker() -> None:
        assert fake.current_device() == 0
        results.append(_run_call(fake, ctx, 1, 1))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert fake.ordered_after(fake.defaults[1], ctx.stream, "forward")
    # nothing was ordered on cuda:0 on the model's behalf, and the host never blocked
    assert not [h for h in fake.defaults[0].history if h[1] == "wait"]
    assert fake.host_syncs == 0


def test_work_runs_with_the_models_device_current(monkeypatch):
    fake = fake_cuda.install(monkeypatch)
    ctx = DeviceContext(torch.device("cuda", 1), use_stream=True)
    seen = []
    with ctx():
        seen.append((fake.current_device(), fake.current_stream(1)))
    assert seen == [(1, ctx.stream)]
    assert fake.current_device() == 0  # restored


def test_each_model_has_its_own_stream(monkeypatch):
    """Draft and target on one GPU get two private streams, so their work can overlap."""
    fake = fake_cuda.install(monkeypatch)
    a = DeviceContext(torch.device("cuda", 0), use_stream=True)
    b = DeviceContext(torch.device("cuda", 0), use_stream=True)
    assert a.stream is not b.stream
    for i in range(2):  # after the first call, a result handed over does not hold up the
        _run_call(fake, a, 0, 0, f"a{i}")  # other model's next call: the consumer waits
        _run_call(fake, b, 0, 0, f"b{i}")  # for both, the private streams do not wait
    assert b.stream.ops == ["b0", "b1"]
    assert not fake.ordered_after(b.stream, a.stream, "a1")
    assert fake.ordered_after(fake.defaults[0], a.stream, "a1")
    assert fake.ordered_after(fake.defaults[0], b.stream, "b1")


def test_resync_orders_the_next_call_after_the_caller(monkeypatch):
    fake = fake_cuda.install(monkeypatch)
    ctx = DeviceContext(torch.device("cuda", 1), use_stream=True)
    _run_call(fake, ctx, 1, 1)
    fake.launch(1, "new-weights")
    ctx.resync()
    _run_call(fake, ctx, 1, 1)
    assert fake.ordered_after(ctx.stream, fake.defaults[1], "new-weights")


def test_spread_model_streams_and_hand_over(monkeypatch):
    """A model spread over cuda:0 (embedding) and cuda:1 (LM head): a private stream on
    each, each current for its device during the call, the result handed over on cuda:1."""
    fake = fake_cuda.install(monkeypatch)
    placement = Placement(
        input=torch.device("cuda", 0),
        output=torch.device("cuda", 1),
        devices=(torch.device("cuda", 0), torch.device("cuda", 1)),
    )
    ctx = DeviceContext(placement)
    assert set(ctx.streams) == set(placement.devices)
    s0, s1 = ctx.streams[placement.devices[0]], ctx.streams[placement.devices[1]]
    assert (s0.device, s1.device) == (0, 1)
    with ctx():
        assert fake.current_device() == 0  # inputs are built on the embedding's device
        assert fake.current_stream(0) is s0 and fake.current_stream(1) is s1
        fake.launch(0, "layers-0")
        fake.launch(1, "forward")
    out = ctx.hand_over(fake_cuda.FakeTensor(torch.device("cuda", 1)))
    assert fake.ordered_after(fake.defaults[1], s1, "forward")
    assert out.recorded_on == [fake.defaults[1]]


def test_timing_events_on_the_private_stream(monkeypatch):
    fake = fake_cuda.install(monkeypatch)
    ctx = DeviceContext(torch.device("cuda", 1), use_stream=True, timing=True)
    _run_call(fake, ctx, 1, 1)
    ((start, end),) = ctx.timings
    assert start.stream is ctx.stream and end.stream is ctx.stream
    assert (start.covered, end.covered) == (0, 1)  # around the forward


def test_cpu_streams_run_the_same_code():
    ctx = DeviceContext(torch.device("cpu"), use_stream=True, timing=True)
    with ctx():
        x = torch.ones(3)
        assert torch.is_inference(x)
    assert ctx.hand_over(x) is x
    assert ctx.last_event is not None and len(ctx.timings) == 1
    assert DeviceContext(torch.device("cpu")).stream is None
