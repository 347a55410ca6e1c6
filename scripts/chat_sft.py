"""Finetune a base model on conversations, as nanochat's chat_sft. After `make run`'s pretraining:

    python -m scripts.chat_sft --model-tag=d4 --device-batch-size=1 --total-batch-size=2048 --num-iterations=80
    python -m scripts.chat_sft --data my_chats.jsonl --val-data my_val.jsonl --num-epochs=2
    python -m scripts.chat_sft --model-tag=d4 --resume-from-step=40 ...     # the same flags as the first run

Starts from the latest (or --model-step) checkpoint in <base_dir>/base_checkpoints/<model tag>/ and
saves to <base_dir>/chatsft_checkpoints/<model tag>/ with report.md and loss.png. Unset batch and
learning-rate flags take the base run's values. Data: JSONL files, one conversation per line (a list
of {"role", "content"} messages, or {"messages": [...]}; see nanojax/chat.py); by default the set
that `python -m scripts.make_conversations` writes, generated on first use. Conversations are packed
whole into rows of --max-seq-len tokens and the loss counts the assistant's tokens only.
"""

import argparse
from pathlib import Path

from nanojax.common import (
    HelpFormatter,
    add_compute_flags,
    checkpoint_step,
    cli,
    every_steps,
    fraction,
    get_base_dir,
    keep_freed_memory,
    model_tag,
    positive_float,
    positive_int,
)

PROMPTS = ["What is 12+30?", "How many 'r' are in 'strawberry'?", "Hi!"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    g = p.add_argument_group("base model")
    g.add_argument("-g", "--model-tag", type=model_tag, default=None,
                   help="base checkpoint folder, also the SFT one (default: the latest)")  # fmt: skip
    g.add_argument(
        "-s", "--model-step", "--step", type=int, default=None, help="base checkpoint step (default: latest)"
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", default=None, help="conversation JSONL files, folders or globs (default: "
                   "<base_dir>/chat_data/synthetic.jsonl, generated on first use)")  # fmt: skip
    g.add_argument("--val-data", nargs="+", default=None, help="held-out conversations (default: --val-fraction)")
    g.add_argument("--val-fraction", type=fraction, default=0.05, help="share of --data held out when no --val-data")
    g.add_argument("--skip-bad-lines", action="store_true", help="train without malformed lines (always listed "
                   "with file:line) instead of refusing them")  # fmt: skip
    g = p.add_argument_group("horizon and batch (unset: the base run's)")
    g.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: --num-epochs)")
    g.add_argument("--num-epochs", type=positive_float, default=1.0, help="passes over the training conversations")
    g.add_argument("--max-seq-len", type=positive_int, default=None, help="row length in tokens")
    g.add_argument("--device-batch-size", type=positive_int, default=None, help="rows per device per micro-step")
    g.add_argument("--total-batch-size", type=positive_int, default=None, help="tokens per optimizer step")
    g = p.add_argument_group("optimizer (unset lrs: the base run's, as given, not scaled by batch size)")
    g.add_argument("--embedding-lr", type=float, default=None, help="AdamW lr of wte and value embeddings")
    g.add_argument("--unembedding-lr", type=float, default=None, help="AdamW lr of lm_head")
    g.add_argument("--matrix-lr", type=float, default=None, help="Muon lr of the block matrices")
    g.add_argument("--scalar-lr", type=float, default=None, help="AdamW lr of the residual/x0 lambdas")
    g.add_argument("--init-lr-frac", type=float, default=0.8, help="every lr x this (nanochat's SFT: 0.8)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="Muon weight decay (pretraining ends at 0)")
    g.add_argument("--adam-beta1", type=float, default=0.8, help="AdamW beta1")
    g.add_argument("--adam-beta2", type=float, default=0.95, help="AdamW beta2")
    g.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps warming the lr up")
    g.add_argument("--warmdown-ratio", type=float, default=0.5, help="fraction of steps decaying the lr at the end")
    g.add_argument("--final-lr-frac", type=float, default=0.0, help="lr multiplier the warmdown ends at")
    g = p.add_argument_group("evaluation, sampling, checkpoints (an interval of -1: at the end only)")
    g.add_argument("--eval-every", type=every_steps, default=200, help="val loss before the first step, every N "
                   "steps and at the end (-1: at the end only)")  # fmt: skip
    g.add_argument("--eval-tokens", type=positive_int, default=20 * 524288, help="at most this many held-out "
                   "tokens, in whole batches (at least one)")  # fmt: skip
    g.add_argument("--sample-every", type=every_steps, default=-1, help="answers every N steps and at the end")
    g.add_argument("--save-every", type=every_steps, default=-1, help="save every N steps and at the end")
    g.add_argument("--keep-checkpoints", type=positive_int, default=3, help="how many recent checkpoints to keep")
    g.add_argument("--resume-from-step", type=checkpoint_step, default=-1, help="resume from this SFT checkpoint")
    g = p.add_argument_group("run")
    a("--run", default="dummy", help="Weights & Biases run name (needs `pip install wandb`); 'dummy' disables logging")
    a("--base-dir", default=None, help="where data, tokenizer and checkpoints live (default $NANOJAX_BASE_DIR "
      "or ~/.cache/nanojax)")  # fmt: skip
    add_compute_flags(p)
    a("--seed", type=int, default=0, help="seed of the validation split and the order of conversations")
    return p.parse_args(argv)


@cli
def main(argv=None):
    args = parse_args(argv)
    keep_freed_memory()  # before jax starts its threads
    from nanojax.sharding import initialize_distributed  # imports jax: inside cli, so a Ctrl-C is one line

    initialize_distributed(vars(args))
    from nanojax.report import num
    from nanojax.sft import sft  # imports jax: after the distributed start-up

    summary, report = sft(args, get_base_dir(args.base_dir, create=True), PROMPTS)
    print(f"val loss {summary['final_val_loss']:.4f} (assistant tokens) | {num(summary['tokens_per_s'], '{:,.0f}')} "
          f"tok/s | peak memory {summary['peak_memory_bytes'] / 2**20:,.0f} MiB")  # fmt: skip
    print(f"checkpoints: {summary['checkpoint_dir']}\nreport: {report}\nloss curve: {Path(report).parent / 'loss.png'}")


if __name__ == "__main__":
    main()
