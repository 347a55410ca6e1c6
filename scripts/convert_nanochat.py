"""Convert between nanochat (PyTorch) and nanojax (Orbax). Checkpoints need `pip install nanojax[convert]`.

    # one nanochat checkpoint directory (model_<step>.pt, meta_<step>.json) -> a nanojax checkpoint folder
    python -m scripts.convert_nanochat ~/.cache/nanochat/base_checkpoints/d20 --out ~/nanojax/base_checkpoints/d20
    # a nanojax checkpoint folder -> nanochat's files, loadable by nanochat's checkpoint_manager
    python -m scripts.convert_nanochat ~/.cache/nanojax/base_checkpoints/d4 --to-nanochat --step 100 --out /tmp/d4
    # a whole nanochat base dir: tokenizer + every checkpoint tag, ready for scripts.sample and scripts.base_eval
    python -m scripts.convert_nanochat --base-dir ~/.cache/nanochat --out ~/.cache/nanojax

The latest step is converted unless --step (or --all-steps for a base dir). A base dir's tokenizer.pkl
is read without running the pickle (anything but a tiktoken Encoding is refused) and saved as plain
data; its base_data/ shards and eval_bundle/ are linked, not copied. Only weights are converted: the
result samples and evaluates but does not resume training. --to-nanochat writes the weights and metadata
only: nanochat takes the tokenizer from its base dir, which must hold the one the model was trained with.
"""

import argparse

from nanojax.common import HelpFormatter, cli, get_base_dir


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    a("src", nargs="?", help="a nanochat checkpoint directory; with --to-nanochat a nanojax checkpoint folder")
    a("--out", default=None, help="the nanojax checkpoint folder to write (with --to-nanochat: the nanochat "
      "directory; with --base-dir: the nanojax base dir, default $NANOJAX_BASE_DIR or ~/.cache/nanojax)")  # fmt: skip
    a("--step", type=int, default=None, help="the step to convert (default: the latest)")
    a("--to-nanochat", action="store_true", help="export SRC, a nanojax checkpoint folder, to nanochat's format")
    a("--base-dir", metavar="NANOCHAT_BASE_DIR", default=None,
      help="convert a whole nanochat base dir (tokenizer/, <source>_checkpoints/<tag>/) instead of SRC")  # fmt: skip
    a("--all-steps", action="store_true", help="with --base-dir: every step of each tag, not only the latest")
    args = p.parse_args(argv)
    if (args.src is None) == (args.base_dir is None):
        p.error("give either SRC (one checkpoint directory) or --base-dir (a whole nanochat base dir)")
    if args.base_dir and (args.to_nanochat or args.step is not None):
        p.error("--to-nanochat and --step convert one checkpoint: give SRC instead of --base-dir")
    if args.src and (args.out is None or args.all_steps):
        p.error("converting SRC needs --out (and takes --step, not --all-steps)")
    return args


@cli
def main(argv=None):
    args = parse_args(argv)
    from nanojax import convert  # imports jax: after --help

    if args.base_dir:
        base_dir = get_base_dir(args.out, create=True)
        written = convert.from_nanochat_base_dir(args.base_dir, base_dir, args.all_steps)
        print(f"converted {len(written)} checkpoint(s) into {base_dir}")
    elif args.to_nanochat:
        print(f"wrote {convert.to_nanochat_dir(args.src, args.out, args.step)}")
        print("note: nanochat reads its tokenizer from its own base dir (tokenizer/tokenizer.pkl), not from the "
              "checkpoint: use the model there only with the tokenizer it was trained with")  # fmt: skip
    else:
        step = convert.from_nanochat_dir(args.src, args.out, args.step)
        print(f"wrote {args.out}/{step}")


if __name__ == "__main__":
    main()
