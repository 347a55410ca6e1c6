"""Corpora: stdlib listing, user documents, shard writing and the FineWeb download (from a local server).

Run: `.venv/bin/python -m pytest -q tests/test_dataset.py`
"""

import io
import json
import os
import re
import sysconfig
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanojax.common import UserError
from nanojax.dataset import (
    LOCK,
    data_dir,
    ensure_data,
    iter_documents,
    list_shards,
    prepare_data,
    resolve_files,
    shards_in_use,
    stdlib_files,
)
from scripts import prepare_data as prepare_data_script

BINARY = bytes(range(256)) * 4  # not UTF-8


def read_shards(paths) -> list[str]:
    return [t for p in paths for t in pq.read_table(p).column("text").to_pylist()]


def parquet_bytes(columns: dict) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


@pytest.fixture
def user_folder(tmp_path) -> Path:
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("plain text document\n")
    (folder / "sub" / "b.md").write_text("# markdown ☃\n")
    (folder / "c.jsonl").write_text('{"text": "json one"}\n\n{"text": "json two", "id": 2}\n')
    (folder / "d.parquet").write_bytes(parquet_bytes({"text": ["row one", "row two"], "n": [1, 2]}))
    (folder / "e.bin").write_bytes(BINARY)
    (folder / "empty.txt").write_text("")
    (folder / ".hidden").write_text("not a document")
    return folder


# ---- reading


def test_stdlib_files_exclude_tests_and_site_packages():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    assert files == sorted(files) and len(files) > 500
    assert root / "json" / "__init__.py" in files
    parts = {part for f in files for part in f.relative_to(root).parts[:-1]}
    assert not parts & {"test", "tests", "idle_test", "site-packages"}
    assert any(root.glob("test/*.py")), "the stdlib ships tests, so the exclusion above means something"


def test_user_folder_documents(user_folder):
    skipped = []
    docs = list(iter_documents([user_folder], skipped))
    # sorted paths: a.txt, c.jsonl, d.parquet, e.bin (skipped), empty.txt (no text), sub/b.md
    assert docs == ["plain text document\n", "json one", "json two", "row one", "row two", "# markdown ☃\n"]
    assert skipped == [user_folder / "e.bin"]


def test_sources_mix_files_and_globs(user_folder):
    files = resolve_files([user_folder / "a.txt", str(user_folder / "**" / "*.md"), user_folder / "a.txt"])
    assert files == [user_folder / "a.txt", user_folder / "sub" / "b.md"]


@pytest.mark.parametrize(
    "files, source, error",
    [
        ({}, "missing.txt", "does not exist"),
        ({}, ".", "holds no files"),
        ({}, "*.nothing", "no files match"),
        ({"x.bin": BINARY}, ".", "no UTF-8 text"),
        ({"x.parquet": parquet_bytes({"body": ["a"]})}, "x.parquet", "no text column"),
        ({"x.parquet": b"PAR1 not really"}, "x.parquet", "cannot read"),
        ({"x.jsonl": b'{"text": "ok"}\nnot json\n'}, "x.jsonl", "x.jsonl:2"),
        ({"x.jsonl": b'{"body": "a"}\n'}, "x.jsonl", "text field"),
        ({"x.jsonl": b'{"text": ""}\n{"text": "  \\n"}\n'}, "x.jsonl", "no UTF-8 text"),
    ],
)
def test_bad_sources_name_the_path(tmp_path, files, source, error):
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(UserError, match=error) as info:
        list(iter_documents([str(tmp_path / source)]))
    assert str(tmp_path) in str(info.value)


# ---- writing shards


def test_prepare_user_folder_is_idempotent(user_folder, tmp_path, capsys):
    base = tmp_path / "base"
    manifest = prepare_data([str(user_folder)], base)
    assert manifest["complete"] and manifest["skipped_files"] == 1
    assert (
        f"skipped 1 file(s) that are not text: not UTF-8 (convert them, e.g. with iconv) or binary (NUL bytes): "
        f"{user_folder / 'e.bin'}\n" in capsys.readouterr().out
    )
    train, val = list_shards(base, "train"), list_shards(base, "val")
    assert [p.name for p in train + val] == ["shard_00000.parquet", "shard_00001.parquet"]
    # every document once, its files in a seeded shuffle (validation is then no one folder's files)
    assert "".join(read_shards(train + val)) == "".join(iter_documents([user_folder], shuffle_seed=0))
    assert len(read_shards(val)) == 1  # a tiny corpus holds out the end of its last document

    stamps = {p: p.stat().st_mtime_ns for p in data_dir(base).iterdir()}
    assert prepare_data([str(user_folder)], base) == manifest
    assert "nothing to do" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in data_dir(base).iterdir()} == stamps

    with pytest.raises(UserError, match=f"already holds shards from \\d+ files under {user_folder}:"):
        prepare_data("stdlib", base)
    prepare_data([str(user_folder)], base, val_fraction=0.5)  # same source, other options: rewritten
    assert len(list_shards(base, "train") + list_shards(base, "val")) == 2
    # pretrain --data: the same files keep the options they were prepared with
    assert prepare_data([str(user_folder)], base, keep_options=True)["options"]["val_fraction"] == 0.5
    assert "nothing to do" in capsys.readouterr().out


