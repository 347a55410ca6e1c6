"""Corpora as parquet shards with one `text` column under <base_dir>/base_data/; the last shard is validation.

    python -m scripts.prepare_data                          # the Python standard library (the default)
    python -m scripts.prepare_data --source notes/ a.jsonl  # your own files, folders or globs
    python -m scripts.prepare_data --source fineweb -n 8    # nanochat's FineWeb-Edu shards

Documents from your files: a `.parquet` file gives one per row of its `text` column, a `.jsonl` file one
per line (its `text` field), any other file is one document if it is UTF-8 text; other files are skipped
and counted. A `manifest.json` next to the shards records what they hold, so re-running is a no-op.
"""

import glob
import http.client
import json
import os
import random
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from nanojax.common import UserError, a_few, file_lock, get_base_dir

FINEWEB_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
SHARD_CHARS = 2_000_000  # about 2 MB of text per shard: the stdlib corpus (~12 MB) gives ~5 train shards
TINY_VAL_FRACTION = 0.1  # held out when the whole corpus fits in one shard
MANIFEST = "manifest.json"
LOCK = ".lock"  # held shared by runs reading the shards, exclusively by prepare_data writing them
TEST_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages"}


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def data_dir(base_dir=None) -> Path:
    return get_base_dir(base_dir) / "base_data"


def list_shards(base_dir=None, split: str = "train") -> list[Path]:
    """Sorted shard paths of a split: the last shard is validation, the others train."""
    assert split in ("train", "val"), split
    folder = data_dir(base_dir)
    shards = sorted(folder.glob("shard_*.parquet"))
    if not shards:
        raise UserError(f"no data shards in {folder}: run `python -m scripts.prepare_data` first (or pass --base-dir)")
    if len(shards) < 2:
        raise UserError(f"{folder} holds one shard; need two or more (the last is validation): rerun prepare_data")
    return shards[:-1] if split == "train" else shards[-1:]


def ensure_data(base_dir=None) -> Path:
    """The data folder, holding the standard-library corpus if it held no shards yet."""
    folder = data_dir(base_dir)
    if not any(folder.glob("shard_*.parquet")):
        manifest = _read_manifest(folder)
        if manifest and manifest["source"] != "stdlib":  # a preparation of other data failed or was cut short
            raise UserError(
                f"{folder} holds an unfinished preparation of other data: run prepare_data on that data again "
                "(or delete the folder to use the Python standard library)"
            )
        print(f"no data shards in {folder}: preparing the Python standard library corpus")
        prepare_data("stdlib", base_dir)
    return folder


# ---- reading documents


def stdlib_files() -> list[Path]:
    """Every .py file of this Python's standard library, without test folders or site-packages, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not TEST_DIRS & set(p.relative_to(root).parts[:-1]))


def resolve_files(sources: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named by paths, folders (recursively, skipping hidden entries) and globs, in a fixed order."""
    files = {}
    for source in sources:
        path = Path(source).expanduser()
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts)
            )
            if not found:
                raise UserError(f"folder {path} holds no files: point at a folder of text files")
        elif any(c in str(source) for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not found:
                raise UserError(f"no files match {source}: check the pattern")
        else:
            raise UserError(f"{path} does not exist: pass existing files, folders or globs")
        files.update(dict.fromkeys(found))
    return list(files)


def iter_documents(
    sources: Iterable[str | os.PathLike], skipped: list | None = None, shuffle_seed: int | None = None
) -> Iterator[str]:
    """The documents of files, folders and globs (checked now, read lazily), the files in path order or
    shuffled by shuffle_seed.

    Files that are not UTF-8 text are skipped and appended to `skipped`, blank documents left out; if no
    file held any text, iterating raises UserError.
    """
    sources = list(sources)
    files = resolve_files(sources)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(files)
    skipped = [] if skipped is None else skipped

    def documents():
        num_docs = 0
        for path in files:
            for doc in _read_file(path, skipped):
                if doc.strip():  # a blank document has nothing to learn from
                    num_docs += 1
                    yield doc
        if num_docs == 0:
            raise UserError(
                f"no UTF-8 text in {a_few(sources)}: {len(files)} file(s), {len(skipped)} not UTF-8, "
                f"{len(files) - len(skipped)} empty"
            )

    return documents()


def skipped_note(skipped: list, of: str = "") -> str:
    return (f"skipped {len(skipped)} file(s){of} that are not text: not UTF-8 (convert them, e.g. with iconv) or "
            f"binary (NUL bytes): {a_few(skipped)}")  # fmt: skip


def _read_file(path: Path, skipped: list) -> Iterator[str]:
    if path.suffix == ".parquet":
        yield from _read_parquet(path)
    elif path.suffix == ".jsonl":
        yield from _read_jsonl(path)
    else:
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror}") from e
        except UnicodeDecodeError:
            text = None
        if text is None or "\0" in text:  # NUL bytes: a binary file that happens to decode
            skipped.append(path)
        elif text:
            yield text


