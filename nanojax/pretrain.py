"""Pretraining from command-line settings: data, tokenizer, model size, horizon, optimizer, report.

scripts/pretrain.py parses the flags (nanochat's base_train names) and calls `pretrain`.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from nanojax import core_eval, dataset
from nanojax.common import UserError
from nanojax.engine import sample_texts
from nanojax.loader import Readers, make_val_loader
from nanojax.model import config_from_depth
from nanojax.optim import Schedule, scaled_groups
from nanojax.report import write_report
from nanojax.tokenizer import get_tokenizer
from nanojax.train import OptimSettings, RunConfig, abstract_model, platform_attention, platform_dtypes, train


def horizon(args, flops_per_token: int, scaling_params: int) -> int:
    """Optimizer steps: --num-iterations, else --target-flops, else --target-param-data-ratio."""
    if args.num_iterations == 0 or args.num_iterations < -1:
        raise UserError(f"--num-iterations {args.num_iterations}: give a positive count, or -1 to derive it")
    if args.num_iterations > 0:
        return args.num_iterations
    if args.target_flops > 0:
        return max(1, round(args.target_flops / (flops_per_token * args.total_batch_size)))
    if args.target_param_data_ratio > 0:
        return max(1, int(args.target_param_data_ratio * scaling_params) // args.total_batch_size)
    raise UserError("no training horizon: set --num-iterations, --target-flops or --target-param-data-ratio")


def pretrain(args, base_dir, prompts):
    tokenizer = get_tokenizer(base_dir)

    config = config_from_depth(
        args.depth, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim, max_seq_len=args.max_seq_len,
        vocab_size=tokenizer.get_vocab_size(), window_pattern=args.window_pattern,
    )  # fmt: skip
    model = abstract_model(config)
    num_iterations = horizon(args, model.flops_per_token(), model.num_scaling_params())
    dtype, orth_dtype = platform_dtypes(args.dtype)
    groups = scaled_groups(
        config.n_embd, args.depth, args.total_batch_size, embedding_lr=args.embedding_lr,
        unembedding_lr=args.unembedding_lr, matrix_lr=args.matrix_lr, scalar_lr=args.scalar_lr,
        weight_decay=args.weight_decay, adam_betas=(args.adam_beta1, args.adam_beta2),
    )  # fmt: skip
    schedule = Schedule(num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
    optim = OptimSettings(groups, schedule, orth_dtype)
    core_metric = core_metric_fn(args, base_dir, tokenizer)
    # The data last: preparing it can take long, and the settings above are checked by then.
    if args.data:
        dataset.prepare_data(args.data, base_dir, keep_options=True)
    else:
        dataset.ensure_data(base_dir)
    train_shards, val_shards = dataset.list_shards(base_dir, "train"), dataset.list_shards(base_dir, "val")
    tag = args.model_tag or f"d{args.depth}"
    run = RunConfig(
        model_config=config, optim=optim, num_iterations=num_iterations,
        device_batch_size=args.device_batch_size, total_batch_size=args.total_batch_size,
        checkpoint_dir=base_dir / "base_checkpoints" / tag, dtype=dtype, fsdp=args.fsdp,
        eval_every=args.eval_every, eval_tokens=args.eval_tokens, sample_every=args.sample_every,
        core_metric_every=args.core_metric_every, save_every=args.save_every, keep_checkpoints=args.keep_checkpoints,
        resume_from_step=args.resume_from_step, seed=args.seed, loss_chunk=args.loss_chunk,
        attention=platform_attention(args.attention, dtype, config.head_dim),
        ynn_dots=args.ynn_dots, user_config=vars(args),
    )  # fmt: skip
    T = config.sequence_len
    print(f"model {config} | {model.num_params():,} parameters | {model.flops_per_token():.3e} FLOPs/token")

    def sample(graphdef, params):
        forward = jax.jit(lambda p, idx: nnx.merge(graphdef, p)(idx))
        # Every process passes the same prompts: a replicated global array, as params are.
        return sample_texts(lambda idx: forward(params, replicate(idx, params)), tokenizer, prompts)

    with dataset.shards_in_use(base_dir):  # prepare_data can't rewrite them under the run
        summary = train(
            run,
            tokenizer,
            make_train_loader=lambda state, rows: make_readers(train_shards, tokenizer, rows, T, args, state),
            val_batches=lambda rows: make_val_loader(
                val_shards,
                tokenizer,
                rows,
                T,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
                crop_long_docs=args.crop_long_docs,
            ),  # fmt: skip
            sample=sample,
            on_metrics=wandb_logger(args.run, vars(args)),
            core_metric=core_metric,
        )
    report = write_report(run.checkpoint_dir, summary, f"nanojax pretraining report: {tag}")
    return summary, report


def core_metric_fn(args, base_dir, tokenizer):
    """CORE of (graphdef, params) on the run's task bundle, or None: no bundle, or --core-metric-every 0.
    The bundle is read and checked now, not at the first evaluation."""
    if args.core_metric_every == 0:
        return None
    tasks, bundle = core_eval.find_tasks(args.core_bundle, base_dir, args.core_metric_max_per_task)
    if jax.process_count() > 1:  # every process must evaluate, or none: each host reads its own base dir
        from jax.experimental import multihost_utils

        found = multihost_utils.process_allgather(np.array([tasks is not None]))
        if found.any() and not found.all():
            raise UserError(f"some processes have a CORE task bundle at {bundle} and some don't: give every host "
                            "the same one (--core-bundle), or pass --core-metric-every 0")  # fmt: skip
    if tasks is None:
        print(f"CORE is not evaluated: no task bundle at {bundle} (pass --core-bundle)")
        return None

    def core_metric(graphdef, params):
        model = nnx.merge(graphdef, params)
        place = partial(replicate, like=params)  # every process scores every item, as with the samples
        return core_eval.evaluate_core(model, tokenizer, tasks, args.core_metric_max_per_task, place=place)[0]

    return core_metric


def replicate(host_array, like):
    """A host array as a global array replicated over the mesh of `like` (any leaf of the params)."""
    mesh = jax.tree.leaves(like)[0].sharding.mesh
    return jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec()), jnp.asarray(host_array))


def make_readers(shards, tokenizer, rows: int, seq_len: int, args, state) -> Readers:
    """This process's share of the data readers (default: one per process)."""
    count, index = jax.process_count(), jax.process_index()
    readers = args.data_readers or count
    if readers % count:
        raise UserError(f"--data-readers {readers} must be a multiple of the process count {count}")
    per = readers // count
    mine = range(index * per, (index + 1) * per)
    return Readers(shards, tokenizer, rows, seq_len, mine, readers, state, args.crop_long_docs)


def wandb_logger(run_name: str, config: dict):
    """A metrics callback logging to Weights & Biases, or None when --run is 'dummy' (the default)."""
    if run_name == "dummy" or jax.process_index() != 0:
        return None
    try:
        import wandb
    except ImportError as e:
        raise UserError("--run needs Weights & Biases: `pip install wandb`, or leave --run at 'dummy'") from e
    wandb_run = wandb.init(project="nanojax", name=run_name, config=config)
    return lambda step, metrics: wandb_run.log(metrics, step=step)
