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

The buffer is kept sorted by (length, chunk, document), which is nanochat's order among equal lengths,
so one bisection finds the best fit. The state names the buffered documents by (chunk, document) and a
restore re-reads and re-tokenizes just those, so the batches after a restore equal the uninterrupted ones.

Throughput on this machine: python -m benchmarks.data_throughput
"""

import bisect
import itertools
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nanojax.common import UserError

# A chunk: (shard index, row group, first document, end document) within that row group.
Chunk = tuple[int, int, int, int]


class _Documents:
    """This process's share of the shards as chunks, and how to turn a chunk into tokens."""

    def __init__(self, paths, tokenizer, row_len, docs_per_chunk, num_threads, process_index, process_count):
        self.paths = [str(p) for p in paths]
        self.row_len = row_len
        self.num_threads = num_threads
        self.layout = {"shards": len(self.paths), "docs_per_chunk": docs_per_chunk}
        self.tokenizer = tokenizer
        self.bos = tokenizer.get_bos_token_id()
        chunks = []
        for shard, path in enumerate(self.paths):
            meta = _open(path).metadata
            for rg in range(meta.num_row_groups):
                n = meta.row_group(rg).num_rows
                chunks += [(shard, rg, s, min(s + docs_per_chunk, n)) for s in range(0, n, docs_per_chunk)]
        # Striding chunks (not shards or row groups) keeps processes balanced even with one big shard.
        self.chunks: list[Chunk] = chunks[process_index::process_count]
        self.layout |= {
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

    def tokenize(self, texts: list[str], num_threads: int = 1) -> list[tuple[int, np.ndarray]]:
        """(length, first row_len tokens) of each document: no row can take more of it."""
        # One tokenizer thread per chunk by default: grain already tokenizes num_threads chunks at once.
        ids = self.tokenizer.encode(texts, prepend=self.bos, num_threads=num_threads)
        return [(len(doc), np.asarray(doc[: self.row_len], dtype=np.int32)) for doc in ids]


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
        # (length, chunk, doc, first row_len tokens), sorted
        self._buffer: list[tuple[int, int, int, np.ndarray]] = []
        self._next_chunk = 0

    @property
    def epoch(self) -> int:
        """Epoch (from 1) of the latest chunk read, as nanochat reports it."""
        return 1 + max(self._next_chunk - 1, 0) // len(self._docs.chunks)

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        rows = np.empty((self._batch_size, self._row_len), dtype=np.int32)
        for row in rows:
            pos = 0
            while pos < self._row_len:
                while len(self._buffer) < self._buffer_size:
                    self._refill()
                space = self._row_len - pos
                j = bisect.bisect_right(self._buffer, (space, math.inf)) - 1
                if j >= 0:  # the largest length that fits; the first-arrived document of that length
                    j = bisect.bisect_left(self._buffer, (self._buffer[j][0],))
                    tokens = self._buffer.pop(j)[3]
                else:  # nothing fits: crop the shortest to fill the row, dropping its remainder
                    tokens = self._buffer.pop(0)[3][:space]
                row[pos : pos + len(tokens)] = tokens
                pos += len(tokens)
        return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])

    def _refill(self):
        chunk, docs = next(self._parent)
        self._next_chunk = chunk + 1
        for d, (length, tokens) in enumerate(docs):
            bisect.insort(self._buffer, (length, chunk, d, tokens))

    def get_state(self) -> dict:
        return {
            "epoch": self.epoch,
            "next_chunk": self._next_chunk,
            "buffer": sorted([chunk, doc] for _, chunk, doc, _ in self._buffer),
            # What the chunk numbers refer to: a state only fits a loader with the same layout.
            **self._docs.layout,
        }

    def set_state(self, state: dict) -> None:
        layout = self._docs.layout
        saved = {key: state.get(key) for key in layout}
        if saved != layout:
            raise UserError(
                f"the loader state does not fit these shards (saved for {saved}, they give {layout}): "
                "resume with the same shards and process count"
            )
        try:
            self._next_chunk = state["next_chunk"]
            grain.experimental.set_next_index(self._parent, self._next_chunk)
            refs = [(chunk, doc) for chunk, doc in state["buffer"]]
            texts = []
            for chunk, group in itertools.groupby(refs, key=lambda ref: ref[0]):
                doc_ids = [doc for _, doc in group]
                if not 0 <= chunk < self._next_chunk or min(doc_ids) < 0:
                    raise IndexError(chunk)
                chunk_texts = self._docs.texts(self._docs.chunks[chunk % len(self._docs.chunks)])
                texts += [chunk_texts[d] for d in doc_ids]
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise UserError(f"the loader state names documents these shards do not have ({e!r})") from e
        # All threads on one call: nothing else is tokenizing yet.
        tokens = self._docs.tokenize(texts, num_threads=self._docs.num_threads)
        self._buffer = sorted(
            ((length, chunk, doc, t) for (chunk, doc), (length, t) in zip(refs, tokens, strict=True)),
            key=lambda entry: entry[:3],
        )


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
    """
    if not shard_paths:
        where = Path(base_dir or "<base_dir>") / "base_data"
        raise UserError(f"no data shards in {where}: run `python -m scripts.prepare_data` first")
    if process_index is None or process_count is None:
        import jax  # only here: the loader itself knows nothing of JAX

        process_index, process_count = jax.process_index(), jax.process_count()
    num_threads = num_threads or min(os.cpu_count() or 1, 8)

    docs = _Documents(shard_paths, tokenizer, seq_len + 1, docs_per_chunk, num_threads, process_index, process_count)
    chunks = (
        grain.MapDataset.source(docs.chunks)
        .repeat()
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
    global stream (the validation split is small) and keeps its own batch_size rows of each batch."""
    loader = make_loader(
        shard_paths, tokenizer, batch_size * process_count, seq_len, process_index=0, process_count=1, **kwargs
    )
    rows = slice(process_index * batch_size, (process_index + 1) * batch_size)
    for inputs, targets in loader:
        yield inputs[rows], targets[rows]


class Readers:
    """Several independent loaders ("readers") side by side: each contributes its rows to every batch.

    Reader r of R reads every R-th chunk, whichever process runs it, so a run's data depends on R
    alone: a single process running 2 readers sees the batches of a 2-process run, and a checkpoint
    resumes on any process count that divides R. The state maps reader index -> loader state."""

    def __init__(self, shard_paths, tokenizer, rows: int, seq_len: int, readers: range, reader_count: int, state=None):
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
