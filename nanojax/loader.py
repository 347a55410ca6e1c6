"""The pretraining data loader: parquet shards → tokens → BOS-aligned best-fit rows → (inputs, targets).

    loader = make_loader(dataset.list_shards(base_dir, "train"), tokenizer, batch_size=8, seq_len=512)
    inputs, targets = next(loader)       # int32 (batch_size, seq_len), targets = inputs shifted by one
    state = loader.get_state()           # small JSON-able dict; make_loader(..., state=state) resumes exactly

The pipeline is grain's up to the packer:

    MapDataset.source(chunks)            a chunk is <= docs_per_chunk documents of one parquet row group;
      .repeat()                          this process's chunks, every process_count-th one, forever
      .map_with_index(read + tokenize)   global chunk index i is chunk i % n of epoch 1 + i // n
      .to_iter_dataset(ReadOptions)      grain's thread pool tokenizes chunks ahead of use
    _BestFitBatches                      ours: grain's packers pad, nanochat's crops (SPEC 6)

Best fit, as nanochat's `tokenizing_distributed_data_loader_with_state_bos_bestfit`: keep at least
`buffer_size` tokenized documents (each starting with <|bos|>); fill each row of seq_len + 1 tokens with
the largest buffered document that fits the space left, and when none fits, crop the shortest to fill
the row exactly and drop the rest of it. Ties go to the document that arrived first, as in nanochat.

One departure, on by default: a document longer than a row is first cut into row-sized documents (the
first row_len tokens, then pieces of row_len - 1 tokens after their own <|bos|>). nanochat keeps only
the first row of such a document; FineWeb's documents mostly fit a 2,048-token row, but a folder of
files made into one document each would lose most of its text (94% of the standard library at seq 512).
`crop_long_docs=True` packs exactly as nanochat does.

The buffer is kept sorted by (length, chunk, document, piece), which is nanochat's order among equal
lengths, so one bisection finds the best fit. The state names the buffered pieces by (chunk, document,
piece) and a restore re-reads and re-tokenizes just those documents, so the batches after a restore
equal the uninterrupted ones.

Throughput on this machine: python -m benchmarks.data_throughput
"""

import bisect
import hashlib
import itertools
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nanojax.common import UserError, changed

# A chunk: (shard index, row group, first document, end document) within that row group.
Chunk = tuple[int, int, int, int]


class _Documents:
    """This process's share of the shards as chunks, and how to turn a chunk into tokens."""

    def __init__(
        self, paths, tokenizer, row_len, docs_per_chunk, num_threads, process_index, process_count, crop_long_docs
    ):
        self.paths = [str(p) for p in paths]
        self.row_len = row_len
        self.num_threads = num_threads
        self.crop_long_docs = crop_long_docs
        self.layout = {"shards": len(self.paths), "docs_per_chunk": docs_per_chunk, "crop_long_docs": crop_long_docs}
        self.tokenizer = tokenizer
        self.bos = tokenizer.get_bos_token_id()
        chunks, sizes = [], hashlib.sha1()
        for shard, path in enumerate(self.paths):
            meta = _open(path).metadata
            for rg in range(meta.num_row_groups):
                n = meta.row_group(rg).num_rows
                chunks += [(shard, rg, s, min(s + docs_per_chunk, n)) for s in range(0, n, docs_per_chunk)]
                sizes.update(f"{n},{meta.row_group(rg).total_byte_size};".encode())
        # Striding chunks (not shards or row groups) keeps processes balanced even with one big shard.
        self.chunks: list[Chunk] = chunks[process_index::process_count]
        self.layout |= {
            "documents": sum(end - start for _, _, start, end in chunks),  # all processes': the data's size
            # Rows and uncompressed bytes of every row group: shards prepared again (another seed or split)
            # differ here even with as many documents.
            "data_fingerprint": sizes.hexdigest()[:12],
            "chunks_per_epoch": len(self.chunks),
            "process_index": process_index,
            "process_count": process_count,
        }
        if not self.chunks:
            raise UserError(
                f"the {len(self.paths)} shard(s) starting with {self.paths[0]} hold {len(chunks)} chunk(s) "
                f"of documents, none for process {process_index} of {process_count}: prepare more data"
            )

    def texts(self, chunk: Chunk) -> list[str]:
        shard, rg, start, end = chunk
        path = self.paths[shard]
        try:
            column = _open(path).read_row_group(rg, columns=["text"]).column("text")
            return column.slice(start, end - start).to_pylist()
        except (OSError, pa.ArrowException) as e:
            raise UserError(f"cannot read row group {rg} of parquet shard {path}: {e}") from e

    def tokenize(self, texts: list[str], num_threads: int = 1) -> list[list[tuple[int, np.ndarray]]]:
        """Each document's pieces as (length, tokens), none longer than a row (see the module docstring)."""
        # One tokenizer thread per chunk by default: grain already tokenizes num_threads chunks at once.
        ids = self.tokenizer.encode(texts, prepend=self.bos, num_threads=num_threads)
        if self.crop_long_docs:  # the full length still orders the buffer, as in nanochat
            return [[(len(doc), np.asarray(doc[: self.row_len], dtype=np.int32))] for doc in ids]
        n = self.row_len - 1
        pieces = [
            [doc[: self.row_len]] + [[self.bos, *doc[i : i + n]] for i in range(self.row_len, len(doc), n)]
            for doc in ids
        ]
        return [[(len(p), np.asarray(p, dtype=np.int32)) for p in doc] for doc in pieces]


