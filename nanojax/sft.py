"""Supervised finetuning from command-line settings: base weights, conversations, optimizer, report.

scripts/chat_sft.py parses the flags (nanochat's chat_sft names) and calls `sft`. The step, loop,
sharding and checkpointing are pretraining's (`train.train`); finetuning differs in its data (whole
conversations, loss on the assistant's tokens only), its starting weights and its metric (the mean
loss over the held-out conversations' assistant tokens).
"""

import math
from pathlib import Path

import jax
from flax import nnx

from nanojax import chat
from nanojax.checkpoint import Checkpoints
from nanojax.common import UserError
from nanojax.engine import CalculatorTool, find_checkpoint_dir, greedy, prompt_ids
from nanojax.model import ROTARY_OVERSIZE, GPTConfig
from nanojax.optim import Schedule, finetune_groups
from nanojax.pretrain import replicate, wandb_logger
from nanojax.report import write_report
from nanojax.runs import check_tokenizer
from nanojax.tokenizer import get_tokenizer
from nanojax.train import (
    OptimSettings,
    RunConfig,
    abstract_model,
    grad_accum_steps,
    platform_attention,
    platform_dtypes,
    train,
)

# Flags left unset take the base run's value, else these fallbacks (nanochat's chat_sft does the same).
INHERITED = {
    "device_batch_size": 32, "total_batch_size": 524288, "embedding_lr": 0.3, "unembedding_lr": 0.004,
    "matrix_lr": 0.02, "scalar_lr": 0.5,
}  # fmt: skip


def base_run_flags(meta: dict) -> dict:
    """The flags the base model was trained with: our run's, or for a checkpoint converted from nanochat,
    its run's (flat, or with the learning rates under optimizer_kwargs, as nanochat's base_train saves them)."""
    nanochat = meta.get("nanochat_meta") or {}
    flags = {"device_batch_size": nanochat.get("device_batch_size"), **(nanochat.get("user_config") or {})}
    if isinstance(flags.get("optimizer_kwargs"), dict):
        flags |= flags.pop("optimizer_kwargs")
    return flags | (meta.get("user_config") or {})


def inherit(args, meta: dict, log=print) -> None:
    """Fill the flags left unset with the base run's values, else nanochat's chat_sft fallbacks."""
    base = base_run_flags(meta) | {"max_seq_len": meta["model_config"]["sequence_len"]}
    # A value that is no size or rate (nanochat's -1 for "derive the batch size") is not given.
    base = {k: v for k, v in base.items() if type(v) in (int, float) and v > 0}
    unset = [name for name in [*INHERITED, "max_seq_len"] if getattr(args, name) is None]
    for name in unset:
        setattr(args, name, base.get(name, INHERITED.get(name)))
    given, defaults = [n for n in unset if n in base], [n for n in unset if n not in base]
    for said, names in [("from the base run", given), ("defaults (the base run does not give them)", defaults)]:
        if names:
            log(f"{said}: " + ", ".join(f"{n}={getattr(args, n)}" for n in names))


def resumed_base_step(checkpoint_dir, args, log=print) -> int | None:
    """The base step to read settings and tokenizer from: --model-step, or on resume the one the run was
    finetuned from (its weights come from the checkpoint; the report must name where they began)."""
    if args.resume_from_step < 0:
        return args.model_step
    meta = Checkpoints(checkpoint_dir).read_metadata(args.resume_from_step)
    step = int(Path(meta["user_config"]["base_checkpoint"]).name)
    if args.model_step not in (None, step):
        log(f"note: this run was finetuned from base step {step}; --model-step {args.model_step} is ignored on resume")
    return step


