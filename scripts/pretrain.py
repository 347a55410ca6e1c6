"""Pretrain a base model, as nanochat's base_train. The seed run on a CPU:

    python -m scripts.pretrain --depth=4 --aspect-ratio=32 --head-dim=64 --max-seq-len=512 \\
      --device-batch-size=1 --total-batch-size=4096 --num-iterations=100 \\
      --embedding-lr=0.3 --matrix-lr=0.02 --unembedding-lr=0.004 --weight-decay=0.1

Data: the shards under <base_dir>/base_data (the Python standard library by default, prepared on
first use) or --data PATH... (your files). The tokenizer comes from `python -m scripts.tok_train`.
Checkpoints, report.md and loss.png go to <base_dir>/base_checkpoints/<model tag>/. With a CORE task
bundle (--core-bundle, or <base_dir>/eval_bundle; see scripts/base_eval.py) CORE is evaluated during the
run too, every --core-metric-every steps and at the end, on --core-metric-max-per-task examples a task.
"""

import argparse
from pathlib import Path

from nanojax.common import (
    HelpFormatter,
    add_compute_flags,
    checkpoint_step,
    cli,
    count_or_all,
    every_steps,
    get_base_dir,
    keep_freed_memory,
    model_tag,
    positive_int,
)


def core_every(text: str) -> int:
    """--core-metric-every: a step interval, -1 for the end only, or 0 for never (a bundle there or not)."""
    return 0 if text.strip() == "0" else every_steps(text)


PROMPTS = ["The capital of France is", "def main(", "import ", "If yesterday was Friday, then tomorrow will be"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    g = p.add_argument_group("model")
    g.add_argument("--depth", type=positive_int, default=20, help="number of transformer layers")
    g.add_argument(
        "--aspect-ratio", type=positive_int, default=64, help="model_dim = depth x aspect_ratio, rounded up to head_dim"
    )
    g.add_argument("--head-dim", type=positive_int, default=128, help="attention head dimension")
    g.add_argument("--max-seq-len", type=positive_int, default=2048, help="context length in tokens")
    g.add_argument("--window-pattern", default="SSSL", help="sliding-window pattern tiled over layers (L=full, S=half)")
    g = p.add_argument_group("horizon (the first one set wins)")
    g.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: derive from the next two)")
    g.add_argument("--target-flops", type=float, default=-1, help="train for this many FLOPs")
    g.add_argument("--target-param-data-ratio", type=float, default=20, help="tokens per scaling parameter")
    g = p.add_argument_group("batch")
    g.add_argument("--device-batch-size", type=positive_int, default=32, help="rows per device per micro-step")
    g.add_argument(
        "--total-batch-size", type=positive_int, default=524288, help="tokens per optimizer step (grad accumulation)"
    )
    g = p.add_argument_group("optimizer")
    g.add_argument("--embedding-lr", type=float, default=0.3, help="AdamW lr of wte and value embeddings")
    g.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW lr of lm_head")
    g.add_argument("--matrix-lr", type=float, default=0.02, help="Muon lr of the block matrices")
    g.add_argument("--scalar-lr", type=float, default=0.5, help="AdamW lr of the residual/x0 lambdas")
    g.add_argument("--weight-decay", type=float, default=0.2, help="Muon weight decay (scaled by (12/depth)^2)")
    g.add_argument("--adam-beta1", type=float, default=0.8, help="AdamW beta1")
    g.add_argument("--adam-beta2", type=float, default=0.95, help="AdamW beta2")
    g.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps warming the lr up")
    g.add_argument("--warmdown-ratio", type=float, default=0.5, help="fraction of steps decaying the lr at the end")
    g.add_argument("--final-lr-frac", type=float, default=0.0, help="lr multiplier the warmdown ends at")
    g = p.add_argument_group("evaluation, sampling, checkpoints (an interval of -1: at the end only)")
    g.add_argument("--eval-every", type=every_steps, default=250, help="val bpb before the first step, every N "
                   "steps and at the end (-1: at the end only)")  # fmt: skip
    g.add_argument("--eval-tokens", type=positive_int, default=20 * 524288, help="validation tokens per "
                   "evaluation, in whole batches (at least one); fewer if the split holds fewer")  # fmt: skip
    g.add_argument("--sample-every", type=every_steps, default=2000, help="samples every N steps and at the end")
    g.add_argument("--sample-prompt", action="append", default=None, help="a prompt to continue in the samples; "
                   f"repeatable (default: {', '.join(map(repr, PROMPTS))})")  # fmt: skip
    g.add_argument("--core-metric-every", type=core_every, default=2000, help="CORE every N steps and at the end, "
                   "when there is a task bundle (-1: at the end only; 0: never)")  # fmt: skip
    g.add_argument("--core-metric-max-per-task", type=count_or_all, default=500, help="examples per CORE task "
                   "(-1: all)")  # fmt: skip
    g.add_argument("--core-bundle", default=None, help="CORE task bundle directory, as scripts.base_eval reads "
                   "(default: <base_dir>/eval_bundle if there is one)")  # fmt: skip
    g.add_argument("--save-every", type=every_steps, default=-1, help="save every N steps and at the end")
    g.add_argument("--keep-checkpoints", type=positive_int, default=3, help="how many recent checkpoints to keep")
    g.add_argument("--resume-from-step", type=checkpoint_step, default=-1, help="resume from this step's checkpoint")
    g.add_argument("--model-tag", type=model_tag, default=None, help="checkpoint folder name (default d<depth>)")
    g = p.add_argument_group("run")
    a("--run", default="dummy", help="Weights & Biases run name (needs `pip install wandb`); 'dummy' disables logging")
    a("--data", nargs="+", default=None, help="your text: files, folders or globs (default: the base dir's shards)")
    a("--base-dir", default=None, help="where data, tokenizer and checkpoints live (default $NANOJAX_BASE_DIR "
      "or ~/.cache/nanojax)")  # fmt: skip
    add_compute_flags(p)
    a("--crop-long-docs", action="store_true", help="keep only the first row of a document longer than a row, "
      "as nanochat does (default: cut it into rows, so no text is lost)")  # fmt: skip
    a("--data-readers", type=positive_int, default=None, help="independent data streams (default: one per "
      "process); the data order depends on this number alone, so fixing it keeps a run's batches across process "
      "counts")  # fmt: skip
    a("--seed", type=int, default=0, help="parameter initialisation seed")
    return p.parse_args(argv)


@cli
def main(argv=None):
    args = parse_args(argv)
    keep_freed_memory()  # before jax starts its threads
    from nanojax.sharding import initialize_distributed  # imports jax: inside cli, so a Ctrl-C is one line

    initialize_distributed(vars(args))
    from nanojax.pretrain import pretrain  # imports jax: after the distributed start-up
    from nanojax.report import num

    base_dir = get_base_dir(args.base_dir, create=True)
    summary, report = pretrain(args, base_dir, args.sample_prompt or PROMPTS)
    print(f"val bpb {summary['final_val_bpb']:.4f} | {num(summary['tokens_per_s'], '{:,.0f}')} tok/s | "
          f"peak memory {summary['peak_memory_bytes'] / 2**20:,.0f} MiB")  # fmt: skip
    print(f"checkpoints: {summary['checkpoint_dir']}\nreport: {report}\nloss curve: {Path(report).parent / 'loss.png'}")


if __name__ == "__main__":
    main()
