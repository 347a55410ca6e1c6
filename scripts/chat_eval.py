"""Evaluate a chat model on tasks, as nanochat's chat_eval: accuracy per task and ChatCORE.

    python -m scripts.chat_eval --model-tag d4                         # the built-in tasks
    python -m scripts.chat_eval -a "Arithmetic|SpellingBee" -x 50
    python -m scripts.chat_eval --task ARC-Easy=arc_easy.jsonl --task GSM8K=gsm8k.jsonl -a "ARC-Easy|GSM8K"

Built-in tasks (generative, drawn from the default finetuning set's generator with another seed, so
they test what that set teaches): Arithmetic (with calculator calls), SpellingBee (count a letter in a
word), Spelling. Your own: --task NAME=FILE, a JSONL of conversations as chat_sft reads them whose last
message is the reference answer; items with "letters" (e.g. ["A", "B", "C", "D"], the answer one of
them) are scored as nanochat scores ARC and MMLU, by the answer letter's logit; the others by sampling
an answer, as GSM8K, which passes when its final text gives the reference's last number (or its text);
items with a "test" (Python; and "entry_point", as HumanEval's) pass when the answer's code passes it,
run by a fresh Python on this machine with a time and memory limit, as nanochat runs HumanEval.
nanochat's task items, exported to JSONL, read as they are. The results are printed and appended to
<checkpoint dir>/report.md.
"""

import argparse

from nanojax.common import (
    CHAT_TASKS,
    HelpFormatter,
    UserError,
    add_checkpoint_flags,
    cli,
    get_base_dir,
    nonnegative_int,
    positive_int,
    temperature,
)


def task_file(text: str) -> tuple[str, str]:
    """An argparse type for --task NAME=FILE."""
    name, _, path = text.partition("=")
    if not name or not path or "|" in name:
        raise argparse.ArgumentTypeError(f"must be NAME=FILE (a name without '|'), got {text!r}")
    return name, path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    add_checkpoint_flags(p, "sft")
    a("-a", "--task-name", default=None, help="tasks to run, '|'-separated (default: the built-in ones and every "
      "--task)")  # fmt: skip
    a("--task", type=task_file, action="append", default=[], metavar="NAME=FILE", help="a task of your own (repeat)")
    a("-x", "--max-problems", type=positive_int, default=None, help="at most this many items per task (the "
      "built-in tasks: 100 unless given)")  # fmt: skip
    a("-b", "--batch-size", type=positive_int, default=8, help="items per forward pass (categorical tasks)")
    a("-n", "--num-samples", type=positive_int, default=1, help="samples per generative item; it passes if one does")
    a("-t", "--temperature", type=temperature, default=0.0, help="sampling temperature; 0 is greedy")
    a("-k", "--top-k", type=nonnegative_int, default=50, help="sample among the k most likely tokens; 0 for all")
    a("-m", "--max-new-tokens", type=positive_int, default=512, help="at most this many tokens per answer")
    a("--seed", type=int, default=1, help="seed of the built-in tasks' items (the finetuning set's is 0) and of "
      "sampling")  # fmt: skip
    a("--base-dir", default=None, help="default $NANOJAX_BASE_DIR, else ~/.cache/nanojax")
    return p.parse_args(argv)


@cli
def main(argv=None):
    args = parse_args(argv)
    files = dict(args.task)
    if len(files) < len(args.task):
        raise UserError("--task: each task name may be given once")
    if clash := sorted(set(files) & set(CHAT_TASKS)):
        raise UserError(f"--task {clash[0]}: a built-in task has that name; call yours another")
    names = args.task_name.split("|") if args.task_name else [*CHAT_TASKS, *files]
    if unknown := [n for n in names if n not in CHAT_TASKS and n not in files]:
        raise UserError(f"no task {unknown[0]!r}: the built-in ones are {', '.join(CHAT_TASKS)}; give yours with "
                        f"--task {unknown[0]}=FILE")  # fmt: skip
    from nanojax import chat_eval, engine  # imports jax: after --help and the checks above
    from nanojax.report import append_report

    # Every file is read and checked before the model is loaded and the first task runs.
    count = args.max_problems or 100
    tasks = [chat_eval.builtin_task(n, count, args.seed) if n in CHAT_TASKS else chat_eval.read_task(n, files[n])
             for n in names]  # fmt: skip
    base_dir = get_base_dir(args.base_dir)
    model, tokenizer, meta, checkpoint_dir = engine.load_for_inference(base_dir, args.source, args.model_tag,
                                                                       args.step)  # fmt: skip
    gen = engine.Engine(model, tokenizer)
    results = []
    for task in tasks:
        task.items = task.items[: args.max_problems]
        if task.categorical:
            result = chat_eval.run_categorical(model, tokenizer, task, args.batch_size)
        else:
            sampling = dict(num_samples=args.num_samples, max_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k, seed=args.seed)  # fmt: skip
            result = chat_eval.run_generative(gen, task, **sampling)
        print(f"{task.name}: {result.passed}/{result.total} ({100 * result.accuracy:.2f}%)", flush=True)
        results.append(result)
    append_report(checkpoint_dir, chat_eval.report_lines(meta["step"], args.source, results))


if __name__ == "__main__":
    main()