def _read_jsonl(path: Path) -> Iterator[str]:
    try:
        with open(path, "rb") as f:  # streamed line by line: a jsonl corpus can be large
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    yield _jsonl_text(line, f"{path}:{line_no}")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from e


def _jsonl_text(line: bytes, where: str) -> str:
    try:
        doc = json.loads(line.decode("utf-8"))["text"]
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text") from e
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise UserError(f"{where}: each line must be a JSON object with a text field") from e
    if not isinstance(doc, str):
        raise UserError(f"{where}: the text field must be a string")
    return doc


def _read_parquet(path: Path) -> Iterator[str]:
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"cannot read parquet file {path}: {e}") from e
    if "text" not in pf.schema_arrow.names:
        raise UserError(f"parquet file {path} has no text column (columns: {', '.join(pf.schema_arrow.names)})")
    for i in range(pf.num_row_groups):
        yield from (t for t in pf.read_row_group(i, columns=["text"]).column("text").to_pylist() if t)


# ---- writing shards


def prepare_data(
    source: str | Sequence[str] = "stdlib",
    base_dir=None,
    *,
    num_shards: int = 8,
    val_fraction: float | None = None,
    shard_chars: int = SHARD_CHARS,
    seed: int = 0,
    base_url: str | None = None,
    num_workers: int = 4,
    retries: int = 5,
    retry_wait: float = 2.0,
    keep_options: bool = False,
) -> dict:
    """Write (or download) the shards of a source under <base_dir>/base_data/ and return the manifest.

    source: "stdlib", "fineweb" or a list of files, folders and globs.
    num_shards, base_url, num_workers, retries, retry_wait: FineWeb only (base_url defaults to
    $NANOJAX_FINEWEB_URL, else nanochat's). val_fraction: hold out this fraction of documents instead of
    the last ~shard. seed: shuffles the stdlib documents or your files, and draws the held-out documents.
    keep_options: shards already prepared from the same source are kept whatever options made them
    (pretrain --data, which has no say in them); otherwise other options rewrite them.
    """
    sources = [source] if isinstance(source, str | os.PathLike) else list(source)
    if len(sources) > 1 and {"stdlib", "fineweb"} & set(map(str, sources)):
        raise UserError("'stdlib' and 'fineweb' are whole corpora: give one of them alone, or files, folders and globs")
    fineweb = sources == ["fineweb"]
    if fineweb:
        if num_shards < 2:
            raise UserError(f"-n {num_shards} is too few: need two or more shards (the last is validation)")
        base_url = base_url or os.environ.get("NANOJAX_FINEWEB_URL") or FINEWEB_URL
        request = {"source": "fineweb", "options": {"num_shards": num_shards, "base_url": base_url}}
    elif sources == ["stdlib"]:
        request = {"source": "stdlib", "options": {"python": sys.version.split()[0]}}
    else:
        request = {"source": [str(p.resolve()) for p in resolve_files(sources)], "options": {}}
    if not fineweb:
        if val_fraction is not None and not 0 < val_fraction < 1:
            raise UserError(f"--val-fraction {val_fraction} must be above 0 and below 1")
        request["options"].update(val_fraction=val_fraction, shard_chars=shard_chars, seed=seed)

    folder = data_dir(base_dir)
    manifest = _read_manifest(folder)
    existing = sorted(folder.glob("shard_*.parquet"))
    # Shards from elsewhere are never overwritten; FineWeb shards without a manifest are nanochat's own
    # (or an interrupted download) and are resumed.
    if existing and (manifest["source"] != request["source"] if manifest else not fineweb):
        held = manifest["source"] if manifest else "an unknown source"
        if isinstance(held, list):  # the user's files
            held = held[0] if len(held) == 1 else f"{len(held)} files under {os.path.commonpath(held)}"
        raise UserError(f"{folder} already holds shards from {held}: delete that folder or pass another --base-dir")
    if keep_options and manifest and manifest["source"] == request["source"]:
        request["options"] = manifest["options"]
    if _is_done(folder, manifest, request):
        print(f"{folder} already holds the prepared shards; nothing to do")
        return manifest

    busy = f"the shards in {folder} are busy: a run is training on them: wait for it to end, or pass another --base-dir"
    with file_lock(folder / LOCK, lambda _: busy):
        _write_manifest(folder, {**request, "complete": False})
        if fineweb:
            stats = _download_shards(folder, base_url, num_shards, num_workers, retries, retry_wait)
        else:
            for path in existing:  # same source, other options: rewrite from scratch
                path.unlink()
            skipped = []
            if sources == ["stdlib"]:
                docs = list(iter_documents(stdlib_files(), skipped))
                random.Random(seed).shuffle(docs)
            else:  # files in a shuffled order: the last shard, validation, is then no one folder's files
                docs = iter_documents(sources, skipped, shuffle_seed=seed)
            docs = tqdm(docs, desc="writing shards", unit="doc", disable=None)  # None: only in a terminal
            stats = _write_shards(folder, docs, shard_chars, val_fraction, seed)
            stats["skipped_files"] = len(skipped)
            if skipped:
                print(skipped_note(skipped))
        manifest = {**request, **stats, "complete": True}
        _write_manifest(folder, manifest)
        return manifest


