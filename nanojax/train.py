"""The train step, evaluation and the training loop shared by pretraining and finetuning.

    state = init_state(model_config, optim, mesh)            # params + optimizer, placed on the mesh
    step = make_train_step(state, mesh)                       # one jitted, donated step
    params, opt_state, losses = step(params, opt_state, inputs_ABT, targets_ABT)

A step takes the batches of all its micro-steps at once, (A, B, T), and accumulates gradients
with `lax.scan`, each micro-loss divided by A as nanochat does. Targets of -1 are ignored, which is
how finetuning masks its loss: pretraining and SFT share this step.
"""

import itertools
import json
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from nanojax import __version__
from nanojax.checkpoint import Checkpoints
from nanojax.common import Interrupted, UserError, a_few
from nanojax.evaluate import bits_per_byte, bpb_sums
from nanojax.model import GPT, GPTConfig
from nanojax.optim import Group, Schedule, build_optimizer
from nanojax.runs import (
    check_compatible,
    check_run_folder,
    claimed,
    note_changed_settings,
    note_disk_space,
    set_aside_previous_run,
)
from nanojax.sharding import batch_sharding, global_batch, make_mesh, replicated, tree_shardings


def platform_dtypes(dtype_flag: str = "auto") -> tuple[str, str]:
    """(compute dtype, Polar Express dtype) on this platform. --dtype auto computes in float32 on CPU (the
    parity-tested path; bfloat16 gains little there) and in bfloat16 on accelerators; Polar Express runs in
    float32 on CPU (bfloat16 is slower there) and in bfloat16 elsewhere, as nanochat's."""
    default = "float32" if jax.devices()[0].platform == "cpu" else "bfloat16"
    return (default if dtype_flag == "auto" else dtype_flag), default


def platform_attention(attention_flag: str, dtype: str, head_dim: int) -> str:
    """The self-attention implementation (GPT's attention) for --attention on this platform. auto: cuDNN's
    flash attention where it runs (a GPU computing in bfloat16 or float16, heads of at most 128 channels in
    multiples of 8), else nanojax's own (the parity-tested path, and the faster one on CPU)."""
    on_gpu = jax.devices()[0].platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    cudnn_ok = on_gpu and head_dim <= 128 and head_dim % 8 == 0
    if attention_flag == "auto":
        return "cudnn" if cudnn_ok else "nanojax"
    if attention_flag == "cudnn" and not cudnn_ok:
        raise UserError(
            "--attention cudnn needs an NVIDIA GPU, --dtype bfloat16 and a head dim of at most 128 in multiples "
            f"of 8 (this has {jax.devices()[0].platform}, {dtype}, {head_dim}): use --attention auto"
        )
    return attention_flag


@dataclass(frozen=True)
class OptimSettings:
    groups: dict[str, Group]
    schedule: Schedule | None
    orth_dtype: str = "float32"  # Polar Express dtype; nanochat uses bfloat16 on accelerators


@dataclass
class TrainState:
    """What the step transforms (params, opt_state) and what it is built from."""

    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    params: dict
    opt_state: optax.OptState
    param_shardings: dict
    opt_shardings: optax.OptState


def abstract_model(
    config: GPTConfig, dtype=jnp.float32, loss_chunk: int | None = None, attention: str = "nanojax"
) -> GPT:  # fmt: skip
    return nnx.eval_shape(
        lambda: GPT(config, rngs=nnx.Rngs(0), dtype=dtype, loss_chunk=loss_chunk, attention=attention)
    )


def init_state(
    config: GPTConfig, optim: OptimSettings, mesh, *, dtype=jnp.float32, fsdp=False, seed=0, load_params=None,
    loss_chunk: int | None = None, attention: str = "nanojax",
) -> TrainState:  # fmt: skip
    """Build params and optimizer state directly in their shardings (nothing materialised replicated).

    load_params(targets) -> params, if given, replaces the random init (finetuning starts from saved
    weights): it gets ShapeDtypeStructs carrying the param shardings, e.g. to restore a checkpoint into.
    loss_chunk (opt-in, see GPT): the train step's loss fuses lm_head + softcap + cross-entropy in chunks.
    attention: GPT's self-attention implementation (`platform_attention` picks one).
    """

    def init_params():
        return nnx.to_pure_dict(nnx.state(GPT(config, rngs=nnx.Rngs(seed), dtype=dtype), nnx.Param))

    graphdef = nnx.graphdef(abstract_model(config, dtype, loss_chunk, attention))
    abstract_params = jax.eval_shape(init_params)
    tx = build_optimizer(abstract_params, optim.groups, optim.schedule, jnp.dtype(optim.orth_dtype))
    param_sh = tree_shardings(abstract_params, mesh, fsdp)
    opt_sh = tree_shardings(jax.eval_shape(tx.init, abstract_params), mesh, fsdp)
    if load_params is None:
        params = jax.jit(init_params, out_shardings=param_sh)()
    else:
        params = load_params(jax.tree.map(_placed, abstract_params, param_sh))
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
    return TrainState(graphdef, tx, params, opt_state, param_sh, opt_sh)


