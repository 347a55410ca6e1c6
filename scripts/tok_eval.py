"""Evaluate the tokenizer's compression, as nanochat's tok_eval: UTF-8 bytes per token on kinds of text.

    python -m scripts.tok_eval                                 # the base dir's tokenizer and shards
    python -m scripts.tok_eval --data notes/ --compare gpt2 cl100k_base

Rows: a few built-in texts of different kinds (English prose, Python code, LaTeX math, German, Korean),
then the corpus: the first --max-chars of the train shards and of the validation shard (or of --data).
More bytes per token is better. --compare adds tiktoken's encodings (GPT-2's gpt2, GPT-4's cl100k_base),
which tiktoken downloads once: offline, an encoding it has not cached is left out with a note.
"""

import argparse

from nanojax.common import HelpFormatter, UserError, cli, get_base_dir, positive_int
from nanojax.dataset import iter_documents, list_shards
from nanojax.tokenizer import cap_documents, get_tokenizer

# Written for this script: short, and each of a kind a tokenizer treats differently.
SAMPLES = {
    "prose": (
        "The river had risen overnight, and by morning the low road into the village was under a foot of brown "
        "water. Most people stayed home, but the baker, who had promised bread to the school, rolled up his "
        "trousers and waded across with two baskets held high above his head."
    ),
    "code": (
        "def moving_average(values, window):\n"
        '    """The mean of each run of `window` values, as a list."""\n'
        "    if window < 1:\n"
        '        raise ValueError(f"window must be positive, got {window}")\n'
        "    total = sum(values[:window])\n"
        "    averages = [total / window]\n"
        "    for i in range(window, len(values)):\n"
        "        total += values[i] - values[i - window]\n"
        "        averages.append(total / window)\n"
        "    return averages\n"
    ),
    "math": (
        r"For $x \in \mathbb{R}$ the series $\sum_{n=0}^{\infty} \frac{x^n}{n!}$ converges to $e^x$, and "
        r"$\int_0^1 x^2 \, dx = \frac{1}{3}$. If $A$ is a $2 \times 2$ matrix with $\det A \neq 0$, then "
        r"$A^{-1} = \frac{1}{ad - bc} \begin{pmatrix} d & -b \\ -c & a \end{pmatrix}$."
    ),
    "german": (
        "Der Zug hatte zwanzig Minuten Verspätung, weil auf der Strecke zwischen den beiden Städten ein Baum "
        "auf die Gleise gefallen war. Die Fahrgäste nahmen es gelassen; einige lasen, andere schauten aus dem "
        "Fenster auf die verschneiten Felder."
    ),
    "korean": (
        "오늘 아침에는 비가 많이 와서 버스가 늦게 왔습니다. 그래서 우리는 근처 카페에 들어가 따뜻한 차를 마시며 "
        "비가 그치기를 기다렸습니다. 창밖으로 우산을 쓴 사람들이 바쁘게 지나갔습니다."
    ),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a("--data", nargs="+", default=None, help="files, folders or globs to measure instead of the base dir's shards")
    a("--max-chars", type=positive_int, default=1_000_000, help="characters of each corpus row")
    a("--compare", nargs="+", default=[], metavar="ENCODING", help="tiktoken encodings to compare with, e.g. gpt2 "
      "cl100k_base")  # fmt: skip
    a("--base-dir", default=None, help="default $NANOJAX_BASE_DIR, else ~/.cache/nanojax")
    return p.parse_args(argv)


def corpus_rows(args, base_dir) -> dict[str, list[str]]:
    """The corpus texts to measure, by row name; none when the base dir has no shards and no --data."""
    if args.data:
        return {"your data": list(cap_documents(iter_documents(args.data), args.max_chars, args.max_chars))}
    rows = {}
    for split in ("train", "val"):
        try:
            shards = list_shards(base_dir, split)
        except UserError:
            continue
        rows[f"corpus {split}"] = list(cap_documents(iter_documents(shards), args.max_chars, args.max_chars))
    return rows


def load_encodings(names: list[str]) -> tuple[dict, list[str]]:
    """The tiktoken encodings that load, and a note for each that does not (unknown, or not cached offline)."""
    import tiktoken

    encodings, notes = {}, []
    for name in names:
        try:
            encodings[name] = tiktoken.get_encoding(name)
        except ValueError:
            notes.append(f"note: {name} is not a tiktoken encoding ({', '.join(tiktoken.list_encoding_names())})")
        except Exception as e:  # a failed download: requests' or urllib's errors, whichever tiktoken uses
            notes.append(f"note: {name} left out: tiktoken could not load it ({type(e).__name__}); it downloads "
                         "an encoding once, so run this once with a network")  # fmt: skip
    return encodings, notes


@cli
def main(argv=None):
    args = parse_args(argv)
    base_dir = get_base_dir(args.base_dir)
    tokenizer = get_tokenizer(base_dir)
    encodings, notes = load_encodings(args.compare)
    texts = {name: [text] for name, text in SAMPLES.items()} | corpus_rows(args, base_dir)

    names = ["ours", *encodings]
    header = "| text | bytes | " + " | ".join(f"{n} tokens | {n} bytes/token" for n in names) + " |"
    lines = [f"Tokenizer: {tokenizer.get_vocab_size():,} tokens ({base_dir / 'tokenizer'})", "", header,
             "|---" * (2 + 2 * len(names)) + "|"]  # fmt: skip
    for row, docs in texts.items():
        num_bytes = sum(len(doc.encode()) for doc in docs)
        counts = [sum(len(ids) for ids in tokenizer.encode(docs))]
        counts += [sum(len(enc.encode_ordinary(doc)) for doc in docs) for enc in encodings.values()]
        cells = " | ".join(f"{n:,} | {num_bytes / max(n, 1):.2f}" for n in counts)
        lines.append(f"| {row} | {num_bytes:,} | {cells} |")
    print("\n".join([*lines, *notes]))


if __name__ == "__main__":
    main()
