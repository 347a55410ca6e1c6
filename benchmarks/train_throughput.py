"""Training throughput of the jitted, donated train step (nanojax.train) on random token batches.

    python -m benchmarks.train_throughput                                   # the d4 seed config, batch 1 and 8
    python -m benchmarks.train_throughput --device-batch-size 8 --dtype float32 --dtype bfloat16
    python -m benchmarks.train_throughput --depth 12 --aspect-ratio 64 --head-dim 128 --max-seq-len 2048 \\
        --vocab-size 32768 --window-pattern SSSL --total-batch-size 524288 --device-batch-size 32 \\
        --dtype bfloat16 --attention cudnn,nanojax       # a GPU: cuDNN's flash attention against ours

Prints the machine, then one row per (dtype, attention, device batch): the first call (compilation + one step),
the steady step time and tokens/s (median over --steps, each step waited for), peak memory and MFU
where the device's peak FLOPs are known. A second table times one optimizer update alone against one
forward+backward of a single 1 x T row. The batches are random tokens: the loader has its own
benchmark (benchmarks.data_throughput).
"""

import argparse
import itertools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks import SEED_HYPERPARAMS, add_shape_flags, comma_list, machine, timed
from nanojax.common import (
    ATTENTION_IMPLEMENTATIONS,
    HelpFormatter,
    cli,
    is_out_of_memory,
    keep_freed_memory,
    nonnegative_int,
    positive_int,
)
from nanojax.model import config_from_depth
from nanojax.optim import Schedule, scaled_groups
from nanojax.sharding import make_mesh
from nanojax.train import (
    YNN_DOTS,
    OptimSettings,
    abstract_model,
    device_peak_flops,
    grad_accum_steps,
    init_state,
    make_train_step,
    peak_memory_bytes,
    platform_attention,
    platform_dtypes,
)


def one_of(*names: str):
    """A comma-list item type that must be one of `names`."""

    def check(text: str) -> str:
        if text not in names:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(names)}")
        return text

    return check


def seed_setup(args) -> tuple:
    """(config, optimizer settings) of the shape flags (benchmarks.add_shape_flags), with the seed run's
    hyper-parameters; a long schedule keeps the lr multiplier at 1 over the timed steps."""
    config = config_from_depth(
        args.depth, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim, max_seq_len=args.max_seq_len,
        vocab_size=args.vocab_size, window_pattern=args.window_pattern,
    )  # fmt: skip
    groups = scaled_groups(config.n_embd, args.depth, args.total_batch_size, **SEED_HYPERPARAMS)
    # As pretraining chooses: Polar Express in float32 on CPU, bfloat16 on accelerators.
    return config, OptimSettings(groups, Schedule(10_000), orth_dtype=platform_dtypes()[1])


def train_step_fn(state, mesh, x_ABT, y_ABT, compiler_options=None):
    """One train step on (x, y) as a call that waits for it; the donated params and optimizer state carry over."""
    step = make_train_step(state, mesh, compiler_options)
    carry = [state.params, state.opt_state]  # donated by every step: only the latest ones stay alive

    def one_step():
        carry[0], carry[1], losses = step(carry[0], carry[1], x_ABT, y_ABT)
        losses.block_until_ready()

    return one_step


def time_train_step(state, mesh, x_ABT, y_ABT, steps, warmup, compiler_options=None) -> tuple[float, float]:
    return timed(train_step_fn(state, mesh, x_ABT, y_ABT, compiler_options), steps, warmup)


def time_parts(state, x_BT, y_BT, steps, warmup) -> tuple[float, float]:
    """Median seconds of one forward+backward and of one optimizer update (tx.update + apply_updates)."""
    graphdef, tx = state.graphdef, state.tx
    grad_fn = jax.jit(jax.grad(lambda params, x, y: nnx.merge(graphdef, params).loss(x, y)))

    @partial(jax.jit, donate_argnums=(0, 1))
    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    grads = grad_fn(state.params, x_BT, y_BT)
    _, fwd_bwd = timed(lambda: jax.block_until_ready(grad_fn(state.params, x_BT, y_BT)), steps, warmup)
    carry = [state.params, state.opt_state]

    def opt_step():
        carry[0], carry[1] = jax.block_until_ready(update(carry[0], carry[1], grads))

    _, opt = timed(opt_step, steps, warmup)
    return fwd_bwd, opt


