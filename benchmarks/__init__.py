"""Throughput scripts (see README.md here). Each names the machine its figures come from.

The d4 seed run's shape and hyper-parameters live here, jax-free, so that train_throughput (JAX) and
nanochat_torch (PyTorch, which must not import jax: its peak memory would carry jax's) share them."""

import os
import platform
import statistics
import time

from nanojax.common import positive_int

# The seed run's base_train flags (the Makefile's SEED_RUN; nanochat's defaults for the rest).
SEED_HYPERPARAMS = dict(
    embedding_lr=0.3, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5, weight_decay=0.1, adam_betas=(0.8, 0.95)
)


def machine() -> str:
    """The processor, CPU count and OS, in words."""
    name = platform.processor()
    if not name and os.path.exists("/proc/cpuinfo"):  # Linux leaves processor() empty
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    return f"{name or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}"


def comma_list(kind):
    """A repeatable flag that also takes comma lists: `--dtype float32,bfloat16`."""

    def parse(text: str) -> list:
        return [kind(x) for x in text.split(",")]

    parse.__name__ = getattr(kind, "__name__", "value")  # argparse names it in "invalid ... value"
    return parse


def add_shape_flags(parser) -> None:
    """The model and batch flags of the train-step benchmarks; the defaults are the d4 seed run's shape."""
    a = parser.add_argument
    a("--depth", type=positive_int, default=4, help="transformer layers")
    a("--aspect-ratio", type=positive_int, default=32, help="model_dim = depth x aspect ratio")
    a("--head-dim", type=positive_int, default=64, help="attention head width")
    a("--max-seq-len", type=positive_int, default=512, help="tokens per row (T)")
    a("--vocab-size", type=positive_int, default=8192, help="vocabulary size")
    a("--window-pattern", default="L", help="sliding windows per layer, e.g. SSSL")
    a("--device-batch-size", type=comma_list(positive_int), action="extend",
      help="rows per device per micro-step; repeatable or a comma list (default: 1,8)")  # fmt: skip
    a("--total-batch-size", type=positive_int, default=4096,
      help="tokens per optimizer step; the rest is gradient accumulation")  # fmt: skip


def timed(fn, steps: int, warmup: int) -> tuple[float, float]:
    """(seconds of the first call, median seconds of `steps` calls after `warmup` more). fn waits for its result."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)