def shards_in_use(base_dir=None):
    """Held while a run reads the base dir's shards: prepare_data does not rewrite them under it."""
    folder = data_dir(base_dir)
    busy = f"the shards in {folder} are busy: prepare_data (process {{}}) is writing them: wait for it to end"
    return file_lock(folder / LOCK, busy.format, shared=True)


def _is_done(folder: Path, manifest: dict | None, request: dict) -> bool:
    return (
        manifest is not None
        and manifest["complete"]
        and all(manifest[k] == v for k, v in request.items())
        and all((folder / shard_name(i)).is_file() for i in range(manifest["num_shards"]))
    )


def _read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def _write_manifest(folder: Path, manifest: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, folder / MANIFEST)


def _write_shards(folder: Path, docs: Iterable[str], shard_chars: int, val_fraction, seed: int) -> dict:
    shards = _split_train_val(docs, shard_chars, val_fraction, random.Random(seed))
    counts, chars = [], []
    for i, shard_docs in enumerate(shards):
        tmp = folder / f".{shard_name(i)}.tmp"
        pq.write_table(pa.table({"text": shard_docs}), tmp, row_group_size=1024, compression="zstd")
        os.replace(tmp, folder / shard_name(i))
        counts.append(len(shard_docs))
        chars.append(sum(map(len, shard_docs)))
    return {
        "num_shards": len(counts), "train_docs": sum(counts[:-1]), "val_docs": counts[-1],
        "train_chars": sum(chars[:-1]), "val_chars": chars[-1],
    }  # fmt: skip


def _split_train_val(docs: Iterable[str], shard_chars: int, val_fraction, rng: random.Random) -> Iterator[list[str]]:
    """Lists of documents: the train shards, then the validation shard (never empty, nor is train)."""
    if val_fraction is not None:
        val = []

        def train_docs():
            for doc in docs:
                if rng.random() < val_fraction:
                    val.append(doc)
                else:
                    yield doc

        last = None
        for chunk in _chunks(train_docs(), shard_chars):
            if last:
                yield last
            last = chunk
        if not last and not val:
            raise UserError("the corpus holds no documents")
        if not last:  # every document was drawn for validation
            last, val = _split_tail(val, val_fraction)
        elif not val:
            last, val = _split_tail(last, val_fraction)
        if last:
            yield last
        yield val
        return
    # The last shard is validation. Hold two chunks back so that a short final chunk can join the one
    # before it: the validation shard then holds between half a shard and one and a half.
    held, num_train = [], 0
    for chunk in _chunks(docs, shard_chars):
        held.append(chunk)
        if len(held) == 3:
            yield held.pop(0)
            num_train += 1
    if not held:
        raise UserError("the corpus holds no documents")
    if len(held) == 1:
        yield from _split_tail(held[0], TINY_VAL_FRACTION)
    elif num_train and sum(map(len, held[1])) < shard_chars / 2:
        yield held[0] + held[1]
    else:
        yield from held


