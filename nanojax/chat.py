"""Conversations: JSONL files, the generated set, packing into finetuning rows, and a chat session.

    convs = read_conversations(["chats.jsonl"], tokenizer, row_len=513)  # rendered; bad lines reported
    loader = SFTLoader(convs, rows=8, seq_len=512)      # endless (inputs, targets); target -1: no loss
    batches = val_batches(convs, rows=8, seq_len=512)   # one pass in file order, the same every call
    write_conversations(path, generate_conversations(2000, seed=0))      # the offline training set
    session = ChatSession(Engine(model, tokenizer))
    for piece in session.reply("What is 12+30?"): print(piece, end="")

A conversation file holds one conversation per line in nanochat's format: a JSON list of messages
{"role": "user"|"assistant"|"system", "content": ...}, or an object {"messages": [...]}. Content is
a string; an assistant's may also be a list of parts {"type": "text"|"python"|"python_output",
"text": ...}: a calculator call and what it returned. Messages alternate user/assistant after an
optional leading system message, as tokenizer.render_conversation requires. Blank lines are ignored.

Packing is nanochat's SFT best fit: every row starts with a whole conversation's <|bos|>; take the
longest buffered conversation that fits the space left; when none fits, pad the rest of the row with
<|bos|> and no loss. A conversation is never split over rows; one longer than a row is truncated,
with a warning, and left out if no assistant token is left in it. Targets are -1 wherever the rendered
mask is 0: user turns, tool output, padding.
"""

import glob
import hashlib
import json
import os
import random
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanojax.common import CHAT_TASKS, UserError, changed
from nanojax.engine import calculate

ROLES = ("user", "assistant", "system")
PART_TYPES = ("text", "python", "python_output")
SHOWN = 20  # malformed or truncated conversations listed one by one; the rest are counted


# --- reading conversation files -------------------------------------------------------------------


@dataclass
class Conversations:
    """Rendered conversations (each cut to one row at most) and the file:line each came from. Held in
    memory, about 5 bytes a token: rendering once keeps packing and exact resume simple."""

    tokens: list[np.ndarray]
    masks: list[np.ndarray]
    sources: list[str]
    pad: int  # <|bos|>: fills the end of a row that no conversation fits

    def __len__(self) -> int:
        return len(self.tokens)

    def fingerprint(self) -> str:
        """Of the rendered tokens and loss masks: other conversations, even as many, give another."""
        digest = hashlib.sha1()
        for tokens, mask in zip(self.tokens, self.masks, strict=True):
            digest.update(np.asarray(len(tokens), np.int64).tobytes() + tokens.tobytes() + mask.tobytes())
        return digest.hexdigest()[:12]

    def subset(self, indices) -> "Conversations":
        pick = lambda xs: [xs[i] for i in indices]  # noqa: E731
        return Conversations(pick(self.tokens), pick(self.masks), pick(self.sources), self.pad)


def conversation_files(paths) -> list[Path]:
    """JSONL files named directly, inside folders (recursively), or matched by globs."""
    files = []
    for p in paths:
        path = Path(p).expanduser()
        if path.is_dir():
            found = sorted(path.rglob("*.jsonl"))
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(f) for f in glob.glob(str(path), recursive=True) if Path(f).is_file())
        if not found:
            raise UserError(f"no conversation files at {p}: give .jsonl files, folders holding them, or globs")
        files += found
    return files


