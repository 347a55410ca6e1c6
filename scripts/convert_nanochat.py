"""Convert checkpoints between nanochat (PyTorch) and nanojax (Orbax). Needs `pip install -e ".[convert]"`.

    python -m scripts.convert_nanochat --from-nanochat ~/.cache/nanochat/base_checkpoints/d20 --model-tag d20
    python -m scripts.convert_nanochat --to-nanochat /tmp/nanochat_d4 --model-tag d4 --step 1000

--from-nanochat reads model_<step>.pt and meta_<step>.json (the latest step unless --step) and writes
<base_dir>/base_checkpoints/<model tag>/<step>/ (chatsft_checkpoints with --source sft), ready for
scripts.sample. --to-nanochat writes a nanojax checkpoint as model_<step>.pt + meta_<step>.json, which
nanochat's checkpoint_manager loads. Only weights are converted: the result samples and evaluates but
does not resume training.
"""

import argparse

from nanojax.common import cli, get_base_dir


@cli
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-nanochat", metavar="DIR", help="a nanochat checkpoint directory to import")
    way.add_argument("--to-nanochat", metavar="DIR", help="where to write the nanochat checkpoint")
    p.add_argument("--model-tag", required=True, help="the nanojax checkpoint folder name (e.g. d20)")
    p.add_argument("--source", choices=["base", "sft"], default="base", help="base_checkpoints or chatsft_checkpoints")
    p.add_argument("--step", type=int, default=None, help="step to convert (default: the latest)")
    p.add_argument("--base-dir", default=None, help="default $NANOJAX_BASE_DIR, else ~/.cache/nanojax")
    args = p.parse_args(argv)

    from nanojax import convert  # imports jax: after --help
    from nanojax.engine import CHECKPOINT_SOURCES

    checkpoint_dir = get_base_dir(args.base_dir) / CHECKPOINT_SOURCES[args.source] / args.model_tag
    if args.from_nanochat:
        step = convert.from_nanochat_dir(args.from_nanochat, checkpoint_dir, args.step)
        print(f"wrote {checkpoint_dir / str(step)}")
    else:
        print(f"wrote {convert.to_nanochat_dir(checkpoint_dir, args.to_nanochat, args.step)}")


if __name__ == "__main__":
    main()
