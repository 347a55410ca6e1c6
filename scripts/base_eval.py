"""Evaluate a base model: val bits per byte, greedy samples and CORE, as nanochat's base_eval.

    python -m scripts.base_eval --model-tag d4
    python -m scripts.base_eval --model-tag d20 --step 5000 --eval-tokens 10485760 --max-per-task 500
    python -m scripts.base_eval --core-bundle ~/eval_bundle --source sft

Reads <base_dir>/base_checkpoints/<model tag>/ (chatsft_checkpoints with --source sft, chatrl_checkpoints
with --source rl), the tokenizer and the validation shard under <base_dir>. CORE reads a local task
bundle in nanochat's eval_bundle layout (core.yaml, eval_meta_data.csv, eval_data/; see
nanojax/core_eval.py): --core-bundle, else <base_dir>/eval_bundle when present; without one CORE is
skipped. The results are printed and appended to <checkpoint dir>/report.md.
"""

import argparse

from nanojax.common import (
    HelpFormatter,
    UserError,
    add_checkpoint_flags,
    cli,
    count_or_all,
    get_base_dir,
    nonnegative_int,
    positive_int,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    add_checkpoint_flags(p, "base")
    a("--eval-tokens", "--split-tokens", type=nonnegative_int, default=20 * 524288, help="validation tokens for "
      "bpb, in whole batches (at least one) of --device-batch-size rows; 0 skips it (--split-tokens: nanochat's "
      "base_loss name)")  # fmt: skip
    a("--device-batch-size", type=positive_int, default=32, help="validation rows per device per batch")
    a("--core-bundle", default=None, help="CORE task bundle directory (default <base_dir>/eval_bundle if present)")
    a("--max-per-task", type=count_or_all, default=-1, help="examples per CORE task (-1: all)")
    a("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
      help="matmul dtype; auto: float32 on CPU, bfloat16 on accelerators")  # fmt: skip
    a("--base-dir", default=None, help="default $NANOJAX_BASE_DIR, else ~/.cache/nanojax")
    return p.parse_args(argv)


@cli
def main(argv=None):
    args = parse_args(argv)
    import jax.numpy as jnp  # after --help

    from nanojax import core_eval, dataset, engine, train
    from nanojax.report import append_report

    base_dir = get_base_dir(args.base_dir)
    dtype = train.platform_dtypes(args.dtype)[0]
    model, tokenizer, meta, checkpoint_dir = engine.load_for_inference(
        base_dir, args.source, args.model_tag, args.step, jnp.dtype(dtype)
    )
    notes = []
    # The bundle is read and checked before the val bpb pass, which can be long.
    tasks, bundle = core_eval.find_tasks(args.core_bundle, base_dir, args.max_per_task)

    bpb = None
    if args.eval_tokens > 0:
        try:
            shards = dataset.list_shards(base_dir, "val")
        except UserError as e:
            notes.append(f"val bpb skipped: {e}")
        else:
            crop = (meta.get("user_config") or {}).get("crop_long_docs", False)  # packed as in training
            bpb = core_eval.val_bpb(model, tokenizer, shards, args.eval_tokens, args.device_batch_size, crop)
            print(f"val bpb {bpb[0]:.4f} over {bpb[1]:,} tokens")

    samples = core_eval.greedy_samples(model, tokenizer, core_eval.SAMPLE_PROMPTS, chat=args.source != "base")

    core, results = None, []
    if tasks is not None:
        core, results = core_eval.evaluate_core(model, tokenizer, tasks, args.max_per_task)
    else:
        notes.append(f"CORE skipped: no task bundle at {bundle} (pass --core-bundle)")

    append_report(checkpoint_dir, core_eval.report_lines(meta["step"], bpb, core, results, samples, notes, args.source))


if __name__ == "__main__":
    main()
