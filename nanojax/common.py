"""Small shared pieces: the base directory, the one-line user error, the flags several scripts share."""

import argparse
import ctypes
import fcntl
import math
import os
import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from functools import wraps
from pathlib import Path

# Self-attention implementations (GPT's attention): ours, and jax.nn.dot_product_attention's two.
ATTENTION_IMPLEMENTATIONS = ("nanojax", "xla", "cudnn")
# Where each stage saves its models under the base dir (nanochat's folder names).
CHECKPOINT_SOURCES = {"base": "base_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}
# The built-in chat tasks (chat.TASK_KINDS generates them), named here for the scripts' flags, before jax loads.
CHAT_TASKS = ("Arithmetic", "SpellingBee", "Spelling")


class UserError(Exception):
    """Bad input from the user: printed as one line naming the problem and the fix, no traceback."""


class Interrupted(Exception):
    """Ctrl-C, with a line saying where the work stopped and how to go on from there."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The scripts' --help: the description as written, and each flag's default where it has a value."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not action.option_strings or unset or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def get_base_dir(base_dir: str | os.PathLike | None = None, *, create: bool = False) -> Path:
    """--base-dir, else $NANOJAX_BASE_DIR, else ~/.cache/nanojax. Scripts that write to it create it; those that
    only read (sample, chat, eval) leave a mistyped path uncreated and say what is missing in it."""
    path = Path(base_dir or os.environ.get("NANOJAX_BASE_DIR") or Path.home() / ".cache" / "nanojax")
    path = path.expanduser()
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        elif path.exists() and not path.is_dir():
            raise FileExistsError(17, "File exists")
    except OSError as e:  # a file of that name, a read-only place
        raise UserError(
            f"can't use {path} as the base dir ({e.strerror}): pass a --base-dir (or $NANOJAX_BASE_DIR) that is "
            "a folder you can write"
        ) from None
    return path


def changed(saved: dict, now: dict, now_word: str = "now") -> list[str]:
    """'key: saved X, now Y' for each key of `now` whose saved value differs. Keys `saved` lacks (a state
    written before they were kept) are not compared."""
    return [f"{k}: saved {saved[k]}, {now_word} {v}" for k, v in now.items() if k in saved and saved[k] != v]


def a_few(items, n: int = 3) -> str:
    """The first n items, comma-separated, then "..." if there are more: an error names examples, not hundreds."""
    items = [str(item) for item in items]
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def positive_int(text: str) -> int:
    """An argparse type for sizes and counts: a bad value is argparse's one-line error, not a crash later."""
    return _int_at_least(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """An argparse type for counts where 0 means none, or all (top-k)."""
    return _int_at_least(text, 0, "an integer >= 0")


def every_steps(text: str) -> int:
    """An argparse type for --eval-every and the like: a step interval, or -1 for only at the end."""
    return -1 if text.strip() == "-1" else _int_at_least(text, 1, "a positive step interval, or -1 for the end only")


def checkpoint_step(text: str) -> int:
    """An argparse type for --resume-from-step: a checkpoint's step, or -1 for a fresh run."""
    return -1 if text.strip() == "-1" else _int_at_least(text, 1, "a checkpoint's step, or -1 for a fresh run")


def count_or_all(text: str) -> int:
    """An argparse type for a cap such as examples per task: a positive count, or -1 for all."""
    return -1 if text.strip() == "-1" else _int_at_least(text, 1, "a positive count, or -1 for all")


def _int_at_least(text: str, least: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def fraction(text: str) -> float:
    """An argparse type for a share held out: a number above 0 and below 1."""
    return _float_in(text, lambda v: 0 < v < 1, "a fraction above 0 and below 1")


def positive_float(text: str) -> float:
    """An argparse type for an amount such as a number of epochs: a finite number above 0."""
    return _float_in(text, lambda v: 0 < v < math.inf, "a number above 0")


def _float_in(text: str, ok, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not ok(value):  # NaN fails every comparison
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def model_tag(text: str) -> str:
    """An argparse type for --model-tag: one folder name inside the checkpoints folder, never a path out of it."""
    if text in ("", ".", "..") or "/" in text or os.sep in text:
        raise argparse.ArgumentTypeError(f"must be a folder name (no '/', not '.' or '..'), got {text!r}")
    return text


def add_checkpoint_flags(parser, default_source: str) -> None:
    """Which checkpoint a script reads: -i/--source, -g/--model-tag, -s/--step (nanochat's names)."""
    a = parser.add_argument
    folders = ", ".join(f"{source}: {folder}" for source, folder in CHECKPOINT_SOURCES.items())
    a("-i", "--source", choices=list(CHECKPOINT_SOURCES), default=default_source, help=f"the model's stage ({folders})")
    a("-g", "--model-tag", type=model_tag, default=None, help="checkpoint folder (default: the most recently written)")
    a("-s", "--step", type=int, default=None, help="checkpoint step (default: the latest)")


def temperature(text: str) -> float:
    """An argparse type for a sampling temperature: a number >= 0 (0 is greedy)."""
    return _float_in(text, lambda v: 0 <= v < math.inf, "a finite number >= 0 (0 is greedy)")


def add_compute_flags(parser) -> None:
    """The compute options pretraining and finetuning share: dtype, sharding, and the opt-in CPU speed-ups
    (numerics change with them, so they are never the default; benchmarks/README.md has their effect)."""
    a = parser.add_argument
    a("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
      help="matmul dtype; auto: float32 on CPU, bfloat16 on accelerators (params, loss stay float32)")  # fmt: skip
    a("--fsdp", action="store_true", help="shard params and optimizer state over the data axis")
    a("--loss-chunk", type=positive_int, default=None, help="opt-in: fuse lm_head + softcap + cross-entropy over vocab "
      "chunks of this size (e.g. 2048); float32 matches the default to rounding, not bit for bit")  # fmt: skip
    a("--attention", choices=["auto", *ATTENTION_IMPLEMENTATIONS], default="auto", help="self-attention: nanojax's "
      "own, or jax.nn.dot_product_attention's xla or cudnn (flash attention); auto: cudnn on GPUs in bfloat16, "
      "else nanojax")  # fmt: skip
    a("--ynn-dots", action="store_true", help="opt-in: XLA CPU's YNNPACK matmuls in the train step: faster "
      "with --dtype bfloat16 on CPUs with AVX-512 BF16; changes numerics (float32 included)")  # fmt: skip


@contextmanager
def file_lock(path: Path, busy, *, shared: bool = False):
    """Hold a lock file for the block, never waiting: shared (readers) or exclusive, whose holder writes
    its process id in it. When another process holds it, busy(that id, or "?") is the UserError's message.
    Released when the file closes, so also when the process ends, however it ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as f:
        try:
            fcntl.flock(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise UserError(busy(f.read().strip() or "?")) from None
        if not shared:
            f.truncate(0)
            f.write(str(os.getpid()))
            f.flush()
        yield


def keep_freed_memory() -> None:
    """Have glibc's malloc keep the memory it frees, in one arena grown 64 MB at a time. By default it hands
    large blocks back to the OS when they are freed. XLA's CPU step allocates its temporaries anew on every
    call, so each step then page-faults all of them in again: at the seed shape, batch 8, 180,000 faults
    and 0.34 s of system time per step. Kept, that falls to about none, and the same step is about 1.4x
    as fast (numbers unchanged: only where memory comes from). Called by the training
    scripts before jax starts its threads. The cost: the process keeps its peak memory until it ends.
    A no-op where the C library has no mallopt (not glibc)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8  # glibc's malloc.h
    for param, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 2**26)):
        mallopt(param, value)


def cli(main):
    """Wrap a script's main so that a UserError, a file system error (a --base-dir that can't be created,
    a full disk), running out of device memory and Ctrl-C each exit with one line; stdout goes out a
    line at a time, even into a pipe."""

    @wraps(main)
    def run(*args, **kwargs):
        # A warning (an incomplete checkpoint skipped, say) is one line too, not Python's with its source line.
        warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
        # A log piped to tee or a file would otherwise come in 8 KB bursts: progress shows line by line.
        # (A notebook's stdout, which has no reconfigure, writes each print already.)
        if hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(line_buffering=True)
        previous_hook = sys.unraisablehook

        def hook(unraisable):
            _rethrow_interrupt(unraisable, previous_hook)

        sys.unraisablehook = hook
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except (KeyboardInterrupt, Interrupted) as e:
            print(str(e) or "interrupted", file=sys.stderr)
            # Exit without the interpreter's teardown: a Ctrl-C that lands while XLA compiles or the data
            # threads read can leave threads that crash it (a segfault after the message). Whatever had to
            # reach the disk (checkpoints) was waited for before the exception got here.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        except OSError as e:  # names the path and the reason: "[Errno 28] No space left on device: '...'"
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            first = str(e).strip().splitlines()[0]
            print(f"error: out of memory ({first[:200]}): lower --device-batch-size or --max-seq-len, or use a "
                  "smaller model", file=sys.stderr)  # fmt: skip
            sys.exit(2)
        finally:
            # A hook installed on top of ours while main ran (nanojax.checkpoint's, imported late so that --help
            # stays fast) stays: it silences reports that come after main's error, from reads still in flight.
            if sys.unraisablehook is hook:
                sys.unraisablehook = previous_hook

    return run


def _rethrow_interrupt(unraisable, previous_hook):
    """A Ctrl-C that lands in code whose exceptions Python ignores (jax's garbage-collection callback, run
    often while jax starts up) would print "Exception ignored in ..." and be lost: deliver it again, a moment
    later from another thread, so that it lands in ordinary code (once more here if it does not)."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
    else:
        previous_hook(unraisable)


def is_out_of_memory(e: Exception) -> bool:
    """XLA's allocation failure, on any device. jax is looked up, not imported: --help stays fast."""
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(e, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(e)
