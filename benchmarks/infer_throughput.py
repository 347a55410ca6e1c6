"""Decoding speed of the KV-cached Engine (nanojax.engine), with one host round trip per token as the baseline.

    python -m benchmarks.infer_throughput                        # the d4 seed model, batch 1 and 8
    python -m benchmarks.infer_throughput --batch-size 1,8,32 --max-tokens 512 --chunk 32

A randomly initialised model (speed does not depend on the weights) samples --max-tokens new tokens
after a --prompt-len token prompt, at temperature 1 with top-k. No tokenizer means no stop tokens, so
every row decodes all of them. The Engine runs up to --chunk tokens per host round trip inside a
jitted while_loop; chunk 1 is the classic loop that comes back to Python after every token. Each row
reports the first call (compilation included) and the median of --repeats calls, prefill included.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import machine
from benchmarks.train_throughput import comma_list
from nanojax.common import HelpFormatter, cli, nonnegative_int, positive_int
from nanojax.engine import Engine
from nanojax.model import GPT, config_from_depth


def time_generate(engine: Engine, prompt, batch: int, max_tokens: int, top_k: int, repeats: int):
    """(seconds of the first call, median seconds of the next `repeats`) for one generate_batch."""

    def run():
        start = time.perf_counter()
        results, _ = engine.generate_batch(prompt, batch, max_tokens=max_tokens, temperature=1.0, top_k=top_k)
        assert all(len(r) == len(prompt) + max_tokens for r in results)
        return time.perf_counter() - start

    first = run()
    return first, statistics.median(run() for _ in range(repeats))


@cli
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--depth", type=positive_int, default=4, help="transformer layers")
    parser.add_argument("--aspect-ratio", type=positive_int, default=32, help="model_dim = depth x aspect ratio")
    parser.add_argument("--head-dim", type=positive_int, default=64, help="attention head width")
    parser.add_argument("--max-seq-len", type=positive_int, default=512, help="the model's training length")
    parser.add_argument("--vocab-size", type=positive_int, default=8192, help="vocabulary size")
    parser.add_argument("--window-pattern", default="L", help="sliding windows per layer, e.g. SSSL")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute and cache dtype")
    parser.add_argument("--batch-size", type=comma_list(positive_int), action="extend",
                        help="samples decoded together; repeatable or a comma list (default: 1,8)")  # fmt: skip
    parser.add_argument("--prompt-len", type=positive_int, default=16, help="prompt tokens (one prefill)")
    parser.add_argument("--max-tokens", type=positive_int, default=256, help="new tokens per sample")
    parser.add_argument("--top-k", type=nonnegative_int, default=50, help="sample among the k likeliest (0: all)")
    parser.add_argument("--chunk", type=positive_int, default=16, help="tokens per host round trip for the Engine row")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed calls per row (the median is reported)")
    args = parser.parse_args()

    config = config_from_depth(
        args.depth, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim, max_seq_len=args.max_seq_len,
        vocab_size=args.vocab_size, window_pattern=args.window_pattern,
    )  # fmt: skip
    dtype = jnp.dtype(args.dtype)
    model = GPT(config, rngs=nnx.Rngs(0), dtype=dtype)
    prompt = list(range(1, args.prompt_len + 1))
    print(f"machine: {machine()}")
    print(f"devices: {jax.devices()} (jax {jax.__version__})")
    print(f"model: {config}, {model.num_params():,} parameters, {args.dtype}")
    print(f"prompt {args.prompt_len} tokens, {args.max_tokens} new tokens per sample, top-k {args.top_k}")
    print()
    header = f"{'batch':>5} {'decode':<22} {'1st call s':>10} {'ms/step':>8} {'tokens/s':>9}"
    print(header)
    print("-" * len(header))
    for B in args.batch_size or [1, 8]:
        for chunk, name in ((args.chunk, f"engine, chunk {args.chunk}"), (1, "round trip per token")):
            engine = Engine(model, cache_dtype=dtype, chunk=chunk)
            first, dt = time_generate(engine, prompt, B, args.max_tokens, args.top_k or None, args.repeats)
            # ms/step: one new token in every row (at batch 1, ms per token).
            print(f"{B:>5} {name:<22} {first:>10.1f} {1000 * dt / args.max_tokens:>8.2f} "
                  f"{B * args.max_tokens / dt:>9,.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
