"""Talk to a finetuned model in the terminal, as nanochat's chat_cli:

    python -m scripts.chat_cli                          # interactive, the latest SFT checkpoint
    python -m scripts.chat_cli -p "What is 12+30?"      # one answer on stdout, then exit
    python -m scripts.chat_cli --source base --model-tag d4 --step 100 --temperature 0.8 --top-k 50

Reads <base_dir>/chatsft_checkpoints/<model tag>/ (base_checkpoints with --source base) and the
tokenizer it was trained with under <base_dir>/tokenizer/. Each line typed is a user message and the
model sees the whole conversation so far. Answers stream as they are generated; calculator calls run
in the engine, the call and its result shown inline (<|python_start|>12+30<|python_end|>
<|output_start|>42<|output_end|>). Commands: 'clear' starts a new conversation, 'quit' or 'exit'
(or Ctrl-D) leaves; Ctrl-C stops an answer.
"""

import argparse

from nanojax.common import (
    HelpFormatter,
    UserError,
    add_checkpoint_flags,
    cli,
    get_base_dir,
    nonnegative_int,
    positive_int,
    temperature,
)

QUIT, CLEAR = ("quit", "exit"), "clear"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a("-p", "--prompt", default=None, help="answer this one message and exit (no interactive session)")
    add_checkpoint_flags(p, "sft")
    a("-t", "--temperature", type=temperature, default=0.6, help="sampling temperature; 0 is greedy")
    a("-k", "--top-k", type=nonnegative_int, default=50, help="sample among the k most likely tokens; 0 for all")
    a("--max-tokens", type=positive_int, default=256, help="at most this many tokens per answer")
    a("--seed", type=int, default=42, help="sampling seed (each turn adds its number)")
    a("--base-dir", default=None, help="default $NANOJAX_BASE_DIR, else ~/.cache/nanojax")
    return p.parse_args(argv)


def stream(session, text: str) -> None:
    for piece in session.reply(text):
        print(piece, end="", flush=True)
    print()


@cli
def main(argv=None):
    args = parse_args(argv)
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("-p: the message is empty (the interactive session skips empty lines too)")
    from nanojax import engine  # imports jax: after --help
    from nanojax.chat import ChatSession

    base_dir = get_base_dir(args.base_dir)
    model, tokenizer, _, _ = engine.load_for_inference(base_dir, args.source, args.model_tag, args.step)
    session = ChatSession(engine.Engine(model, tokenizer), max_tokens=args.max_tokens,
                          temperature=args.temperature, top_k=args.top_k, seed=args.seed)  # fmt: skip
    if args.prompt is not None:
        stream(session, args.prompt)
        return

    import readline  # noqa: F401  (input() gains line editing and a history of what was typed)

    print(f"nanojax chat: '{CLEAR}' starts a new conversation, '{QUIT[0]}' or Ctrl-D leaves")
    while True:
        try:
            text = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text.lower() in QUIT:
            return
        if text.lower() == CLEAR:
            session.reset()
            print("(new conversation)")
            continue
        if not text:
            continue
        print("\nAssistant: ", end="", flush=True)
        try:
            stream(session, text)
        except KeyboardInterrupt:
            print("\n(answer stopped; the conversation goes on without it)")
        except UserError as e:  # e.g. a conversation past the model's positions: the session survives
            hint = f"\n(type '{CLEAR}' to start a new conversation)" if session.turns else ""
            print(f"\nerror: {e}{hint}")


if __name__ == "__main__":
    main()
