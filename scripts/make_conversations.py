"""Write the generated conversation set that scripts.chat_sft trains on by default (offline):

    python -m scripts.make_conversations                        # <base_dir>/chat_data/synthetic.jsonl
    python -m scripts.make_conversations --num 500 --seed 1 --output my_set.jsonl

Arithmetic questions answered through calculator calls, letter counting (also through the
calculator), spelling and greetings, one or two exchanges each, a tenth with a system message; the
same seed gives the same file. One conversation per line, in nanochat's format.
"""

import argparse
from pathlib import Path

from nanojax import chat
from nanojax.common import HelpFormatter, UserError, cli, get_base_dir, positive_int


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--num", type=positive_int, default=chat.DEFAULT_COUNT, help="how many conversations")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    p.add_argument("--output", default=None, help="JSONL file (default <base_dir>/chat_data/synthetic.jsonl)")
    p.add_argument("--base-dir", default=None, help="default $NANOJAX_BASE_DIR, else ~/.cache/nanojax")
    return p.parse_args(argv)


@cli
def main(argv=None):
    args = parse_args(argv)
    output = args.output or get_base_dir(args.base_dir, create=True).joinpath(*chat.SYNTHETIC)
    if Path(output).is_dir():
        raise UserError(f"--output {output} is a folder: name a .jsonl file (in it, say)")
    path = chat.write_conversations(output, chat.generate_conversations(args.num, args.seed))
    print(f"wrote {args.num:,} conversations to {path}")


if __name__ == "__main__":
    main()