def _open(path: str) -> pq.ParquetFile:
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"cannot read parquet shard {path}: {e}") from e
    if "text" not in pf.schema_arrow.names:
        raise UserError(f"parquet shard {path} has no 'text' column (it has {pf.schema_arrow.names})")
    return pf


class _BestFitBatches(grain.IterDataset):
    """Packs a stream of (chunk index, tokenized documents) into best-fit (inputs, targets) batches."""

    def __init__(self, parent: grain.IterDataset, docs: _Documents, batch_size, buffer_size):
        super().__init__(parent)
        self._args = (docs, batch_size, buffer_size)

    def __iter__(self) -> "Loader":
        return Loader(self._parent.__iter__(), *self._args)


class Loader(grain.DatasetIterator):
    """Endless iterator of (inputs, targets) int32 arrays of shape (batch_size, seq_len), host-local.

    A grain DatasetIterator, so grain's Orbax checkpoint handler can save it too.
    """

    def __init__(self, parent: grain.DatasetIterator, docs: _Documents, batch_size, buffer_size):
        super().__init__(parent)
        self._docs = docs
        self._batch_size = batch_size
        self._row_len = docs.row_len
        # More than an epoch's documents would only hold several copies of some: tiny corpora.
        self._buffer_size = min(buffer_size, sum(end - start for _, _, start, end in docs.chunks))
        # (length, chunk, doc, piece, tokens), sorted
        self._buffer: list[tuple[int, int, int, int, np.ndarray]] = []
        self._next_chunk = 0
        self._exhausted = False  # a loader that does not repeat has read its last chunk

    @property
    def epoch(self) -> int:
        """Epoch (from 1) of the latest chunk read, as nanochat reports it."""
        return 1 + max(self._next_chunk - 1, 0) // len(self._docs.chunks)

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        rows = np.empty((self._batch_size, self._row_len), dtype=np.int32)
        for i, row in enumerate(rows):
            if not self._fill(row):  # the end of a single pass; its unfinished row is dropped
                if i == 0:
                    raise StopIteration
                # The full rows, then rows whose targets are all ignored (-1), so that a batch's worth
                # of rows at the end of a pass still counts, and counts once.
                inputs, targets = rows[:, :-1].copy(), rows[:, 1:].copy()
                inputs[i:], targets[i:] = self._docs.bos, -1
                return inputs, targets
        return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])

    def _fill(self, row: np.ndarray) -> bool:
        """Best-fit documents into the row; False if a single pass ends first."""
        pos = 0
        while pos < self._row_len:
            while len(self._buffer) < self._buffer_size and not self._exhausted:
                self._refill()
            if not self._buffer:
                return False
            space = self._row_len - pos
            j = bisect.bisect_right(self._buffer, (space, math.inf)) - 1
            if j >= 0:  # the largest length that fits; the first-arrived document of that length
                j = bisect.bisect_left(self._buffer, (self._buffer[j][0],))
                tokens = self._buffer.pop(j)[-1]
            else:  # nothing fits: crop the shortest to fill the row, dropping its remainder
                tokens = self._buffer.pop(0)[-1][:space]
            row[pos : pos + len(tokens)] = tokens
            pos += len(tokens)
        return True

    def _refill(self):
        try:
            chunk, docs = next(self._parent)
        except StopIteration:
            self._exhausted = True
            return
        self._next_chunk = chunk + 1
        for d, pieces in enumerate(docs):
            for p, (length, tokens) in enumerate(pieces):
                bisect.insort(self._buffer, (length, chunk, d, p, tokens))

    def get_state(self) -> dict:
        return {
            "epoch": self.epoch,
            "next_chunk": self._next_chunk,
            "buffer": sorted([chunk, doc, piece] for _, chunk, doc, piece, _ in self._buffer),
            # What the chunk numbers refer to: a state only fits a loader with the same layout.
            **self._docs.layout,
        }

    def set_state(self, state: dict) -> None:
        layout = self._docs.layout
        diffs = changed(state, layout)
        if diffs:
            raise UserError(
                f"the loader state does not fit these shards ({'; '.join(diffs)}): resume with the data, process "
                "count and --crop-long-docs it was saved with, or start a fresh run"
            )
        try:
            self._next_chunk = state["next_chunk"]
            grain.experimental.set_next_index(self._parent, self._next_chunk)
            refs = [(chunk, doc, piece) for chunk, doc, piece in state["buffer"]]
            docs = sorted({(chunk, doc) for chunk, doc, _ in refs})
            texts = []
            for chunk, group in itertools.groupby(docs, key=lambda ref: ref[0]):
                doc_ids = [doc for _, doc in group]
                if not 0 <= chunk < self._next_chunk or min(doc_ids) < 0:
                    raise IndexError(chunk)
                chunk_texts = self._docs.texts(self._docs.chunks[chunk % len(self._docs.chunks)])
                texts += [chunk_texts[d] for d in doc_ids]
            # All threads on one call: nothing else is tokenizing yet.
            pieces = dict(zip(docs, self._docs.tokenize(texts, num_threads=self._docs.num_threads), strict=True))
            buffer = []
            for chunk, doc, p in refs:
                if p < 0:
                    raise IndexError(p)
                length, tokens = pieces[chunk, doc][p]
                buffer.append((length, chunk, doc, p, tokens))
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise UserError(
                f"the loader state names documents these shards do not have ({e!r}): the data changed since it "
                "was saved; resume with that data, or start a fresh run"
            ) from e
        self._buffer = sorted(buffer, key=lambda entry: entry[:4])