def _placed(x, sharding):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def abstract_targets(state: TrainState):
    """ShapeDtypeStructs with shardings: the restore targets for params and optimizer state."""
    return (
        jax.tree.map(_placed, state.params, state.param_shardings),
        jax.tree.map(_placed, state.opt_state, state.opt_shardings),
    )


# Opt-in XLA CPU options for the train step (`make_train_step(..., compiler_options=...)`). YNNPACK dots
# run bfloat16 matmuls with float32 accumulation and fast transposed-operand (backward) kernels: much faster
# in bfloat16 on AVX-512 BF16 CPUs, but they change float32 numerics, so never the default.
PROGRESS_BATCHES = 16  # a shorter evaluation is over before a progress bar would help
YNN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def make_train_step(state: TrainState, mesh, compiler_options: dict | None = None):
    graphdef, tx = state.graphdef, state.tx

    def loss_fn(params, inputs, targets, scale):
        loss = nnx.merge(graphdef, params).loss(inputs, targets, groups=mesh.size)  # one mean per device
        return loss * scale, loss

    def step(params, opt_state, inputs_ABT, targets_ABT):
        scale = 1.0 / inputs_ABT.shape[0]

        def micro(acc, batch):
            (_, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, *batch, scale)
            return jax.tree.map(jnp.add, acc, grads), loss

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, losses_A = jax.lax.scan(micro, zeros, (inputs_ABT, targets_ABT))
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, losses_A

    return jax.jit(
        step,
        donate_argnums=(0, 1),
        in_shardings=(state.param_shardings, state.opt_shardings, batch_sharding(mesh), batch_sharding(mesh)),
        out_shardings=(state.param_shardings, state.opt_shardings, replicated(mesh)),
        compiler_options=compiler_options or None,
    )


def make_evaluator(graphdef, mesh, token_bytes, metric: str = "bpb"):
    """A metric over batches from jitted per-batch sums, accumulated on the host in float64: "bpb"
    (pretraining) or "loss", the mean loss over targets != -1 (finetuning, whose targets are masked)."""
    token_bytes = jnp.asarray(token_bytes)

    @jax.jit
    def sums(params, inputs_BT, targets_BT):
        loss_BT = nnx.merge(graphdef, params).loss(inputs_BT, targets_BT, reduction="none")
        tokens = (targets_BT >= 0).sum()
        if metric == "bpb":
            return *bpb_sums(loss_BT, targets_BT, token_bytes), tokens
        return loss_BT.sum(), tokens, tokens

    sharding = batch_sharding(mesh)

    def evaluate(params, batches, progress: bool = False) -> tuple[float, int]:
        """(the metric, the targets it counted, on all processes). progress: a bar on process 0 in a
        terminal (with an ETA when `batches` has a length), cleared at the end."""
        nats, count, tokens = 0.0, 0, 0
        quiet = not progress or jax.process_index() != 0
        # disable=None: no bar when stderr is not a terminal, where every redraw would pile up in the log
        batches = tqdm(batches, desc=f"val {metric}", unit="batch", leave=False, disable=True if quiet else None)
        for inputs, targets in batches:
            x, y = (global_batch(a[None], sharding)[0] for a in (inputs, targets))
            n, c, t = sums(params, x, y)
            nats, count, tokens = nats + float(n), count + int(c), tokens + int(t)
        if metric == "bpb":
            return bits_per_byte(nats, count), tokens
        return (nats / count if count else float("nan")), tokens

    return evaluate


