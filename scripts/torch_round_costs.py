"""Bytes copied and host syncs per round of AR / SD / SSD on tiny torch models (CPU).

Counts, per lane (target, draft) and for the core's own math, the bytes written by
data-movement ops (:func:`backends.torch.count_copies`) and the calls that would block
the host on a GPU (:func:`backends.torch.count_host_syncs` with ``simulate=True``),
over a whole ``generate`` run with the sequential driver, divided by the rounds.

The models are random-weight Hugging Face Llamas built from a config (no download):
the target 4 layers, the draft 2 layers, width 64, 4 heads / 2 KV heads, vocab 512,
float32; the prompts are ``--prompt`` tokens long.

Usage::

    PYTHONPATH=. python scripts/torch_round_costs.py [--prompt 128] [--tokens 48] [--json out.json]

The script only needs ``backends.torch.count_copies`` / ``count_host_syncs``; to
measure an older backend, copy ``backends/torch/_counters.py`` next to it (see
docs/torch.md, "Bytes copied per round").
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from typing import Any

import torch

try:
    from backends.torch import count_copies, count_host_syncs
except ImportError:  # an older backend with the counters module copied in
    from backends.torch._counters import count_copies, count_host_syncs  # type: ignore
from backends.torch import TorchModel
from ssd_core import SamplingParams, SSDConfig, generate

VOCAB = 512


def tiny_llama(layers: int, seed: int, context: int) -> Any:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        initializer_range=0.3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


class Counted:
    """A model proxy that counts bytes copied and host syncs inside its own calls."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.bytes: collections.Counter[str] = collections.Counter()
        self.syncs: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._model, name)
        if name not in ("open", "extend", "fork", "truncate", "close"):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            with count_copies() as copies, count_host_syncs(simulate=True) as syncs:
                out = attr(*args, **kwargs)
            self.bytes.update(copies.by_op)
            self.syncs.update(syncs.by_kind)
            self.calls[name] += 1
            return out

        return counted


def measure(mode: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    context = args.prompt + args.tokens + 64
    target = Counted(TorchModel.from_module(tiny_llama(4, 0, context)))
    draft = Counted(TorchModel.from_module(tiny_llama(2, 1, context)))
    gen = torch.Generator().manual_seed(batch)
    prompts = [
        torch.randint(0, VOCAB, (args.prompt,), generator=gen).tolist() for _ in range(batch)
    ]
    with count_copies() as all_copies, count_host_syncs(simulate=True) as all_syncs:
        res = generate(
            target,
            draft,
            prompts=prompts,
            mode=mode,
            max_new_tokens=args.tokens,
            sampling=SamplingParams(temperature=args.temperature),
            config=SSDConfig(k=args.k, fanout=args.fanout),
            driver="sequential",
            seed=0,
        )
    rounds = res.metrics.rounds
    lanes = {"target": target, "draft": draft}
    backend_bytes = sum(sum(m.bytes.values()) for m in lanes.values())
    backend_syncs = sum(sum(m.syncs.values()) for m in lanes.values())
    return {
        "mode": mode,
        "batch": batch,
        "rounds": rounds,
        "tokens": sum(len(t) for t in res.tokens),
        "bytes_per_round": {
            **{lane: sum(m.bytes.values()) / rounds for lane, m in lanes.items()},
            "core": (all_copies.total - backend_bytes) / rounds,
        },
        "bytes_by_op_per_round": {
            lane: {op: b / rounds for op, b in m.bytes.most_common()} for lane, m in lanes.items()
        },
        "syncs_per_round": {
            **{lane: sum(m.syncs.values()) / rounds for lane, m in lanes.items()},
            "core": (all_syncs.total - backend_syncs) / rounds,
            "total": all_syncs.total / rounds,
        },
        "calls": {lane: dict(m.calls) for lane, m in lanes.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--fanout", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--modes", default="ar,sd,ssd")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for mode in args.modes.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            row = measure(mode, batch, args)
            rows.append(row)
            b, s = row["bytes_per_round"], row["syncs_per_round"]
            print(
                f"{mode:3s} B={batch}: {row['rounds']:3d} rounds | KiB/round target "
                f"{b['target'] / 1024:9.1f} draft {b['draft'] / 1024:9.1f} core "
                f"{b['core'] / 1024:7.1f} | syncs/round target {s['target']:5.1f} draft "
                f"{s['draft']:5.1f} core {s['core']:6.1f}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