def parse_conversation(line: str) -> list[dict]:
    """The messages of one JSONL line; a ValueError says what is wrong with it."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg} at column {e.colno})") from None
    messages = obj.get("messages") if isinstance(obj, dict) else obj
    if not isinstance(messages, list) or not messages:
        raise ValueError('expected a non-empty list of messages, or {"messages": [...]}')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or "content" not in m:
            raise ValueError(f'message {i} is not {{"role": "user"|"assistant"|"system", "content": ...}}')
        content = m["content"]
        if isinstance(content, str):
            continue
        if m["role"] != "assistant" or not isinstance(content, list):
            kinds = "a string or a list of parts" if m["role"] == "assistant" else "a string"
            raise ValueError(f"message {i} ({m['role']}): content must be {kinds}")
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") in PART_TYPES and isinstance(part.get("text"), str)):
                raise ValueError(
                    f'message {i} part {j} is not {{"type": "text"|"python"|"python_output", "text": "..."}}'
                )
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message: nothing to train on")
    return messages


def read_conversations(paths, tokenizer, row_len: int, *, skip_bad_lines=False, log=print) -> Conversations:
    """Every conversation in the files, rendered. Malformed lines are listed with file and line, then
    refused (a UserError) or, with skip_bad_lines, left out; longer conversations are cut to row_len."""
    convs = Conversations([], [], [], tokenizer.get_bos_token_id())
    bad, truncated, untrained = [], [], []
    for path in conversation_files(paths):
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                source = f"{path}:{lineno}"
                try:
                    # utf-8-sig: Windows editors start a file with a byte-order mark. A UnicodeDecodeError
                    # is a ValueError: reported as a bad line.
                    line = raw.decode("utf-8-sig")
                    if not line.strip():
                        continue
                    ids, mask = tokenizer.render_conversation(parse_conversation(line), max_tokens=sys.maxsize)
                except (ValueError, UserError) as e:
                    bad.append(f"{source}: {e}")
                    continue
                if len(ids) > row_len:
                    truncated.append(f"{source}: {len(ids)} tokens")
                    if not any(mask[:row_len]):  # it would only add padding to the rows, and no loss
                        untrained.append(source)
                        continue
                convs.tokens.append(np.asarray(ids[:row_len], np.int32))
                convs.masks.append(np.asarray(mask[:row_len], bool))
                convs.sources.append(source)
    if bad:
        log(f"{len(bad)} malformed conversation line(s){'' if skip_bad_lines else ', refused'}:")
        _list(bad, log)
        if not skip_bad_lines:
            raise UserError(
                f"{len(bad)} malformed line(s) in the conversation files (listed above): fix them, or pass "
                "--skip-bad-lines to train on the others"
            )
        log(f"skipped those {len(bad)} line(s) (--skip-bad-lines)")
    if truncated:
        log(f"warning: {len(truncated)} conversation(s) longer than a row of {row_len} tokens (--max-seq-len and "
            "the last one's target) were truncated (raise --max-seq-len to keep them whole):")  # fmt: skip
        _list(truncated, log)
    if untrained:
        log(f"left out {len(untrained)} of them: no assistant token within the first {row_len} tokens")
    if not convs.tokens and untrained:
        raise UserError(
            f"no conversation in {[str(p) for p in paths]} has an assistant token within a row of {row_len} "
            "tokens: raise --max-seq-len or shorten the user turns"
        )
    if not convs.tokens:
        raise UserError(f"no conversations in {[str(p) for p in paths]}: each line must hold one")
    return convs


def _list(items, log) -> None:
    for item in items[:SHOWN]:
        log(f"  {item}")
    if len(items) > SHOWN:
        log(f"  ... and {len(items) - SHOWN} more")


def split_conversations(convs: Conversations, val_fraction: float, seed: int = 0):
    """(train, val): a seeded choice of max(1, val_fraction of them) held out for validation."""
    n_val = max(1, round(val_fraction * len(convs)))
    if len(convs) - n_val < 1:
        raise UserError(
            f"{len(convs)} conversation(s) can't be split into training and validation: add conversations, "
            "lower --val-fraction or pass --val-data"
        )
    order = np.random.default_rng(seed).permutation(len(convs))
    return convs.subset(sorted(order[n_val:])), convs.subset(sorted(order[:n_val]))


# --- packing into rows ----------------------------------------------------------------------------


class _Packer:
    """Best-fit rows from a stream of conversation indices, choosing among buffer_size of them."""

    def __init__(self, convs: Conversations, row_len: int, stream: Iterator[int], buffer_size: int, buffer=()):
        self.lengths = [len(t) for t in convs.tokens]
        self.row_len, self.stream, self.buffer_size = row_len, stream, buffer_size
        self.buffer = list(buffer)

    def row(self) -> list[int]:
        """The conversations of the next row; [] once the stream and buffer are empty."""
        chosen, space = [], self.row_len
        while space:
            while len(self.buffer) < self.buffer_size and (c := next(self.stream, None)) is not None:
                self.buffer.append(c)
            fits = [k for k, c in enumerate(self.buffer) if self.lengths[c] <= space]
            if not fits:
                break
            k = max(fits, key=lambda k: self.lengths[self.buffer[k]])  # the earliest of the longest
            chosen.append(self.buffer.pop(k))
            space -= self.lengths[chosen[-1]]
        return chosen


def make_batch(convs: Conversations, rows: list[list[int]], row_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), each (len(rows), row_len - 1): targets -1 where the mask is 0 or the row is padding."""
    tokens = np.full((len(rows), row_len), convs.pad, np.int32)
    mask = np.zeros((len(rows), row_len), bool)
    for r, row in enumerate(rows):
        pos = 0
        for c in row:
            n = len(convs.tokens[c])
            tokens[r, pos : pos + n], mask[r, pos : pos + n] = convs.tokens[c], convs.masks[c]
            pos += n
    return tokens[:, :-1], np.where(mask[:, 1:], tokens[:, 1:], -1).astype(np.int32)