class StepTimer:
    """Wall time per step, and the debiased EMA of the loss that nanochat logs (beta 0.9)."""

    def __init__(self, smooth_loss: float = 0.0, steps_smoothed: int = 0):
        self.smooth_loss, self.n = smooth_loss, steps_smoothed
        self.last = time.perf_counter()

    def tick(self) -> float:
        now = time.perf_counter()
        dt, self.last = now - self.last, now
        return dt

    def update(self, loss: float) -> float:
        self.smooth_loss = 0.9 * self.smooth_loss + 0.1 * loss
        self.n += 1
        return self.smooth_loss / (1 - 0.9**self.n)


def peak_memory_bytes() -> int:
    """Device peak where the backend reports it (GPU/TPU), else this process's peak RSS."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if stats.get("peak_bytes_in_use"):
        return int(stats["peak_bytes_in_use"])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# bf16 dense peak per device, for MFU; unknown devices (CPUs among them) report no MFU.
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v5 lite": 197e12,
    "TPU v4": 275e12,
}


def device_peak_flops() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


def stack_micro_batches(loader, grad_accum: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The next grad_accum host batches as (A, B, T) arrays, their ids checked: on the device an id past
    the vocab reads a clamped embedding row or gives a nan loss, not an error."""
    pairs = [next(loader) for _ in range(grad_accum)]
    x, y = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    for ids, lowest, what in ((x, 0, "input"), (y, -1, "target")):  # target -1: no loss there
        low, high = (ids.min(), ids.max()) if ids.size else (lowest, lowest)
        if low < lowest or high >= vocab_size:
            bad = low if low < lowest else high
            raise UserError(f"the data holds {what} id {bad}, outside the model's vocab of {vocab_size} tokens: "
                            "tokenize it with the model's tokenizer")  # fmt: skip
    return x, y


# --- the loop -------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """One training run; `user_config` (the command line) is stored in every checkpoint's metadata."""

    model_config: GPTConfig
    optim: OptimSettings
    num_iterations: int
    device_batch_size: int
    total_batch_size: int
    checkpoint_dir: Path
    dtype: str = "float32"
    fsdp: bool = False
    eval_every: int = 250
    eval_tokens: int = 524_288
    sample_every: int = 2000
    core_metric_every: int = 2000  # with a core_metric to evaluate (train's argument); 0: never
    save_every: int = -1
    keep_checkpoints: int = 3
    resume_from_step: int = -1
    seed: int = 0
    ynn_dots: bool = False  # opt-in: XLA CPU's YNNPACK dots for the train step (YNN_DOTS), for bfloat16
    loss_chunk: int | None = None  # opt-in fused lm_head + softcap + cross-entropy (GPT's loss_chunk)
    attention: str = "nanojax"  # GPT's self-attention implementation, see platform_attention
    eval_metric: str = "bpb"  # "bpb" or "loss" (finetuning): logged, saved and summarised as val_<metric>
    # Tokens per row; None: the model's sequence_len. Finetuning may pick another: the model keeps its windows.
    seq_len: int | None = None
    user_config: dict = field(default_factory=dict)


@dataclass
class History:
    train_loss: list = field(default_factory=list)  # (step, debiased EMA loss)
    val_bpb: list = field(default_factory=list)  # (step, bpb)
    val_loss: list = field(default_factory=list)  # (step, masked mean loss), finetuning's metric
    core_metric: list = field(default_factory=list)  # (step, CORE)
    samples: list = field(default_factory=list)  # the last set of greedy samples


def grad_accum_steps(total_batch_size: int, device_batch_size: int, seq_len: int, dp: int) -> int:
    per_micro = device_batch_size * seq_len * dp
    if total_batch_size % per_micro:
        raise UserError(
            f"--total-batch-size {total_batch_size} is not divisible by device_batch_size x max_seq_len x "
            f"devices = {device_batch_size} x {seq_len} x {dp} = {per_micro}: pick a multiple of {per_micro}"
        )
    return total_batch_size // per_micro


def train(
    run: RunConfig,
    tokenizer,
    make_train_loader,
    val_batches,
    sample,
    on_metrics=None,
    log=print,
    init_params=None,
    core_metric=None,
) -> dict:
    """Train `run`; returns a summary dict. Callers supply the data and the sampler:

    make_train_loader(state | None, batch_size) -> iterator of host (inputs, targets) batches;
    val_batches(batch_size) -> iterable of host batches (the same on every call);
    sample(graphdef, params) -> list of strings;
    on_metrics(step, dict), if given, receives each step's metrics (e.g. for Weights & Biases);
    init_params(targets) -> params, if given, starts a fresh run from these weights (see init_state);
    core_metric(graphdef, params) -> float, if given, is evaluated every run.core_metric_every steps and at
    the end (pretraining's CORE, as nanochat's base_train).
    """
    with claimed(Path(run.checkpoint_dir)):
        return _train(run, tokenizer, make_train_loader, val_batches, sample, on_metrics, log, init_params, core_metric)


