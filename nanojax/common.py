"""Small shared pieces: the base directory and the one-line user error."""

import os
import sys
from functools import wraps
from pathlib import Path


class UserError(Exception):
    """Bad input from the user: printed as one line naming the problem and the fix, no traceback."""


def get_base_dir(base_dir: str | os.PathLike | None = None) -> Path:
    """--base-dir, else $NANOJAX_BASE_DIR, else ~/.cache/nanojax (created if missing)."""
    path = Path(base_dir or os.environ.get("NANOJAX_BASE_DIR") or Path.home() / ".cache" / "nanojax")
    path = path.expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def cli(main):
    """Wrap a script's main so that a UserError exits with its message on one line."""

    @wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return run