class SFTLoader:
    """Endless host batches (inputs, targets) of shape (rows, seq_len) of whole conversations.

    One stream visits the conversations in a fresh seeded order each epoch and packs the global batch
    (rows from each of process_count processes); every process packs it alike and keeps its own rows, as
    pretraining's readers do. The batches are thus the same whatever the process count, and so is the
    state (epoch, position, buffered conversations): a run resumes on any number of processes."""

    def __init__(self, convs, rows, seq_len, *, process_index=0, process_count=1, seed=0, buffer_size=100,
                 state=None):  # fmt: skip
        self.convs, self.rows, self.row_len, self.seed = convs, rows, seq_len + 1, seed
        self.mine = slice(process_index * rows, (process_index + 1) * rows)
        self.global_rows = rows * process_count
        # What a saved position refers to: a state only fits a loader over the same conversations.
        self.layout = {"conversations": len(convs), "data_fingerprint": convs.fingerprint(), "seed": seed}
        self.read_epoch, self.cursor, buffer = 1, 0, []
        if state is not None:
            buffer = self._restore(state)
        # A buffer longer than the epoch would hold a conversation twice.
        self.packer = _Packer(convs, self.row_len, self._stream(), min(buffer_size, len(convs)), buffer)

    def _stream(self) -> Iterator[int]:
        while True:
            # [seed, 0, epoch]: the orders of the per-process readers this stream replaced, reader 0's.
            order = np.random.default_rng([self.seed, 0, self.read_epoch]).permutation(len(self.convs))
            while self.cursor < len(order):
                self.cursor += 1
                yield int(order[self.cursor - 1])
            self.read_epoch, self.cursor = self.read_epoch + 1, 0

    @property
    def epoch(self) -> int:
        """Epoch (from 1) of the rows made so far, counting the conversations packed into them: the
        stream reads up to a buffer ahead, a whole epoch ahead for a small set."""
        packed = (self.read_epoch - 1) * len(self.convs) + self.cursor - len(self.packer.buffer)
        return 1 + max(packed - 1, 0) // len(self.convs)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        rows = [self.packer.row() for _ in range(self.global_rows)]
        return make_batch(self.convs, rows[self.mine], self.row_len)

    def get_state(self) -> dict:
        # The readers layout of pretraining's loader state (train merges the processes' states by reader):
        # one reader, "0", which every process holds alike.
        return {"readers": {"0": {"epoch": self.read_epoch, "cursor": self.cursor, "buffer": list(self.packer.buffer),
                                  **self.layout}}}  # fmt: skip

    def _restore(self, state: dict) -> list[int]:
        saved = state.get("readers", {})
        if len(saved) != 1 or "0" not in saved:  # per-process readers: multi-process runs saved them until 2026-11-26
            diffs = [f"readers: saved {len(saved)}, now one stream for all processes"]
        else:
            diffs = changed(saved["0"], self.layout)
        if diffs:
            raise UserError(
                f"the checkpoint's data position does not fit this run ({'; '.join(diffs)}): resume with the same "
                "conversation files, --val-fraction and --seed"
            )
        self.read_epoch, self.cursor = saved["0"]["epoch"], saved["0"]["cursor"]
        return saved["0"]["buffer"]


