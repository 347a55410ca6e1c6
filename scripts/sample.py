"""Sample completions from a trained checkpoint, streaming them to the terminal.

    python -m scripts.sample --prompt "The capital of France is"
    python -m scripts.sample --model-tag d4 --step 100 --prompt "def main(" --prompt "import " \\
        --temperature 0.8 --top-k 50 --max-tokens 64 --num-samples 3 --seed 1
    python -m scripts.sample --source sft --prompt "Why is the sky blue?"

Reads <base_dir>/base_checkpoints/<model tag>/ (chatsft_checkpoints with --source sft, chatrl_checkpoints
with --source rl) and the tokenizer under <base_dir>/tokenizer/, which must be the one the model was trained
with. Base models continue the prompt after <|bos|>; with --source sft or rl the prompt is a user message
and the model answers.
"""

import argparse

from nanojax.common import (
    HelpFormatter,
    add_checkpoint_flags,
    cli,
    get_base_dir,
    nonnegative_int,
    positive_int,
    temperature,
)

DEFAULT_PROMPTS = ["The capital of France is", "def main("]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--prompt", action="append", default=None, help=f"text to complete; repeatable (default {DEFAULT_PROMPTS})")
    add_checkpoint_flags(p, "base")
    a("--temperature", type=temperature, default=0.6, help="sampling temperature; 0 is greedy")
    a("--top-k", type=nonnegative_int, default=50, help="sample among the k most likely tokens; 0 for all")
    a("--max-tokens", type=positive_int, default=128, help="tokens to generate per sample")
    a("--num-samples", type=positive_int, default=1, help="samples per prompt (sharing one prefill)")
    a("--seed", type=int, default=42, help="sampling seed")
    a("--base-dir", default=None, help="default $NANOJAX_BASE_DIR, else ~/.cache/nanojax")
    return p.parse_args(argv)


@cli
def main(argv=None):
    args = parse_args(argv)
    from nanojax import engine  # imports jax: after --help

    base_dir = get_base_dir(args.base_dir)
    model, tokenizer, _, _ = engine.load_for_inference(base_dir, args.source, args.model_tag, args.step)
    gen = engine.Engine(model, tokenizer)
    kwargs = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    for prompt in args.prompt or DEFAULT_PROMPTS:
        ids = engine.prompt_ids(tokenizer, prompt, chat=args.source != "base")
        print("-" * 80)
        if args.num_samples == 1:
            pieces = gen.stream(ids, **kwargs)
            first = next(pieces, "")  # a prompt too long is refused here, before it is echoed
            print(prompt + first, end="", flush=True)
            for piece in pieces:
                print(piece, end="", flush=True)
            print()
            continue
        results, _ = gen.generate_batch(ids, args.num_samples, **kwargs)
        for i, tokens in enumerate(results):
            print(f"[{i}] {prompt}{tokenizer.decode(tokens[len(ids) :])}")


if __name__ == "__main__":
    main()
