"""Tokens per second that the training loader (nanojax.loader) delivers, on the prepared corpus.

    python -m benchmarks.data_throughput                       # T=512, device batch 8
    python -m benchmarks.data_throughput --seq-len 2048 --num-batches 100

Reads the train shards under <base_dir>/base_data (preparing the standard-library corpus if there are
none) with the tokenizer that scripts.tok_train saved. Prints the machine, then the time to the first
batch (filling the buffer), the steady-state rate, the share of tokenized tokens that reach a batch (best
fit crops the rest away) and the time to resume from a saved state.
"""

import argparse
import threading
import time

from benchmarks import machine
from nanojax import dataset, tokenizer
from nanojax.common import HelpFormatter, cli, positive_int
from nanojax.loader import make_loader


class CountingTokenizer:
    """Counts the tokens the loader asks for, to report how many of them end up in batches."""

    def __init__(self, tok):
        self.tok = tok
        self.count = 0
        self._lock = threading.Lock()  # grain calls encode from several threads

    def get_bos_token_id(self):
        return self.tok.get_bos_token_id()

    def encode(self, texts, prepend=None, num_threads=1):
        ids = self.tok.encode(texts, prepend=prepend, num_threads=num_threads)
        with self._lock:
            self.count += sum(map(len, ids))
        return ids


@cli
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--base-dir", help="data and tokenizer root (default $NANOJAX_BASE_DIR, else ~/.cache/nanojax)")
    parser.add_argument("--seq-len", type=positive_int, default=512, help="tokens per row (T)")
    parser.add_argument("--device-batch-size", type=positive_int, default=8, help="rows per batch")
    parser.add_argument("--num-batches", type=positive_int, default=300,
                        help="batches timed after the first; under ~100 time mostly the read-ahead")  # fmt: skip
    parser.add_argument("--buffer-size", type=positive_int, default=1000, help="documents the best fit chooses from")
    parser.add_argument("--num-threads", type=int, default=None, help="tokenizing threads (default: CPUs)")
    parser.add_argument("--crop-long-docs", action="store_true", help="nanochat's packing: long documents keep one row")
    args = parser.parse_args()

    folder = dataset.ensure_data(args.base_dir)
    shards = dataset.list_shards(args.base_dir, "train")
    tok = CountingTokenizer(tokenizer.get_tokenizer(args.base_dir))
    B, T = args.device_batch_size, args.seq_len

    def loader(state=None, counter=tok, repeat=True):
        return make_loader(
            shards, counter, B, T, state=state, buffer_size=args.buffer_size, num_threads=args.num_threads,
            process_index=0, process_count=1, crop_long_docs=args.crop_long_docs, repeat=repeat,
        )  # fmt: skip

    start = time.perf_counter()
    it = loader()
    next(it)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.num_batches):
        next(it)
    steady = time.perf_counter() - start

    state = it.get_state()
    start = time.perf_counter()
    resumed = loader(state)
    inputs, _ = next(resumed)
    restore = time.perf_counter() - start
    assert (inputs == next(it)[0]).all(), "the resumed loader diverged"

    # The share of the corpus's tokens that reach a batch: one pass, every document tokenized once.
    one_pass = CountingTokenizer(tok.tok)
    full_rows = sum(int((targets[:, 0] >= 0).sum()) for _, targets in loader(counter=one_pass, repeat=False))
    kept = full_rows * (T + 1) / one_pass.count

    rate = args.num_batches * B * T / steady
    print(f"machine: {machine()}")
    print(f"corpus: {len(shards)} train shards in {folder}, epoch {it.epoch} reached")
    packing = "long documents cropped to a row (nanochat)" if args.crop_long_docs else "long documents cut into rows"
    print(f"loader: T={T}, device batch {B}, buffer {args.buffer_size}, threads {args.num_threads or 'default'}, "
          f"{packing}")  # fmt: skip
    rows = [
        ("first batch (fills the buffer)", f"{first:.2f} s"),
        ("steady state", f"{rate:,.0f} tokens/s ({args.num_batches / steady:.1f} batches/s)"),
        ("corpus tokens in rows, one pass", f"{kept:.1%}"),
        (f"resume from state ({len(state['buffer'])} buffered)", f"{restore:.2f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")


if __name__ == "__main__":
    main()