def val_batches(convs: Conversations, rows: int, seq_len: int, *, process_index=0, process_count=1, buffer_size=100):
    """One pass over the conversations in file order; the last batch is padded with empty rows. Every
    process packs the same global batches and keeps its own rows, so all see the same number."""
    packer = _Packer(convs, seq_len + 1, iter(range(len(convs))), buffer_size)
    mine = slice(process_index * rows, (process_index + 1) * rows)
    while True:
        batch = [packer.row() for _ in range(rows * process_count)]
        if not any(batch):
            return
        inputs, targets = make_batch(convs, batch, seq_len + 1)
        yield inputs[mine], targets[mine]


def rows_per_epoch(convs: Conversations, seq_len: int, buffer_size: int = 100) -> int:
    """How many rows one pass over the conversations fills: sizes the default horizon."""
    packer = _Packer(convs, seq_len + 1, iter(range(len(convs))), buffer_size)
    return sum(1 for _ in iter(packer.row, []))


# --- the generated set ----------------------------------------------------------------------------

WORDS = """apple banana cherry grape lemon mango orange peach pear plum strawberry raspberry tomato potato
carrot onion garden forest river mountain ocean island desert valley castle bridge window kitchen
pencil paper letter number python jax model token vector matrix tensor kernel compiler function
variable string integer banana bottle butterfly elephant giraffe kangaroo penguin rabbit squirrel
turtle dolphin monkey rocket planet galaxy comet summer winter autumn spring yellow purple silver
coffee cookie butter cheese bread pizza pasta mississippi bookkeeper committee balloon""".split()
OPS = {"+": "plus", "-": "minus", "*": "times"}
ARITHMETIC = ["What is {a}{op}{b}?", "What is {a} {op} {b}?", "What is {a} {word} {b}?", "Calculate {a}{op}{b}.",
              "How much is {a} {word} {b}?", "{a}{op}{b}=?", "Compute {a} {op} {b}."]  # fmt: skip
COUNTING = ["How many '{c}' are in '{w}'?", "How many times does the letter {c} appear in {w}?",
            "Count the letter '{c}' in the word '{w}'."]  # fmt: skip
SPELLING = ["Spell the word '{w}'.", "How do you spell {w}?", "Spell {w} letter by letter."]
GREETINGS = ["Hi!", "Hello", "Hey there", "Who are you?", "What can you do?", "Good morning!"]
INTRO = ("Hello! I am nanojax, a small chat model trained with JAX. I can do arithmetic with a calculator, "
         "spell words and count letters.")  # fmt: skip
SYSTEM = "You are a helpful assistant. Answer briefly."


def _arithmetic(rng: random.Random) -> list[dict]:
    op = rng.choice(list(OPS))
    hi = 30 if op == "*" else 999 if rng.random() < 0.3 else 99
    a, b = rng.randint(2, hi), rng.randint(2, hi)
    expr, value = f"{a}{op}{b}", calculate(f"{a}{op}{b}")
    question = rng.choice(ARITHMETIC).format(a=a, b=b, op=op, word=OPS[op])
    parts = [{"type": "python", "text": expr}, {"type": "python_output", "text": value},
             {"type": "text", "text": f"The answer is {value}."}]  # fmt: skip
    return [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]


def _counting(rng: random.Random) -> list[dict]:
    word = rng.choice(WORDS)
    letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    expr = f"'{word}'.count('{letter}')"
    n = int(calculate(expr))
    parts = [{"type": "text", "text": "Let me count. "}, {"type": "python", "text": expr},
             {"type": "python_output", "text": str(n)},
             {"type": "text", "text": f"There {'is' if n == 1 else 'are'} {n} '{letter}' in '{word}'."}]  # fmt: skip
    return [{"role": "user", "content": rng.choice(COUNTING).format(c=letter, w=word)},
            {"role": "assistant", "content": parts}]  # fmt: skip


def _spelling(rng: random.Random) -> list[dict]:
    word = rng.choice(WORDS)
    return [{"role": "user", "content": rng.choice(SPELLING).format(w=word)},
            {"role": "assistant", "content": f"{word} is spelled {'-'.join(word)}."}]  # fmt: skip