def make_loader(
    shard_paths: Sequence[str | os.PathLike],
    tokenizer,
    batch_size: int,
    seq_len: int,
    *,
    state: dict | None = None,
    buffer_size: int = 1000,
    docs_per_chunk: int = 128,
    num_threads: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    base_dir: str | os.PathLike | None = None,
    crop_long_docs: bool = False,
    repeat: bool = True,
) -> Loader:
    """Best-fit (inputs, targets) batches from parquet shards with a `text` column, epochs rolling over.

    tokenizer: anything with `encode(texts, prepend=id, num_threads=n)` and `get_bos_token_id()`.
    state: a `get_state()` of an earlier loader over the same shards; the batches continue exactly.
    buffer_size: documents to choose from (nanochat: 1000), at most one epoch's.
    docs_per_chunk: documents per tokenize call (nanochat: 128).
    num_threads: grain threads tokenizing ahead (default: the CPU count, at most 8).
    process_index/process_count: this process's share (default: JAX's); every process reads
        different documents and yields its own host-local batches.
    base_dir: where the shards were looked for, named in the error when there are none.
    crop_long_docs: keep only the first row of a document longer than a row, as nanochat does.
    repeat: roll over into the next epoch forever; False stops after one pass over the documents, the
        last batch's missing rows padded with targets of -1 (ignored by the loss and the metrics).
    """
    if not shard_paths:
        where = Path(base_dir or "<base_dir>") / "base_data"
        raise UserError(f"no data shards in {where}: run `python -m scripts.prepare_data` first")
    if process_index is None or process_count is None:
        import jax  # only here: the loader itself knows nothing of JAX

        process_index, process_count = jax.process_index(), jax.process_count()
    num_threads = num_threads or min(os.cpu_count() or 1, 8)

    docs = _Documents(
        shard_paths, tokenizer, seq_len + 1, docs_per_chunk, num_threads, process_index, process_count, crop_long_docs
    )
    chunks = grain.MapDataset.source(docs.chunks)
    chunks = (
        (chunks.repeat() if repeat else chunks)
        .map_with_index(lambda i, chunk: (i, docs.tokenize(docs.texts(chunk))))
        .to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads))
    )
    loader = iter(_BestFitBatches(chunks, docs, batch_size, buffer_size))
    if state is not None:
        loader.set_state(state)
    return loader


