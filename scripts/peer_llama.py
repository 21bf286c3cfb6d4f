"""llama-cpp-python's own generation on the bundled SmolLM2, the yardstick for
``ssd generate`` (docs/benchmarks.md).

Prints one line: tokens generated, seconds spent generating (prompt included, load
excluded) and tokens per second. Run it whole under ``farm-bench`` to compare start-up,
wall time and peak memory with ``ssd generate``::

    farm-bench --vs 'python scripts/peer_llama.py -n 64 "The capital of France is"' -- \\
        ssd generate -n 64 "The capital of France is"

``--lookup N`` turns on llama-cpp-python's prompt-lookup decoding
(``LlamaPromptLookupDecoding(num_pred_tokens=N)``). Greedy (temperature 0), one thread
by default, flash attention off (llama-cpp-python's default).
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prompt")
    p.add_argument("-n", "--max-new-tokens", type=int, default=64)
    p.add_argument("-t", "--threads", type=int, default=1)
    p.add_argument("-c", "--ctx-size", type=int, default=1024)
    p.add_argument("--lookup", type=int, default=0, help="prompt lookup: tokens per guess")
    p.add_argument("--chat", action="store_true", help="apply the chat template")
    args = p.parse_args(argv)

    from llama_cpp import Llama

    from backends.llama_cpp import smollm2_path

    kw = {}
    if args.lookup:
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        kw["draft_model"] = LlamaPromptLookupDecoding(num_pred_tokens=args.lookup)
    llm = Llama(
        model_path=str(smollm2_path()),
        n_ctx=args.ctx_size,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
        **kw,
    )
    t0 = time.perf_counter()
    if args.chat:
        out = llm.create_chat_completion(
            [{"role": "user", "content": args.prompt}],
            max_tokens=args.max_new_tokens,
            temperature=0.0,
        )
    else:
        out = llm.create_completion(args.prompt, max_tokens=args.max_new_tokens, temperature=0.0)
    dt = time.perf_counter() - t0
    n = out["usage"]["completion_tokens"]
    print(f"{n} tokens in {dt:.3f} s: {n / dt:.1f} tok/s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