def _chunks(docs: Iterable[str], shard_chars: int) -> Iterator[list[str]]:
    chunk, num_chars = [], 0
    for doc in docs:
        if chunk and num_chars + len(doc) > shard_chars:
            yield chunk
            chunk, num_chars = [], 0
        chunk.append(doc)
        num_chars += len(doc)
    if chunk:
        yield chunk


def _split_tail(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """(train, val): about `fraction` of the characters at the end: the whole documents that fit, and
    where those make up less than half of it (one or a few long files, or a tiny corpus), the end of the
    document before them, cut at a line start. At least one document, or piece of one, on each side."""
    target, k, held = fraction * sum(map(len, docs)), 0, 0
    while k < len(docs) - 1 and held + len(docs[-1 - k]) <= target:
        held += len(docs[-1 - k])
        k += 1
    text = docs[-1 - k] if docs else ""
    cut = len(text) - round(target - held)
    line_start = text.rfind("\n", 0, cut) + 1  # prefer cutting at a line start near the cut
    cut = line_start if line_start > cut / 2 else cut
    if not (k and 2 * held >= target) and 0 < cut < len(text):
        return [*docs[: -1 - k], text[:cut]], [text[cut:], *docs[len(docs) - k :]]
    if len(docs) > 1:
        k = max(k, 1)
        return docs[:-k], docs[-k:]
    raise UserError("the corpus is too small: need two documents, or one long enough to split")


# ---- downloading FineWeb-Edu


def _download_shards(folder: Path, base_url: str, num_shards: int, num_workers, retries, retry_wait) -> dict:
    """Fetch shard_00000 .. shard_{n-1}, skipping those already here; the last one is validation."""
    todo = [i for i in range(num_shards) if not (folder / shard_name(i)).is_file()]
    print(f"{num_shards - len(todo)} of {num_shards} shards already in {folder}; downloading {len(todo)}")

    def fetch(i):
        return _download(f"{base_url.rstrip('/')}/{shard_name(i)}", folder / shard_name(i), retries, retry_wait)

    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        fetched = tqdm(pool.map(fetch, todo), total=len(todo), desc="downloading", unit="shard", disable=None)
        errors = [e for e in fetched if e]
    if errors:
        raise UserError(f"{len(errors)} shards failed to download, e.g. {errors[0]}: rerun to resume")
    return {"num_shards": num_shards}


def _download(url: str, path: Path, retries: int, retry_wait: float) -> str | None:
    """Download to a temp file, check it, then rename: a partial download never takes the final name.

    Returns None on success, else the last error.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    for attempt in range(1, retries + 1):
        try:
            with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as f:
                expected = response.headers.get("Content-Length")
                while block := response.read(1 << 20):
                    f.write(block)
            # urllib reports a connection closed early as a short read, not an error: compare sizes.
            if expected is not None and tmp.stat().st_size != int(expected):
                raise OSError(f"got {tmp.stat().st_size} of {expected} bytes")
            if "text" not in pq.read_schema(tmp).names:
                raise OSError("the file has no text column")
            os.replace(tmp, path)
            return None
        except (OSError, http.client.HTTPException, pa.ArrowException) as e:
            error = f"{url}: {e}"
            tmp.unlink(missing_ok=True)
            if isinstance(e, urllib.error.HTTPError) and e.code == 404:
                break  # no such shard: waiting will not make it appear
            if attempt < retries:
                time.sleep(retry_wait * 2 ** (attempt - 1))
    return error
