"""Loader tests: best-fit packing equals nanochat's algorithm, long documents cut into rows, exact resume,
one-pass validation, process split, errors.

python -m pytest -q tests/test_loader.py
"""

import itertools
import json
import random
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanojax.common import UserError
from nanojax.loader import make_loader, make_val_loader

B, T = 4, 32
BUFFER, DOCS_PER_CHUNK, ROW_GROUP = 16, 5, 7


class ByteTokenizer:
    """Token = utf-8 byte + 1, so <|bos|> = 0 appears only where a document starts."""

    def get_bos_token_id(self):
        return 0

    def encode(self, texts, prepend=None, num_threads=1):
        return [[prepend] + [b + 1 for b in text.encode()] for text in texts]


def make_texts(n, seed=0):
    """Documents "<id>|xyz..." of random lengths, many longer than a row, a few empty-bodied."""
    rng = random.Random(seed)
    return [f"{i}|" + "".join(rng.choices("abcdefgh", k=int(rng.expovariate(1 / 20)))) for i in range(n)]


def write_shards(folder, texts, n_shards):
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(texts) // n_shards)
    paths = []
    for s in range(n_shards):
        path = folder / f"shard_{s:05d}.parquet"
        pq.write_table(pa.table({"text": texts[s * per : (s + 1) * per]}), path, row_group_size=ROW_GROUP)
        paths.append(path)
    return paths, [texts[s * per : (s + 1) * per] for s in range(n_shards)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    texts = make_texts(150)
    paths, shards = write_shards(tmp_path_factory.mktemp("data"), texts, 3)
    return paths, shards


def loader(paths, **kwargs):
    defaults = {"buffer_size": BUFFER, "docs_per_chunk": DOCS_PER_CHUNK, "num_threads": 2}
    kwargs = defaults | {"process_index": 0, "process_count": 1} | kwargs
    return make_loader(paths, ByteTokenizer(), B, T, **kwargs)


def nanochat_batches(shards, num_batches):
    """nanochat's best-fit loop transcribed (O(buffer) scans), over the same chunks of documents."""
    chunks = [
        shard[rg + c : min(rg + c + DOCS_PER_CHUNK, rg + ROW_GROUP, len(shard))]
        for shard in shards
        for rg in range(0, len(shard), ROW_GROUP)
        for c in range(0, min(ROW_GROUP, len(shard) - rg), DOCS_PER_CHUNK)
    ]
    chunks = itertools.cycle(chunks)
    tok = ByteTokenizer()
    buffer, out = [], []
    for _ in range(num_batches):
        rows = []
        for _ in range(B):
            row = []
            while len(row) < T + 1:
                while len(buffer) < BUFFER:
                    buffer += tok.encode(next(chunks), prepend=0)
                space = T + 1 - len(row)
                best, best_len = -1, 0
                for i, doc in enumerate(buffer):
                    if best_len < len(doc) <= space:
                        best, best_len = i, len(doc)
                if best >= 0:
                    row += buffer.pop(best)
                else:
                    shortest = min(range(len(buffer)), key=lambda i: len(buffer[i]))
                    row += buffer.pop(shortest)[:space]
            rows.append(row)
        rows = np.array(rows, dtype=np.int32)
        out.append((rows[:, :-1], rows[:, 1:]))
    return out


def pieces(doc, crop_long_docs):
    """A tokenized document as the loader packs it: whole when it fits a row (T + 1), else cut into rows
    (pieces after the first get their own <|bos|>), or only its first row as nanochat keeps it."""
    if crop_long_docs or len(doc) <= T + 1:
        return [doc[: T + 1]]
    return [doc[: T + 1]] + [(0, *doc[i : i + T]) for i in range(T + 1, len(doc), T)]


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(got, want):
    assert len(got) == len(want)
    for (x, y), (xw, yw) in zip(got, want, strict=True):
        np.testing.assert_array_equal(x, xw)
        np.testing.assert_array_equal(y, yw)


def test_matches_nanochat_best_fit_across_epochs(corpus):
    paths, shards = corpus
    it = loader(paths, crop_long_docs=True)
    got = take(it, 40)
    assert it.epoch >= 2, "the test should cross an epoch boundary"
    assert_same(got, nanochat_batches(shards, 40))


@pytest.mark.parametrize("crop_long_docs", [False, True])
def test_batch_shapes_and_row_invariants(corpus, crop_long_docs):
    paths, shards = corpus
    encoded = [tuple(ByteTokenizer().encode([t], prepend=0)[0]) for shard in shards for t in shard]
    docs = {p for doc in encoded for p in pieces(doc, crop_long_docs)}
    seen, it = [], loader(paths, crop_long_docs=crop_long_docs)
    for x, y in take(it, 10):
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == np.int32
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
        rows = np.concatenate([x, y[:, -1:]], axis=1)
        assert (rows[:, 0] == 0).all(), "every row starts with <|bos|>"
        for row in rows.tolist():
            starts = [i for i, t in enumerate(row) if t == 0] + [len(row)]
            segments = [tuple(row[a:b]) for a, b in itertools.pairwise(starts)]
            # Whole documents (or pieces), in order, then at most one cropped one filling the row: no padding.
            assert all(s in docs for s in segments[:-1])
            assert any(d[: len(segments[-1])] == segments[-1] for d in docs)
            seen += segments
    assert it.epoch == 1
    whole = [s for s in seen if s in docs]
    assert len(whole) == len(set(whole)), "no document is placed twice within an epoch"


@pytest.mark.parametrize("k", [0, 1, 6, 17])
def test_resume_is_exact(corpus, k):
    paths, _ = corpus
    uninterrupted = loader(paths)
    take(uninterrupted, k)
    state = json.loads(json.dumps(uninterrupted.get_state()))
    resumed = loader(paths, state=state)
    assert resumed.epoch == uninterrupted.epoch == state["epoch"]
    assert_same(take(resumed, 15), take(uninterrupted, 15))
    assert resumed.get_state() == uninterrupted.get_state()


def test_resume_across_an_epoch_boundary(corpus):
    paths, _ = corpus
    it = loader(paths)
    while it.epoch == 1:  # stop on the first batch that read from epoch 2
        next(it)
    state = it.get_state()
    assert state["epoch"] == 2 and state["buffer"]
    assert_same(take(loader(paths, state=state), 8), take(it, 8))


def test_long_documents_are_cut_into_rows_not_cropped(tmp_path):
    long_doc = " ".join(f"{i:03d}" for i in range(200))  # 800 bytes: 25 rows of T + 1
    paths, _ = write_shards(tmp_path, [long_doc] + make_texts(30), 1)
    text = b"".join(bytes(t - 1 for t in row if t) for x, y in take(loader(paths), 12) for row in x)
    assert all(f"{i:03d}".encode() in text for i in range(200))
    cropped = b"".join(
        bytes(t - 1 for t in row if t) for x, _ in take(loader(paths, crop_long_docs=True), 12) for row in x
    )
    assert b"100" not in cropped  # nanochat's packing keeps only the first row of it


def test_val_loader_is_one_pass_the_same_each_time_and_for_any_batch_size(corpus):
    paths, shards = corpus

    def val(batch_size):
        return list(make_val_loader(paths, ByteTokenizer(), batch_size, T, process_index=0, process_count=1))

    def full_rows(batches):  # and checks that the rest, at the end, are padding
        x, y = (np.concatenate(a) for a in zip(*batches, strict=True))
        n = int((y[:, 0] >= 0).sum())
        assert (y[:n] >= 0).all() and (y[n:] == -1).all() and len(y) - n < len(batches[-1][0])
        return x[:n], y[:n]

    batches = val(B)
    assert_same(batches, val(B))
    assert_same([full_rows(batches)], [full_rows(val(1))])  # the same rows, the last batch padded
    one_pass = sum(len(p) for shard in shards for t in shard for p in pieces(ByteTokenizer().encode([t], 0)[0], False))
    # Every token of one pass, less the unfinished last row and what best fit crops: never a replay.
    assert one_pass - 2 * B * (T + 1) < len(full_rows(batches)[0]) * (T + 1) <= one_pass


def test_val_split_smaller_than_a_batch_gives_one_batch(tmp_path):
    paths, _ = write_shards(tmp_path, ["tiny"], 1)
    (x, y), *rest = make_val_loader(paths, ByteTokenizer(), B, T, process_index=0, process_count=1)
    assert x.shape == (B, T) and not rest


def test_processes_read_disjoint_documents(corpus):
    paths, _ = corpus

    def doc_ids(process_index):
        ids = set()
        for x, _ in take(loader(paths, process_index=process_index, process_count=2), 6):
            for row in x.tolist():
                starts = [i for i, t in enumerate(row) if t == 0] + [len(row)]
                for a, b in itertools.pairwise(starts):
                    text = bytes(t - 1 for t in row[a + 1 : b]).decode()
                    if "|" in text:  # not cropped before the end of its "<id>|" header
                        ids.add(int(text.split("|")[0]))
        return ids

    first, second = doc_ids(0), doc_ids(1)
    assert first and second and not first & second


def test_default_process_is_jax_process(corpus):
    paths, _ = corpus
    it = make_loader(paths, ByteTokenizer(), B, T, buffer_size=BUFFER, docs_per_chunk=DOCS_PER_CHUNK)
    assert it.get_state()["process_index"] == 0 and it.get_state()["process_count"] == 1


def test_no_shards_names_the_base_dir(tmp_path):
    with pytest.raises(UserError, match=rf"{re.escape(str(tmp_path))}.*scripts.prepare_data"):
        make_loader([], ByteTokenizer(), B, T, base_dir=tmp_path, process_index=0, process_count=1)


def test_unreadable_shard_names_the_path(tmp_path):
    bad = tmp_path / "shard_00000.parquet"
    bad.write_bytes(b"not a parquet file at all")
    with pytest.raises(UserError, match=re.escape(str(bad))):
        loader([bad])


def test_corrupt_row_group_names_the_path(tmp_path):
    path = tmp_path / "shard_00000.parquet"
    pq.write_table(pa.table({"text": make_texts(100)}), path, row_group_size=50)
    data = bytearray(path.read_bytes())
    data[100 : len(data) // 2] = b"Z" * (len(data) // 2 - 100)  # the data pages; the footer stays valid
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=re.escape(str(path))):
        take(loader([path]), 20)


def test_missing_text_column_names_the_path(tmp_path):
    path = tmp_path / "shard_00000.parquet"
    pq.write_table(pa.table({"content": ["hello"]}), path)
    with pytest.raises(UserError, match=rf"{re.escape(str(path))}.*'text'"):
        loader([path])


def test_more_processes_than_chunks(corpus):
    paths, _ = corpus
    with pytest.raises(UserError, match="none for process 99 of 100"):
        loader(paths, process_index=99, process_count=100)


def test_state_that_does_not_fit_the_data(corpus, tmp_path):
    paths, _ = corpus
    it = loader(paths)
    take(it, 3)
    state = it.get_state()
    with pytest.raises(UserError, match="does not fit"):
        loader(paths[:2], state=state)
    rewritten, _ = write_shards(tmp_path / "fewer", make_texts(140), 3)  # re-prepared: fewer documents
    with pytest.raises(UserError, match="shards \\(documents: saved 150, now 140; .*\\): resume with the data"):
        loader(rewritten, state=state)
    reordered, _ = write_shards(tmp_path / "reordered", make_texts(150)[::-1], 3)  # another seed: as many
    with pytest.raises(UserError, match="shards \\(data_fingerprint: saved [0-9a-f]{12}, now [0-9a-f]{12}\\)"):
        loader(reordered, state=state)
    with pytest.raises(UserError, match="does not fit"):
        loader(paths, process_index=0, process_count=2, state=state)
    with pytest.raises(UserError, match="do not have"):
        loader(paths, state=state | {"buffer": [[0, 99, 0]]})
    with pytest.raises(UserError, match="does not fit"):
        loader(paths, crop_long_docs=True, state=state)