def test_shards_a_run_reads_are_not_rewritten_under_it(user_folder, tmp_path):
    base = tmp_path / "base"
    prepare_data([str(user_folder)], base)
    with shards_in_use(base):
        with pytest.raises(UserError, match="are busy: a run is training on them: wait for it to end"):
            prepare_data([str(user_folder)], base, val_fraction=0.5)
        assert prepare_data([str(user_folder)], base)["complete"]  # as prepared already: nothing to write
    assert prepare_data([str(user_folder)], base, val_fraction=0.5)["options"]["val_fraction"] == 0.5


def test_single_document_is_split_for_validation(tmp_path):
    lines = [f"line {i}\n" for i in range(100)]
    (tmp_path / "one.txt").write_text("".join(lines))
    prepare_data([str(tmp_path / "one.txt")], tmp_path / "base")
    train, val = (
        read_shards(list_shards(tmp_path / "base", "train")),
        read_shards(list_shards(tmp_path / "base", "val")),
    )
    assert train == ["".join(lines[:90])] and val == ["".join(lines[90:])]


@pytest.mark.parametrize("sizes", [[100] * 20, [30, 40, 5000]])
def test_a_corpus_within_one_shard_holds_out_a_tenth_of_its_text(tmp_path, sizes):
    """Whole documents at the end, or, where the last is over half of the text (a few long files), its end."""
    files = tmp_path / "files"
    files.mkdir()
    for i, size in enumerate(sizes):
        (files / f"{i:02d}.txt").write_text("".join(f"{i:02d}:{j:04d}\n" for j in range(size)))
    prepare_data([str(files)], tmp_path / "base")
    train, val = (read_shards(list_shards(tmp_path / "base", split)) for split in ("train", "val"))
    assert "".join(sorted(train + val)) == "".join(sorted((files / f).read_text() for f in sorted(os.listdir(files))))
    share = sum(map(len, val)) / sum(map(len, train + val))
    assert 0.09 <= share <= 0.11 and (len(val) == 2 if sizes[0] == 100 else 1 <= len(val) <= 3)