def make_val_loader(
    shard_paths, tokenizer, batch_size: int, seq_len: int, *, process_index: int = 0, process_count: int = 1, **kwargs
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Validation batches, the same on every call and for any process count: every process reads one
    global stream (the validation split is small) and keeps its own batch_size rows of each batch.
    One pass, so that a split smaller than the tokens asked for is evaluated once, not replayed, its
    full rows the same whatever the batch size (the last batch is padded with ignored rows); only a
    split too small to fill one row is repeated, to fill a batch."""

    def batches(repeat: bool):
        return make_loader(
            shard_paths, tokenizer, batch_size * process_count, seq_len, process_index=0, process_count=1,
            repeat=repeat, **kwargs,
        )  # fmt: skip

    loader = batches(repeat=False)
    first = next(loader, None)
    stream = itertools.chain([first], loader) if first is not None else itertools.islice(batches(repeat=True), 1)
    rows = slice(process_index * batch_size, (process_index + 1) * batch_size)
    for inputs, targets in stream:
        yield inputs[rows], targets[rows]


class Readers:
    """Several independent loaders ("readers") side by side: each contributes its rows to every batch.

    Reader r of R reads every R-th chunk, whichever process runs it, so a run's data depends on R
    alone: a single process running 2 readers sees the batches of a 2-process run, and a checkpoint
    resumes on any process count that divides R. The state maps reader index -> loader state."""

    def __init__(
        self, shard_paths, tokenizer, rows, seq_len, readers: range, reader_count: int, state=None, crop_long_docs=False
    ):
        if rows % len(readers):
            raise UserError(
                f"{rows} rows per batch can't be split over {len(readers)} data readers: change --data-readers"
            )
        saved = (state or {}).get("readers", {})
        if state is not None and set(saved) != {str(r) for r in range(reader_count)}:
            raise UserError(
                f"the checkpoint's loader state has {len(saved)} data readers, this run {reader_count}: "
                f"pass --data-readers={len(saved)}"
            )
        self.loaders = {
            r: make_loader(
                shard_paths,
                tokenizer,
                rows // len(readers),
                seq_len,
                state=saved.get(str(r)),
                process_index=r,
                process_count=reader_count,
                crop_long_docs=crop_long_docs,
            )  # fmt: skip
            for r in readers
        }

    def __iter__(self):
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        inputs, targets = zip(*(next(loader) for loader in self.loaders.values()), strict=True)
        return np.concatenate(inputs), np.concatenate(targets)

    @property
    def epoch(self) -> int:
        return min(loader.epoch for loader in self.loaders.values())

    def get_state(self) -> dict:
        """This process's readers only; `train` merges the states of all processes before saving."""
        return {"readers": {str(r): loader.get_state() for r, loader in self.loaders.items()}}