def sft(args, base_dir, prompts):
    base_ckpt_dir = find_checkpoint_dir(base_dir, "base", args.model_tag)
    base_ckpts = Checkpoints(base_ckpt_dir)
    tag = args.model_tag or base_ckpt_dir.name
    checkpoint_dir = base_dir / "chatsft_checkpoints" / tag
    base_step = base_ckpts.resolve_step(resumed_base_step(checkpoint_dir, args))
    meta = base_ckpts.read_metadata(base_step)
    tokenizer = get_tokenizer(base_dir)
    check_tokenizer(meta, tokenizer, base_ckpts.step_dir(base_step))
    inherit(args, meta)
    # The model stays the base model (its sliding windows come from its sequence_len, as in nanochat's
    # chat_sft): --max-seq-len only sizes the rows, up to the rotary table's length.
    config = GPTConfig(**meta["model_config"])
    T = args.max_seq_len
    if T > config.sequence_len * ROTARY_OVERSIZE:
        raise UserError(
            f"--max-seq-len {T} is past the base model's {config.sequence_len * ROTARY_OVERSIZE} rotary positions "
            f"({ROTARY_OVERSIZE} x its sequence length): lower it"
        )
    if T > config.sequence_len:
        print(f"note: --max-seq-len {T} is past the base model's {config.sequence_len}-token context: it never "
              "trained at those positions")  # fmt: skip

    data = args.data or [chat.ensure_conversations(base_dir)]
    convs = chat.read_conversations(data, tokenizer, T + 1, skip_bad_lines=args.skip_bad_lines)
    if args.val_data:
        train_convs = convs
        val_convs = chat.read_conversations(args.val_data, tokenizer, T + 1, skip_bad_lines=args.skip_bad_lines)
        seen = {tokens.tobytes() for tokens in train_convs.tokens}
        if overlap := sum(tokens.tobytes() in seen for tokens in val_convs.tokens):
            print(f"note: {overlap:,} of the {len(val_convs):,} --val-data conversations are training ones too: the "
                  "val loss will flatter the model")  # fmt: skip
    else:
        train_convs, val_convs = chat.split_conversations(convs, args.val_fraction, args.seed)
    # Checked before the plan is printed: a batch that does not divide into rows has no plan.
    grad_accum_steps(args.total_batch_size, args.device_batch_size, T, jax.device_count())
    rows_per_step = args.total_batch_size // T
    epoch_rows = chat.rows_per_epoch(train_convs, T)
    num_iterations = args.num_iterations
    if num_iterations == 0 or num_iterations < -1:
        raise UserError(f"--num-iterations {num_iterations}: give a positive count, or -1 for --num-epochs")
    if num_iterations == -1:
        num_iterations = max(1, math.ceil(args.num_epochs * epoch_rows / rows_per_step))
    print(f"{len(train_convs):,} training conversations ({epoch_rows:,} rows of {T} tokens an epoch), "
          f"{len(val_convs):,} held out | {num_iterations} steps of {rows_per_step} rows "
          f"({num_iterations * rows_per_step / epoch_rows:.2f} epochs)")  # fmt: skip

    dtype, orth_dtype = platform_dtypes(args.dtype)
    groups = finetune_groups(
        config.n_embd, args.init_lr_frac, embedding_lr=args.embedding_lr, unembedding_lr=args.unembedding_lr,
        matrix_lr=args.matrix_lr, scalar_lr=args.scalar_lr, weight_decay=args.weight_decay,
        adam_betas=(args.adam_beta1, args.adam_beta2),
    )  # fmt: skip
    schedule = Schedule(num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
    run = RunConfig(
        model_config=config, optim=OptimSettings(groups, schedule, orth_dtype),
        num_iterations=num_iterations, device_batch_size=args.device_batch_size,
        total_batch_size=args.total_batch_size, checkpoint_dir=checkpoint_dir, dtype=dtype,
        fsdp=args.fsdp, eval_every=args.eval_every, eval_tokens=args.eval_tokens, sample_every=args.sample_every,
        save_every=args.save_every, keep_checkpoints=args.keep_checkpoints, resume_from_step=args.resume_from_step,
        seed=args.seed, loss_chunk=args.loss_chunk, ynn_dots=args.ynn_dots, eval_metric="loss",
        attention=platform_attention(args.attention, dtype, config.head_dim),
        user_config=vars(args) | {"base_checkpoint": str(base_ckpts.step_dir(base_step))}, seq_len=T,
    )  # fmt: skip
    model = abstract_model(config)
    print(f"model {config} | {model.num_params():,} parameters | from {base_ckpts.step_dir(base_step)}")

    chat_prompts = [prompt_ids(tokenizer, p, chat=True) for p in prompts]
    stops = (tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id())
    tool = CalculatorTool(tokenizer)  # the samples answer the model's calculator calls, as chat_cli does

    def sample(graphdef, params):
        forward = jax.jit(lambda p, idx: nnx.merge(graphdef, p)(idx))
        out, _ = greedy(lambda idx: forward(params, replicate(idx, params)), chat_prompts, 32, stop_tokens=stops,
                        tool=tool)  # fmt: skip
        return [f"{p} -> {tokenizer.decode(t)}" for p, t in zip(prompts, out, strict=True)]

    rank, ranks = jax.process_index(), jax.process_count()
    summary = train(
        run,
        tokenizer,
        make_train_loader=lambda state, rows: chat.SFTLoader(
            train_convs, rows, T, process_index=rank, process_count=ranks, seed=args.seed, state=state
        ),
        val_batches=lambda rows: chat.val_batches(val_convs, rows, T, process_index=rank, process_count=ranks),
        sample=sample,
        on_metrics=wandb_logger(args.run, vars(args)),
        init_params=lambda targets: base_ckpts.restore_params(base_step, params=targets).params,
    )
    report = write_report(run.checkpoint_dir, summary, f"nanojax SFT report: {tag}")
    return summary, report
