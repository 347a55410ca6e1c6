"""Write the pretraining corpus as parquet shards under <base_dir>/base_data/ (the last shard is validation).

    python -m scripts.prepare_data                                 # Python standard library files (the default)
    python -m scripts.prepare_data --source notes/ 'papers/*.md'   # your files: folders, globs, .jsonl, .parquet
    python -m scripts.prepare_data --source fineweb -n 8           # download nanochat's FineWeb-Edu shards

Your files are sharded in a seeded shuffle, so the validation shard is not the last folder's files.
Re-running is safe: finished work is skipped and an interrupted download resumes.
"""

import argparse

from nanojax.common import HelpFormatter, cli, fraction, get_base_dir, positive_int
from nanojax.dataset import FINEWEB_URL, SHARD_CHARS, list_shards, prepare_data


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--source",
        nargs="+",
        default=["stdlib"],
        help="'stdlib' (default: this Python's standard library, one document per .py file, shuffled), "
        "'fineweb', or files/folders/globs: .parquet (text column), .jsonl (text field), other UTF-8 "
        "files one document each; non-UTF-8 files are skipped and counted",
    )
    parser.add_argument(
        "-n",
        "--num-shards",
        type=positive_int,
        default=8,
        help="fineweb: shards to download (default 8, ~100 MB each); other sources are not counted in shards",
    )
    parser.add_argument(
        "--base-url",
        default=None,
        help="fineweb: URL of the folder of shard_XXXXX.parquet files "
        f"(default $NANOJAX_FINEWEB_URL, else {FINEWEB_URL})",
    )
    parser.add_argument("--num-workers", type=positive_int, default=4, help="fineweb: parallel downloads (default 4)")
    parser.add_argument(
        "--val-fraction",
        type=fraction,
        default=None,
        help="hold out this fraction of documents, drawn at random, as the validation shard "
        "(default: the last shard, about --shard-chars characters, is validation; a corpus smaller than a "
        "shard holds out the last tenth of its text)",
    )
    parser.add_argument(
        "--shard-chars", type=positive_int, default=SHARD_CHARS, help=f"characters per shard (default {SHARD_CHARS:,})"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="shuffles the documents (stdlib) or files (yours) before they are sharded, draws --val-fraction docs",
    )
    parser.add_argument("--base-dir", default=None, help="default $NANOJAX_BASE_DIR, else ~/.cache/nanojax")
    args = parser.parse_args(argv)
    args.base_dir = get_base_dir(args.base_dir, create=True)

    manifest = prepare_data(
        args.source,
        args.base_dir,
        num_shards=args.num_shards,
        val_fraction=args.val_fraction,
        shard_chars=args.shard_chars,
        seed=args.seed,
        base_url=args.base_url,
        num_workers=args.num_workers,
    )
    val = list_shards(args.base_dir, "val")[0]
    print(f"{manifest['num_shards']} shards in {val.parent} (the last, {val.name}, is validation)")
    if "train_docs" in manifest:
        line = f"documents: {manifest['train_docs']:,} train, {manifest['val_docs']:,} validation"
        if "val_chars" in manifest:  # manifests from before it was counted lack it
            line += f" ({manifest['val_chars'] / (manifest['train_chars'] + manifest['val_chars']):.1%} of the text)"
        print(line)


if __name__ == "__main__":
    main()