def _train(run, tokenizer, make_train_loader, val_batches, sample, on_metrics, log, init_params, core_metric) -> dict:
    config = run.model_config
    ckpts = Checkpoints(run.checkpoint_dir, max_to_keep=run.keep_checkpoints) if run.resume_from_step >= 0 else None
    if ckpts is not None:  # a checkpoint that is not there is named before any other setting
        ckpts.resolve_step(run.resume_from_step)
    if run.resume_from_step >= run.num_iterations:
        raise UserError(
            f"--resume-from-step {run.resume_from_step} is already at the run's end (--num-iterations "
            f"{run.num_iterations}): pass a larger --num-iterations to train on"
        )
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise UserError(
            f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model expects {config.vocab_size}: "
            "retrain the tokenizer with --vocab-size to match, or use the model's own base dir"
        )
    mesh = make_mesh()
    T, dp = run.seq_len or config.sequence_len, mesh.size
    accum = grad_accum_steps(run.total_batch_size, run.device_batch_size, T, dp)
    local_rows = run.device_batch_size * jax.local_device_count()
    dtype = jnp.dtype(run.dtype)

    # A fresh run sets an earlier run in its folder aside at its first save, not before: a run that fails
    # to start (a bad flag, out of memory, Ctrl-C while compiling) leaves the model tag as it was. A folder
    # that is not a run's is refused now, not after the training it would have held.
    if ckpts is None:
        check_run_folder(Path(run.checkpoint_dir))
    load = init_params if run.resume_from_step < 0 else None  # a resume restores its own params
    state = init_state(
        config, run.optim, mesh, dtype=dtype, fsdp=run.fsdp, seed=run.seed, load_params=load,
        loss_chunk=run.loss_chunk, attention=run.attention,
    )  # fmt: skip
    metric = f"val_{run.eval_metric}"  # val_bpb or val_loss: the History field and the saved keys
    step, loop, loader_state = (
        0,
        {f"min_{metric}": None, "smooth_train_loss": 0.0, "total_training_time": 0.0, "timed_steps": 0},
        None,
    )
    history = History()
    if run.resume_from_step >= 0:
        meta = ckpts.read_metadata(run.resume_from_step)
        check_compatible(meta, config, tokenizer, ckpts.step_dir(run.resume_from_step))
        note_changed_settings(meta.get("user_config", {}), run.user_config, log)
        abstract_params, abstract_opt_state = abstract_targets(state)
        r = ckpts.restore(run.resume_from_step, params=abstract_params, opt_state=abstract_opt_state)
        state.params, state.opt_state, loader_state = r.params, r.opt_state, r.loader_state
        step, loop = r.step, r.metadata["loop_state"]
        loop.setdefault("timed_steps", max(step - 1, 0))  # checkpoints from before the count was kept
        history = History(**{k: [tuple(x) for x in v] for k, v in loop.pop("history", {}).items()})

    graphdef = state.graphdef
    step_fn = make_train_step(state, mesh, YNN_DOTS if run.ynn_dots else None)
    evaluate = make_evaluator(graphdef, mesh, tokenizer.token_bytes, run.eval_metric)
    loader = make_train_loader(loader_state, local_rows)
    if run.resume_from_step >= 0:  # said once the data, too, has taken the checkpoint's state
        log(f"resumed from {ckpts.step_dir(step)} at step {step}")
    sharding = batch_sharding(mesh)
    timer = StepTimer(loop["smooth_train_loss"], step)
    shapes = abstract_model(config)  # sizes and FLOPs, no arrays
    flops_per_step = shapes.flops_per_token() * run.total_batch_size
    peak = device_peak_flops()
    eval_batches = max(1, run.eval_tokens // (run.device_batch_size * T * dp))
    log(f"grad accumulation {accum} x {local_rows} rows x {T} tokens per process, {dp} device(s), "
        f"{run.num_iterations} steps of {run.total_batch_size:,} tokens")  # fmt: skip
    note_disk_space(Path(run.checkpoint_dir), state, run.keep_checkpoints, log)

    def evaluate_now(params):
        # eval_batches is only a cap (validation is one pass over a split of unknown size): no ETA.
        batches = itertools.islice(val_batches(local_rows), eval_batches)
        value, tokens = evaluate(params, batches, progress=eval_batches >= PROGRESS_BATCHES)
        getattr(history, metric).append((step, value))
        best = loop[f"min_{metric}"]
        loop[f"min_{metric}"] = value if best is None else min(best, value)
        log(f"step {step:05d} | val {run.eval_metric} {value:.4f} over {tokens:,} tokens")
        if on_metrics:
            on_metrics(step, {metric: value})
        return value

    def save(params, opt_state, val):
        nonlocal ckpts, saved_step
        saved_step = step
        if ckpts is None:
            set_aside_previous_run(Path(run.checkpoint_dir), log)
            ckpts = Checkpoints(run.checkpoint_dir, max_to_keep=run.keep_checkpoints)
        loop_state = dict(loop, history=asdict(history))
        meta = {
            "step": step, metric: val, "model_config": asdict(config), "user_config": run.user_config,
            "device_batch_size": run.device_batch_size, "max_seq_len": T, "loop_state": loop_state,
            "tokenizer_fingerprint": tokenizer.fingerprint(), "nanojax_version": __version__,
        }  # fmt: skip
        pruned = ckpts.save(step, params, opt_state, all_processes_state(loader_state), meta)
        dropped = f" (dropping step {a_few(pruned)}: --keep-checkpoints {run.keep_checkpoints})" if pruned else ""
        log(f"step {step:05d} | checkpoint {ckpts.step_dir(step)}{dropped}")

    params, opt_state = state.params, state.opt_state
    del state  # the step donates these buffers: keep no second reference
    val, saved_step, t_start = None, None, time.perf_counter()
    timer.tick()
    x, y = stack_micro_batches(loader, accum, config.vocab_size)
    first_step = step + 1  # mostly compilation, in a fresh run and in a resumed one: not timed
    stop = StopRequest(log)
    try:
        if step == 0 and run.eval_every > 0:  # the untrained model's figure, as nanochat gives
            val = evaluate_now(params)
            timer.tick()
        while step < run.num_iterations:
            params, opt_state, losses = step_fn(params, opt_state, global_batch(x, sharding), global_batch(y, sharding))
            step += 1
            loader_state = loader.get_state()  # the position after this step's batches, for its checkpoint
            if step < run.num_iterations:
                x, y = stack_micro_batches(loader, accum, config.vocab_size)  # while the device runs the step
            loss = float(np.mean(np.asarray(losses)))  # the one sync per step
            dt = timer.tick()
            if not math.isfinite(loss):
                # This run's last checkpoint, saved or resumed from; not one of an earlier run in the folder.
                good = saved_step if saved_step is not None else max(run.resume_from_step, 0)
                where = (f"its last good checkpoint, step {good}, is in {run.checkpoint_dir}: resume from it" if good
                         else "this run saved no checkpoint: start it again")  # fmt: skip
                raise UserError(
                    f"loss became {loss} at step {step}; {where} with lower learning rates (--matrix-lr, "
                    "--embedding-lr)"
                )
            if step > first_step:
                loop["total_training_time"] += dt
                loop["timed_steps"] += 1
            smooth = timer.update(loss)
            loop["smooth_train_loss"] = timer.smooth_loss
            history.train_loss.append((step, smooth))
            timed = loop["timed_steps"]
            eta = fmt_time(loop["total_training_time"] / timed * (run.num_iterations - step)) if timed else "n/a"
            lrm = float(run.optim.schedule.lr_multiplier(step - 1)) if run.optim.schedule else 1.0
            mfu = f"{100 * flops_per_step / dt / (peak * dp):.1f}%" if peak else "n/a"
            log(f"step {step:05d}/{run.num_iterations:05d} ({100 * step / run.num_iterations:.1f}%) | "
                f"loss {smooth:.6f} | lrm {lrm:.2f} | dt {dt * 1000:.0f}ms | tok/s {run.total_batch_size / dt:,.0f} | "
                f"mfu {mfu} | epoch {loader.epoch} | elapsed {fmt_time(time.perf_counter() - t_start)} | "
                f"eta {eta}")  # fmt: skip

            if on_metrics:
                on_metrics(step, {"loss": smooth, "lrm": lrm, "dt": dt, "tok_per_s": run.total_batch_size / dt})
            last = step == run.num_iterations
            if last or (run.eval_every > 0 and step % run.eval_every == 0):
                val = evaluate_now(params)
            every = run.core_metric_every
            if core_metric and every and (last or (every > 0 and step % every == 0)):
                core = core_metric(graphdef, params)
                history.core_metric.append((step, core))
                log(f"step {step:05d} | CORE metric {core:.4f}")
                if on_metrics:
                    on_metrics(step, {"core_metric": core})
            if last or (run.save_every > 0 and step % run.save_every == 0):
                save(params, opt_state, val)
            if last or (run.sample_every > 0 and step % run.sample_every == 0):
                try:  # samples only show progress: one that can't be made must not end the run
                    history.samples = sample(graphdef, params)
                except UserError as e:
                    log(f"step {step:05d} | samples skipped: {e}")
                else:
                    for s in history.samples:
                        log(f"sample: {s!r}")
            timer.tick()  # evaluation, sampling and saving don't count as step time
            if stop.asked and not last:
                if saved_step != step:
                    save(params, opt_state, val)
                raise Interrupted(f"stopped at step {step}, saved: resume with --resume-from-step {step}")
    except KeyboardInterrupt:
        if ckpts:
            ckpts.wait()  # a save in flight is finished, and counts below
        saved = ckpts.latest_step() if ckpts else None
        resume = f"resume with --resume-from-step {saved}" if saved is not None else "no checkpoint was saved"
        raise Interrupted(f"interrupted at step {step}: {resume}") from None
    finally:
        stop.restore()
        if ckpts:
            try:
                ckpts.close()  # waits for pending saves: whatever ends the run, a checkpoint being written is kept
            except KeyboardInterrupt:
                saved = ckpts.latest_step()
                resume = f"resume with --resume-from-step {saved}" if saved is not None else "no checkpoint was saved"
                raise Interrupted(f"interrupted while saving: {resume}") from None

    tokens = run.total_batch_size * run.num_iterations
    timed = loop["timed_steps"]  # none in a one-step run: no steady rate to report
    steady_tok_s = run.total_batch_size * timed / loop["total_training_time"] if timed else None
    return {
        "model_config": asdict(config), "num_params": shapes.num_params(), "tokens": tokens,
        "num_scaling_params": shapes.num_scaling_params(), "flops_per_token": shapes.flops_per_token(),
        "training_time_s": loop["total_training_time"], "tokens_per_s": steady_tok_s,
        "mfu": 100 * flops_per_step * steady_tok_s / run.total_batch_size / (peak * dp) if peak and timed else None,
        "peak_memory_bytes": peak_memory_bytes(), "eval_metric": run.eval_metric,
        f"min_{metric}": loop[f"min_{metric}"], f"final_{metric}": val,
        "final_loss": history.train_loss[-1][1] if history.train_loss else None, "history": history,
        "final_core_metric": history.core_metric[-1][1] if history.core_metric else None,
        "devices": f"{dp} x {jax.devices()[0].device_kind}", "checkpoint_dir": str(run.checkpoint_dir),
        "user_config": run.user_config, "params": params,
    }  # fmt: skip


class StopRequest:
    """Ctrl-C in the training loop asks it to stop after the step in flight and save that step: a run
    that saves rarely (by default only at its end) loses nothing. A second Ctrl-C stops at once. Only
    where Python takes signals (the main thread) and in a single process: the processes of a multi-host
    run would first have to agree on a step to stop at."""

    def __init__(self, log):
        self.asked, self._log, self._previous = False, log, None
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGINT, self._ask) or signal.default_int_handler

    def _ask(self, signum, frame):
        self.asked = True
        signal.signal(signal.SIGINT, self._previous)
        self._log("Ctrl-C: stopping after this step, which is saved (Ctrl-C again to stop at once)")

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def all_processes_state(state: dict) -> dict:
    """Merge the loader states of every process (each holds its own readers) for the checkpoint."""
    if jax.process_count() == 1:
        return state
    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps(state).encode(), np.uint8)
    size = int(np.max(multihost_utils.process_allgather(np.array([blob.size]))))
    padded = np.zeros(size, np.uint8)
    padded[: blob.size] = blob
    merged = {"readers": {}}
    for row in multihost_utils.process_allgather(padded):
        merged["readers"] |= json.loads(bytes(row).rstrip(b"\0").decode())["readers"]
    return merged


def fmt_time(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
