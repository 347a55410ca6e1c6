"""Train the BPE tokenizer and save it under <base_dir>/tokenizer/ (ranks, specials, token_bytes).

    python -m scripts.tok_train                              # the base dir's train shards (stdlib if none)
    python -m scripts.tok_train --data notes/ --vocab-size 4096

Prints the training time and the compression (UTF-8 bytes per token) on held-out text: the validation
shard, or with --data the documents after the training text.
"""

import argparse
import time

from nanojax.common import HelpFormatter, UserError, a_few, cli, get_base_dir, positive_int
from nanojax.dataset import ensure_data, iter_documents, list_shards, skipped_note
from nanojax.tokenizer import META_FILE, Tokenizer, cap_documents, check_vocab_size, tokenizer_dir

EVAL_CHARS = 1_000_000  # held-out text for the compression figure


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = parser.add_argument
    a("--vocab-size", type=positive_int, default=8192, help="vocabulary incl. 9 special tokens")
    a("--max-chars", type=positive_int, default=10_000_000, help="characters to train on")
    a("--doc-cap", type=positive_int, default=10_000, help="documents are cut into pieces of at most this many "
      "characters")  # fmt: skip
    parser.add_argument(
        "--data",
        nargs="+",
        default=None,
        help="files, folders or globs to train on (.parquet text column, .jsonl text field, other UTF-8 "
        "files one document each); default: the base dir's train shards, prepared from the Python "
        "standard library if there are none",
    )
    parser.add_argument("--base-dir", default=None, help="default $NANOJAX_BASE_DIR, else ~/.cache/nanojax")
    args = parser.parse_args(argv)
    check_vocab_size(args.vocab_size)  # before preparing data or training, which can be long
    args.base_dir = get_base_dir(args.base_dir, create=True)

    existing, users = tokenizer_in_use(args.base_dir)
    if users and args.vocab_size < existing.get_vocab_size():  # can't come out the same: refused now, not after
        refuse_replacing(existing, users, args.base_dir)
    if users:
        print(f"note: {len(users)} model(s) were trained with the tokenizer in {tokenizer_dir(args.base_dir)}; "
              "the new one is saved only if it comes out the same")  # fmt: skip
    skipped = []
    if args.data:
        docs = iter_documents(args.data, skipped)
    else:
        ensure_data(args.base_dir)
        docs = iter_documents(list_shards(args.base_dir, "train"))
    num_chars = 0

    def counted(texts):
        nonlocal num_chars
        for text in texts:
            num_chars += len(text)
            yield text

    t0 = time.time()
    tok = Tokenizer.train(counted(cap_documents(docs, args.max_chars, args.doc_cap)), args.vocab_size)
    train_time = time.time() - t0
    print(f"trained on {num_chars:,} characters in {train_time:.2f}s")
    if skipped:
        print(skipped_note(skipped, " of those read"))  # reading stops at --max-chars
    if tok.get_vocab_size() < args.vocab_size:
        print(f"warning: the text only supports {tok.get_vocab_size():,} tokens, fewer than --vocab-size")

    # `docs` now stands just after the training text, so its next documents were never seen.
    held_out, label = docs, "held-out documents"
    if not args.data:
        held_out, label = iter_documents(list_shards(args.base_dir, "val")), "the validation shard"
    sample = list(cap_documents(held_out, EVAL_CHARS, args.doc_cap))
    if not sample:
        sample, label = (
            list(cap_documents(iter_documents(args.data), EVAL_CHARS, args.doc_cap)),
            "training text",
        )
    ratio = tok.bytes_per_token(sample)
    print(f"compression: {ratio:.3f} bytes/token on {label} ({sum(map(len, sample)):,} chars)")

    if users and tok.fingerprint() != existing.fingerprint():
        refuse_replacing(existing, users, args.base_dir)
    path = tok.save(tokenizer_dir(args.base_dir))
    nonzero = tok.token_bytes[tok.token_bytes > 0]
    print(f"vocab size {tok.get_vocab_size():,}; token bytes mean {nonzero.mean():.2f}, max {nonzero.max()}")
    print(f"saved the tokenizer (fingerprint {tok.fingerprint()}) to {path}")


def refuse_replacing(existing: Tokenizer, users: list, base_dir) -> None:
    """Refuse to replace a tokenizer models were trained with: checkpoints carry no copy of it."""
    raise UserError(
        f"{len(users)} model(s) were trained with the {existing.get_vocab_size():,}-token tokenizer in "
        f"{tokenizer_dir(base_dir)} ({a_few(f'{p.parent.name}/{p.name}' for p in users)}); a new one would make "
        "them unusable: train it in another --base-dir, or move those checkpoints out first"
    )


def tokenizer_in_use(base_dir) -> tuple[Tokenizer | None, list]:
    """The base dir's tokenizer, if any, and the checkpoints trained with it."""
    folder = tokenizer_dir(base_dir)
    if not (folder / META_FILE).is_file():
        return None, []
    from nanojax.engine import checkpoints_trained_with  # imports jax: only when there is something to check

    existing = Tokenizer.load(folder)
    return existing, checkpoints_trained_with(folder.parent, existing.fingerprint())


if __name__ == "__main__":
    main()