@cli
def main():
    keep_freed_memory()  # as the training scripts do
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    add_shape_flags(parser)
    parser.add_argument("--dtype", type=comma_list(one_of("float32", "bfloat16")), action="extend",
                        help="compute dtype: float32 and/or bfloat16; repeatable (default: float32)")  # fmt: skip
    parser.add_argument("--attention", type=comma_list(one_of("auto", *ATTENTION_IMPLEMENTATIONS)), action="extend",
                        help="self-attention: auto, nanojax, xla, cudnn; repeatable (default: auto)")  # fmt: skip
    parser.add_argument("--loss-chunk", type=positive_int, default=None,
                        help="opt-in: fused lm_head + softcap + cross-entropy over vocab chunks")  # fmt: skip
    parser.add_argument("--ynn-dots", action="store_true",
                        help="opt-in: XLA CPU's YNNPACK matmuls (fast bfloat16; not float32-faithful)")  # fmt: skip
    parser.add_argument("--steps", type=positive_int, default=20, help="timed steps per row (the median is reported)")
    parser.add_argument("--warmup", type=nonnegative_int, default=2, help="untimed steps after the first")
    parser.add_argument("--parts", action=argparse.BooleanOptionalAction, default=True,
                        help="the second table: the optimizer update against one forward+backward")  # fmt: skip
    args = parser.parse_args()
    batch_sizes, dtypes = args.device_batch_size or [1, 8], args.dtype or ["float32"]
    attentions = args.attention or ["auto"]

    config, optim = seed_setup(args)
    model = abstract_model(config)
    mesh = make_mesh()
    T, dp = config.sequence_len, mesh.size
    on_cpu = jax.devices()[0].platform == "cpu"
    flops_per_token, peak = model.flops_per_token(), device_peak_flops()
    rng = np.random.default_rng(0)

    def tokens(*shape):
        return rng.integers(0, config.vocab_size, shape, dtype=np.int32)

    print(f"machine: {machine()}")
    print(f"devices: {jax.devices()} (jax {jax.__version__})")
    print(f"model: {config}")
    print(f"{model.num_params():,} parameters, {flops_per_token:.3e} FLOPs/token, "
          f"{args.total_batch_size:,} tokens per step, optimizer orth dtype {optim.orth_dtype}")  # fmt: skip
    print("peak memory: " + ("process peak RSS so far (it only grows across rows)" if on_cpu else "device peak"))
    print()
    header = (
        f"{'batch':>5} {'accum':>5} {'dtype':>8} {'attention':>9} {'1st call s':>10} {'step ms':>8} {'tokens/s':>9} "
        f"{'peak MiB':>8} {'GFLOP/s':>8} {'MFU':>6}"
    )
    print(header)
    print("-" * len(header))
    for dtype, attention, B in itertools.product(dtypes, attentions, batch_sizes):
        attention = platform_attention(attention, dtype, config.head_dim)
        accum = grad_accum_steps(args.total_batch_size, B, T, dp)
        state = init_state(
            config, optim, mesh, dtype=jnp.dtype(dtype), loss_chunk=args.loss_chunk, attention=attention
        )  # fmt: skip
        x, y = (jnp.asarray(tokens(accum, B * dp, T)) for _ in range(2))
        try:
            first, dt = time_train_step(state, mesh, x, y, args.steps, args.warmup, YNN_DOTS if args.ynn_dots else None)
        except Exception as e:  # a batch too big for the device: say so, go on to the next row
            if not is_out_of_memory(e):
                raise
            print(f"{B:>5} {accum:>5} {dtype:>8} {attention:>9}  out of device memory: try a smaller batch")
            continue
        finally:
            del state, x, y
        tok_s = args.total_batch_size / dt
        mfu = f"{100 * flops_per_token * tok_s / (peak * dp):.1f}%" if peak else "n/a"
        print(f"{B:>5} {accum:>5} {dtype:>8} {attention:>9} {first:>10.1f} {1000 * dt:>8.1f} {tok_s:>9,.0f} "
              f"{peak_memory_bytes() / 2**20:>8,.0f} "
              f"{flops_per_token * tok_s / 1e9:>8,.1f} {mfu:>6}")  # fmt: skip

    if not args.parts:
        return
    # The optimizer alone vs one forward+backward of a 1 x T row: where a batch-1 step's time goes.
    print()
    print(f"optimizer update vs forward+backward (1 x {T} tokens)")
    header = f"{'dtype':>8} {'attention':>9} {'fwd+bwd ms':>10} {'optimizer ms':>12} {'optimizer / fwd+bwd':>19}"
    print(header)
    print("-" * len(header))
    for dtype in dtypes:
        attention = platform_attention(attentions[0], dtype, config.head_dim)
        state = init_state(config, optim, mesh, dtype=jnp.dtype(dtype), loss_chunk=args.loss_chunk, attention=attention)
        fwd_bwd, opt = time_parts(state, jnp.asarray(tokens(1, T)), jnp.asarray(tokens(1, T)), args.steps, args.warmup)
        print(f"{dtype:>8} {attention:>9} {1000 * fwd_bwd:>10.1f} {1000 * opt:>12.1f} {opt / fwd_bwd:>19.2f}")


if __name__ == "__main__":
    main()