def _greeting(rng: random.Random) -> list[dict]:
    return [{"role": "user", "content": rng.choice(GREETINGS)}, {"role": "assistant", "content": INTRO}]


TASKS = [_arithmetic] * 5 + [_counting] * 2 + [_spelling] * 2 + [_greeting]  # arithmetic is half


def generate_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """n conversations of one or two exchanges (arithmetic with calculator calls, letter counting,
    spelling, greetings), a tenth with a leading system message; the same for the same seed."""
    rng = random.Random(seed)
    conversations = []
    for _ in range(n):
        messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.1 else []
        for _ in range(2 if rng.random() < 0.2 else 1):
            messages += rng.choice(TASKS)(rng)
        conversations.append(messages)
    return conversations


# The generator's kinds that have a checkable answer, as chat_eval's built-in tasks (nanochat's
# SpellingBee, too, asks to count a letter in a word).
TASK_KINDS = dict(zip(CHAT_TASKS, (_arithmetic, _counting, _spelling), strict=True))


def generate_task(name: str, n: int, seed: int) -> list[list[dict]]:
    """n conversations of one kind of TASK_KINDS, the same for the same seed."""
    rng = random.Random(seed)
    return [TASK_KINDS[name](rng) for _ in range(n)]


def write_conversations(path, conversations) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique temporary name, renamed: never a half-written file under the real name, even with
    # every process of a run writing the same set at once.
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write("".join(json.dumps(c) + "\n" for c in conversations))
    try:
        os.replace(f.name, path)
    except OSError:
        os.unlink(f.name)
        raise
    return path


SYNTHETIC = ("chat_data", "synthetic.jsonl")
DEFAULT_COUNT = 2000


def ensure_conversations(base_dir, log=print) -> Path:
    """<base_dir>/chat_data/synthetic.jsonl, generated (seed 0) on first use."""
    path = Path(base_dir).joinpath(*SYNTHETIC)
    if not path.is_file():
        write_conversations(path, generate_conversations(DEFAULT_COUNT))
        log(f"wrote {DEFAULT_COUNT} generated conversations to {path}")
    return path


# --- talking to a model ---------------------------------------------------------------------------


class ChatSession:
    """A multi-turn conversation with an Engine: the token history and one streamed reply per message.

    The engine runs the calculator: a reply's <|python_start|>expr<|python_end|> is followed by the
    forced <|output_start|>value<|output_end|>, all of it part of the streamed text and the history."""

    def __init__(self, engine, *, max_tokens=256, temperature=0.6, top_k=50, seed=42):
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.sampling = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k)
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        self.tokens, self.turns = [self.tokenizer.get_bos_token_id()], 0

    def reply(self, text: str) -> Iterator[str]:
        """Add the user's message, then yield the assistant's answer as it is generated; a character
        split over tokens is held back until complete."""
        s = self.tokenizer.encode_special
        prompt = [*self.tokens, s("<|user_start|>"), *self.tokenizer.encode(text), s("<|user_end|>"),
                  s("<|assistant_start|>")]  # fmt: skip
        room = self.engine.max_positions - len(prompt) - 1  # and <|assistant_end|> after the answer
        if room < 1:
            what = "the conversation fills" if self.turns else "the message is too long for"
            raise UserError(f"{what} the model's {self.engine.max_positions} positions")
        # --max-tokens is an upper bound: a long conversation gets the room that is left.
        sampling = self.sampling | {"max_tokens": min(self.sampling["max_tokens"], room)}
        answer, sent = [], 0
        # A new seed per turn, so a repeated question need not get the same sampled answer.
        for column, _ in self.engine.generate(prompt, seed=self.seed + self.turns, **sampling):
            if column[0] in self.engine.stop_tokens:
                break
            answer.append(column[0])
            decoded = self.tokenizer.decode(answer)
            if not decoded.endswith("\ufffd"):
                yield decoded[sent:]
                sent = len(decoded)
        if tail := self.tokenizer.decode(answer)[sent:]:
            yield tail
        # Closed even when cut off by max_tokens, so the next turn starts as the model was trained.
        self.tokens = [*prompt, *answer, s("<|assistant_end|>")]
        self.turns += 1