def test_shards_split_by_size_and_last_is_validation(tmp_path):
    docs = [f"document {i} " + "x" * (i % 7) * 10 for i in range(300)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    manifest = prepare_data([str(tmp_path / "docs.jsonl")], tmp_path / "base", shard_chars=2000)
    train, val = list_shards(tmp_path / "base", "train"), list_shards(tmp_path / "base", "val")
    assert len(train) >= 5 and manifest["num_shards"] == len(train) + 1
    assert read_shards(train + val) == docs  # user documents keep their order
    val_chars = sum(map(len, read_shards(val)))
    assert 1000 <= val_chars <= 3000  # a short last chunk joins the one before it


def test_val_fraction_holds_out_random_documents(tmp_path):
    docs = [f"doc {i}" for i in range(400)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare_data([str(tmp_path / "docs.jsonl")], tmp_path / "base", val_fraction=0.1, seed=1)
    train, val = (
        read_shards(list_shards(tmp_path / "base", "train")),
        read_shards(list_shards(tmp_path / "base", "val")),
    )
    assert sorted(train + val) == sorted(docs) and 20 <= len(val) <= 60 and val != docs[-len(val) :]
    # even when the draw picks nothing, one document is held out
    prepare_data([str(tmp_path / "docs.jsonl")], tmp_path / "b2", val_fraction=1e-9)
    assert read_shards(list_shards(tmp_path / "b2", "val")) == ["doc 399"]


def test_ensure_data_prepares_the_stdlib_corpus(tmp_path):
    with pytest.raises(UserError, match="prepare_data"):
        list_shards(tmp_path)
    ensure_data(tmp_path)
    train, val = list_shards(tmp_path, "train"), list_shards(tmp_path, "val")
    assert len(train) >= 3 and len(val) == 1
    docs = read_shards(train + val)
    assert sorted(docs) == sorted(t for f in stdlib_files() if (t := f.read_text(encoding="utf-8")))
    assert docs != sorted(docs)  # shuffled
    assert json.loads((data_dir(tmp_path) / "manifest.json").read_text())["source"] == "stdlib"


def test_prepare_data_script(user_folder, tmp_path, capsys):
    prepare_data_script.main(["--source", str(user_folder), "--base-dir", str(tmp_path / "base")])
    assert "shard_00001.parquet, is validation" in capsys.readouterr().out
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit):
        prepare_data_script.main(["--source", str(user_folder), "--base-dir", str(tmp_path / "a_file")])
    err = capsys.readouterr().err
    assert "can't use" in err and "as the base dir (File exists)" in err and err.count("\n") == 1


# ---- FineWeb download, from a server on 127.0.0.1


class Server:
    """Serves shard files; `truncate[name]` = how many first requests send half the body then hang up."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.truncate, self.hits = files, Counter(), Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.hits[name] += 1
                if name not in server.files:
                    self.send_error(404)
                    return
                body = server.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.hits[name] <= server.truncate[name]:
                    body = body[: len(body) // 2]  # HTTP/1.0: the connection closes when we return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def fineweb(tmp_path):
    files = {f"shard_{i:05d}.parquet": parquet_bytes({"text": [f"web {i}.{j}" for j in range(50)]}) for i in range(4)}
    with Server(files) as server:
        yield server


def fetch(base, server, n, **kwargs):
    return prepare_data("fineweb", base, num_shards=n, base_url=server.url, retry_wait=0.001, **kwargs)


def test_fineweb_download_retries_and_resumes(fineweb, tmp_path):
    base = tmp_path / "base"
    fineweb.truncate["shard_00001.parquet"] = 1
    fetch(base, fineweb, 3)
    assert fineweb.hits["shard_00001.parquet"] == 2 and fineweb.hits["shard_00000.parquet"] == 1
    for p in list_shards(base, "train") + list_shards(base, "val"):
        assert p.read_bytes() == fineweb.files[p.name]
    assert list_shards(base, "val")[0].name == "shard_00002.parquet"
    assert sorted(os.listdir(data_dir(base))) == [LOCK, "manifest.json"] + sorted(fineweb.files)[:3]

    fetch(base, fineweb, 3)  # done already: no request
    assert sum(fineweb.hits.values()) == 4
    fetch(base, fineweb, 4)  # more shards: only the new one is fetched
    assert fineweb.hits["shard_00003.parquet"] == 1 and sum(fineweb.hits.values()) == 5
    assert list_shards(base, "val")[0].name == "shard_00003.parquet"


def test_fineweb_failed_transfer_never_looks_complete(fineweb, tmp_path, monkeypatch):
    base = tmp_path / "base"
    fineweb.truncate["shard_00002.parquet"] = 3
    with pytest.raises(UserError, match=re.escape("shard_00002.parquet") + r": got \d+ of \d+ bytes: rerun to resume"):
        fetch(base, fineweb, 3, retries=3)
    assert sorted(os.listdir(data_dir(base))) == [
        LOCK,
        "manifest.json",
        "shard_00000.parquet",
        "shard_00001.parquet",
    ]
    assert not json.loads((data_dir(base) / "manifest.json").read_text())["complete"]

    monkeypatch.setenv("NANOJAX_FINEWEB_URL", fineweb.url)  # the base URL also comes from the environment
    prepare_data("fineweb", base, num_shards=3, retry_wait=0.001)
    assert fineweb.hits["shard_00000.parquet"] == 1 and fineweb.hits["shard_00002.parquet"] == 4
    assert (data_dir(base) / "shard_00002.parquet").read_bytes() == fineweb.files["shard_00002.parquet"]


def test_fineweb_missing_shard_and_bad_count(fineweb, tmp_path):
    with pytest.raises(UserError, match="shard_00004.parquet"):
        fetch(tmp_path / "base", fineweb, 5)
    assert fineweb.hits["shard_00004.parquet"] == 1  # a 404 is final: no retries
    assert not (data_dir(tmp_path / "base") / "shard_00004.parquet").exists()
    with pytest.raises(UserError, match="two or more"):
        fetch(tmp_path / "other", fineweb, 1)


def test_a_whole_corpus_is_not_mixed_with_files(user_folder, tmp_path):
    with pytest.raises(UserError, match="'stdlib' and 'fineweb' are whole corpora: give one of them alone"):
        prepare_data(["stdlib", str(user_folder)], tmp_path / "base")
    with pytest.raises(UserError, match="--val-fraction 0.0 must be above 0 and below 1"):
        prepare_data([str(user_folder)], tmp_path / "base", val_fraction=0.0)


def test_a_corpus_of_empty_files_names_them(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "empty.txt").write_text("")
    (tmp_path / "notes" / "image.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UserError, match=r"no UTF-8 text in .*notes: 2 file\(s\), 1 not UTF-8, 1 empty"):
        prepare_data([str(tmp_path / "notes")], tmp_path / "base")
    # what needs data next (tok_train, pretrain) does not quietly fall back to the standard library
    with pytest.raises(UserError, match="holds an unfinished preparation of other data: run prepare_data"):
        ensure_data(tmp_path / "base")
