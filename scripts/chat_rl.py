"""Reinforcement learning on a task with checkable answers, as nanochat's chat_rl (its "GRPO" on GSM8K):

    python -m scripts.chat_rl --model-tag d4                    # the built-in SpellingBee task
    python -m scripts.chat_rl --task Arithmetic --num-examples 800 --eval-examples 100
    python -m scripts.chat_rl --data gsm8k_train.jsonl --val-data gsm8k_test.jsonl

Starts from the latest (or --model-step) checkpoint in <base_dir>/chatsft_checkpoints/<model tag>/
and saves to <base_dir>/chatrl_checkpoints/<model tag>/ with report.md and reward.png. Each step
samples --num-samples answers to each of --examples-per-step questions, rewards the answers that agree
with the reference, or whose code passes the item's "test" (see nanojax/chat_eval.py), and follows the
policy gradient (nanojax/rl.py). Ctrl-C finishes the step in flight and saves it. pass@k
on the held-out questions is logged every --eval-every steps. Tasks: a built-in one (--task, drawn from
the default finetuning set's generator: training items with seed --seed + 2, held-out ones with
chat_eval's seed 1), or your own JSONL conversations (--data, --val-data) ending in the reference answer.
Then: python -m scripts.chat_eval --source rl.
"""

import argparse

from nanojax.common import (
    CHAT_TASKS,
    HelpFormatter,
    UserError,
    cli,
    every_steps,
    get_base_dir,
    keep_freed_memory,
    model_tag,
    nonnegative_int,
    positive_int,
    temperature,
)

EVAL_SEED = 1  # chat_eval's default: RL's held-out questions are the ones chat_eval scores


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a("-i", "--source", choices=["sft", "base"], default="sft", help="start from chatsft_checkpoints or "
      "base_checkpoints")  # fmt: skip
    a("-g", "--model-tag", type=model_tag, default=None, help="checkpoint folder, also the RL one (default: the "
      "latest)")  # fmt: skip
    a("-s", "--model-step", "--step", type=int, default=None, help="checkpoint step to start from (default: the "
      "latest)")  # fmt: skip
    a("--task", choices=CHAT_TASKS, default="SpellingBee", help="built-in task (unless --data)")
    a("--num-examples", type=positive_int, default=1600, help="built-in task: training questions")
    a("--data", default=None, help="JSONL of your training questions (conversations ending in the reference answer)")
    a("--val-data", default=None, help="JSONL of your held-out questions (with --data)")
    a("--eval-examples", type=positive_int, default=400, help="held-out questions for pass@k (at most)")
    a("--examples-per-step", type=positive_int, default=16, help="questions per step")
    a("--num-samples", type=positive_int, default=16, help="answers sampled per question")
    a("--device-batch-size", type=positive_int, default=8, help="answers per device per pass (and k of pass@k)")
    a("--max-new-tokens", type=positive_int, default=256, help="at most this many tokens per answer")
    a("--temperature", type=temperature, default=1.0, help="sampling temperature")
    a("--top-k", type=nonnegative_int, default=50, help="sample among the k most likely tokens; 0 for all")
    a("--embedding-lr", type=float, default=0.2, help="AdamW lr of the embeddings")
    a("--unembedding-lr", type=float, default=0.004, help="AdamW lr of lm_head")
    a("--matrix-lr", type=float, default=0.02, help="Muon lr of the block matrices")
    a("--scalar-lr", type=float, default=0.5, help="AdamW lr of the residual scalars")
    a("--weight-decay", type=float, default=0.0, help="Muon weight decay")
    a("--init-lr-frac", type=float, default=0.05, help="every lr x this; then falling linearly to 0")
    a("--num-epochs", type=positive_int, default=1, help="passes over the training questions")
    a("--eval-every", type=every_steps, default=60, help="pass@k every N steps, and at the end (-1: at the end only)")
    a("--save-every", type=every_steps, default=60, help="checkpoint every N steps, and at the end (-1: at the end)")
    a("--seed", type=int, default=0, help="sampling and question-order seed")
    a("--base-dir", default=None, help="default $NANOJAX_BASE_DIR, else ~/.cache/nanojax")
    return p.parse_args(argv)


def tasks(args, chat_eval):
    """(training, held-out) tasks: built-in or the user's files, generative ones."""
    if bool(args.data) != bool(args.val_data):
        raise UserError("--data and --val-data go together: your training and held-out questions")
    if args.data:
        train = chat_eval.read_task("data", args.data, "--data")
        val = chat_eval.read_task("val-data", args.val_data, "--val-data")
    else:
        train = chat_eval.builtin_task(args.task, args.num_examples, args.seed + 2)
        val = chat_eval.builtin_task(args.task, args.eval_examples, EVAL_SEED)
    if train.categorical or val.categorical:
        raise UserError('RL samples answers: the questions must be generative ones, without "letters"')
    val.items = val.items[: args.eval_examples]
    return train, val


@cli
def main(argv=None):
    args = parse_args(argv)
    keep_freed_memory()  # before jax starts its threads
    from nanojax import chat_eval, rl  # imports jax: after --help
    from nanojax.checkpoint import Checkpoints
    from nanojax.engine import find_checkpoint_dir
    from nanojax.model import GPTConfig
    from nanojax.optim import finetune_groups
    from nanojax.report import write_rl_report
    from nanojax.runs import check_tokenizer
    from nanojax.tokenizer import get_tokenizer

    train_task, val_task = tasks(args, chat_eval)  # files are checked before the model loads
    base_dir = get_base_dir(args.base_dir)  # its chatrl_checkpoints/ is made at the start of training
    start_dir = find_checkpoint_dir(base_dir, args.source, args.model_tag)
    start = Checkpoints(start_dir)
    step = start.resolve_step(args.model_step)
    meta = start.read_metadata(step)
    tokenizer = get_tokenizer(base_dir)
    check_tokenizer(meta, tokenizer, start.step_dir(step))
    config = GPTConfig(**meta["model_config"])
    lrs = dict(embedding_lr=args.embedding_lr, unembedding_lr=args.unembedding_lr, matrix_lr=args.matrix_lr,
               scalar_lr=args.scalar_lr)  # fmt: skip
    groups = finetune_groups(config.n_embd, args.init_lr_frac, weight_decay=args.weight_decay,
                             adam_betas=(0.8, 0.95), **lrs)  # fmt: skip
    settings = rl.RLSettings(
        examples_per_step=args.examples_per_step, num_samples=args.num_samples,
        device_batch_size=args.device_batch_size, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, num_epochs=args.num_epochs, eval_every=args.eval_every,
        save_every=args.save_every, seed=args.seed,
    )  # fmt: skip
    tag = args.model_tag or start_dir.name
    print(f"from {start.step_dir(step)}")
    summary = rl.reinforce(
        config, lambda targets: start.restore_params(step, params=targets).params, tokenizer, train_task,
        val_task, groups, settings, base_dir / "chatrl_checkpoints" / tag,
        user_config=vars(args) | {"start_checkpoint": str(start.step_dir(step))},
    )  # fmt: skip
    report = write_rl_report(summary["checkpoint_dir"], summary, f"nanojax RL report: {tag}")
    print(f"checkpoints: {summary['checkpoint_dir']}\nreport: {report}")


if __name__ == "__main__":
    main()
