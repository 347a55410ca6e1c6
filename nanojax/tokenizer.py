"""GPT-4-style byte-level BPE: trained with rustbpe, run with tiktoken, saved as plain data.

    from nanojax.tokenizer import get_tokenizer
    tok = get_tokenizer()                          # <base_dir>/tokenizer/, written by scripts.tok_train
    ids = tok.encode("hello", prepend="<|bos|>")
    ids, mask = tok.render_conversation({"messages": [...]})

A saved tokenizer is a folder holding `tokenizer.tiktoken` (base64 token bytes and rank per line),
`tokenizer.json` (split pattern, special tokens, vocab size) and `token_bytes.npy`.
"""

import base64
import copy
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import rustbpe
import tiktoken

from nanojax.common import UserError, get_base_dir

# GPT-4's split pattern with digit runs of at most two (nanochat's choice for small vocabularies).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""  # noqa: E501
)
SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool
    "<|python_end|>",
    "<|output_start|>",  # the tool's output, not trained on
    "<|output_end|>",
]
RANKS_FILE, META_FILE, TOKEN_BYTES_FILE = "tokenizer.tiktoken", "tokenizer.json", "token_bytes.npy"


class Tokenizer:
    """A tiktoken encoding whose special tokens follow the learned ranks in SPECIAL_TOKENS order."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN, special_tokens=None):
        if special_tokens is None:
            special_tokens = {name: len(mergeable_ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        if missing := [name for name in SPECIAL_TOKENS if name not in special_tokens]:
            raise UserError(f"tokenizer lacks the special tokens {missing}: retrain it with scripts.tok_train")
        self.mergeable_ranks = mergeable_ranks
        self.pattern = pattern
        self.special_tokens = dict(special_tokens)
        self.enc = tiktoken.Encoding(
            name="rustbpe",
            pat_str=pattern,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        self.bos_token_id = self.special_tokens["<|bos|>"]
        # Exact byte length per token (a partial UTF-8 sequence counts its own bytes), 0 for specials:
        # the denominator of bits per byte.
        special_ids = set(self.special_tokens.values())
        self.token_bytes = np.array(
            [0 if i in special_ids else len(self.enc.decode_single_token_bytes(i)) for i in range(self.enc.n_vocab)],
            dtype=np.int32,
        )

    # ---- training and storage

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, pattern: str = SPLIT_PATTERN) -> "Tokenizer":
        """Learn vocab_size - len(SPECIAL_TOKENS) ranks (256 bytes + merges) from the texts."""
        check_vocab_size(vocab_size)
        num_ranks = vocab_size - len(SPECIAL_TOKENS)
        num_chars = 0

        def counted(texts):
            nonlocal num_chars
            for text in texts:
                num_chars += len(text)
                yield text

        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(counted(texts), num_ranks, pattern=pattern)
        if num_chars == 0:
            raise UserError("no text to train the tokenizer on: the corpus is empty")
        return cls({bytes(k): v for k, v in bpe.get_mergeable_ranks()}, bpe.get_pattern())

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomic(directory / RANKS_FILE, self._ranks_text())
        np.save(directory / TOKEN_BYTES_FILE, self.token_bytes)
        meta = {
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "vocab_size": self.get_vocab_size(),
            "fingerprint": self.fingerprint(),
        }
        # Written last: its presence means the folder is complete.
        _write_atomic(directory / META_FILE, json.dumps(meta, indent=2).encode())
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        directory = Path(directory)
        if not (directory / META_FILE).is_file() or not (directory / RANKS_FILE).is_file():
            raise UserError(
                f"no tokenizer at {directory}: run `python -m scripts.tok_train` first (or pass --base-dir)"
            )
        meta = json.loads((directory / META_FILE).read_text())
        tok = cls.from_tiktoken_file(directory / RANKS_FILE, meta["pattern"], meta["special_tokens"])
        if tok.fingerprint() != meta["fingerprint"]:
            raise UserError(f"tokenizer at {directory} is inconsistent: retrain it with scripts.tok_train")
        return tok

    @classmethod
    def from_tiktoken_file(cls, ranks_path, pattern: str = SPLIT_PATTERN, special_tokens=None) -> "Tokenizer":
        """Ranks in tiktoken's format; special_tokens (name -> id) default to SPECIAL_TOKENS after them."""
        ranks = {}
        for line in Path(ranks_path).read_bytes().splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        return cls(ranks, pattern, special_tokens)

    def _ranks_text(self) -> bytes:
        lines = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        return b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in lines)

    def fingerprint(self) -> str:
        """Short hash of everything that decides the ids, so a checkpoint can refuse a different tokenizer."""
        h = hashlib.sha256(self._ranks_text())
        h.update(json.dumps([self.pattern, sorted(self.special_tokens.items())]).encode())
        return h.hexdigest()[:16]

    # ---- encoding

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_special_tokens(self) -> set[str]:
        return set(self.special_tokens)

    def encode_special(self, name: str) -> int:
        if name not in self.special_tokens:
            raise UserError(f"no special token {name!r}: the special tokens are {', '.join(self.special_tokens)}")
        return self.special_tokens[name]

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def encode(self, text: str | list[str], prepend=None, append=None, num_threads: int = 8):
        """Ids of a text (or a list of ids per text); special-token strings inside text stay plain text.

        prepend/append: a token id or special token name added to each result.
        """
        extra = [self._token_id(t) for t in (prepend, append)]
        if isinstance(text, str):
            return self._wrap(self.enc.encode_ordinary(text), *extra)
        if isinstance(text, list):
            return [self._wrap(ids, *extra) for ids in self.enc.encode_ordinary_batch(text, num_threads=num_threads)]
        raise TypeError(f"encode takes a str or a list of str, not {type(text).__name__}")

    def _token_id(self, token):
        return token if token is None or isinstance(token, int) else self.encode_special(token)

    @staticmethod
    def _wrap(ids, first, last):
        return ([first] if first is not None else []) + ids + ([last] if last is not None else [])

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))

    def bytes_per_token(self, texts: Iterable[str]) -> float:
        """Compression ratio: UTF-8 bytes per token over the texts."""
        texts = list(texts)
        num_bytes = sum(len(t.encode()) for t in texts)
        return num_bytes / max(1, sum(len(ids) for ids in self.encode(texts)))

    # ---- chat

    def render_conversation(self, conversation, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """Ids of a chat and a mask that is 1 on the tokens the assistant is trained to produce.

        conversation: {"messages": [{"role": ..., "content": ...}, ...]} (or the list of messages). Roles
        alternate user/assistant after an optional leading system message, which is merged into the first
        user message. Assistant content is a string or a list of {"type": "text"|"python"|"python_output",
        "text": ...} parts.
        """
        messages, shift = _merge_system(conversation)
        ids, mask = [], []

        def add(tokens, value):
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([value] * len(tokens))

        s = self.encode_special
        add(self.bos_token_id, 0)
        for i, message in enumerate(messages):
            content = message["content"]
            if message["role"] == "user":
                if not isinstance(content, str):
                    raise UserError(f"message {i + shift}: user content must be a string, not {type(content).__name__}")
                add([s("<|user_start|>"), *self.encode(content), s("<|user_end|>")], 0)
                continue
            add(s("<|assistant_start|>"), 0)
            for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
                text_ids = self.encode(part["text"])
                if part["type"] == "text":
                    add(text_ids, 1)
                elif part["type"] == "python":
                    add([s("<|python_start|>"), *text_ids, s("<|python_end|>")], 1)
                elif part["type"] == "python_output":
                    # Tool output comes from the interpreter at inference time: never a target.
                    add([s("<|output_start|>"), *text_ids, s("<|output_end|>")], 0)
                else:
                    raise UserError(
                        f"message {i + shift}: unknown part type {part['type']!r} (text, python, python_output)"
                    )
            add(s("<|assistant_end|>"), 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation) -> list[int]:
        """Ids of a chat without its last (assistant) message, ending in <|assistant_start|> for sampling."""
        messages = conversation["messages"] if isinstance(conversation, dict) else conversation
        if not messages or messages[-1]["role"] != "assistant":
            raise UserError("render_for_completion needs a conversation that ends with an assistant message")
        ids, _ = self.render_conversation(messages[:-1])
        return ids + [self.encode_special("<|assistant_start|>")]


def _merge_system(conversation) -> tuple[list[dict], int]:
    """The messages with a leading system message folded into the first user one, roles checked, and
    how many messages that folded away (errors number messages as the file does)."""
    messages = conversation["messages"] if isinstance(conversation, dict) else conversation
    shift = 0
    if messages and messages[0]["role"] == "system":
        shift = 1
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise UserError("a system message must be followed by a user message")
        first = copy.deepcopy(messages[1])
        first["content"] = messages[0]["content"] + "\n\n" + first["content"]
        messages = [first, *messages[2:]]
    if not messages:
        raise UserError("a conversation needs at least one message")
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise UserError(
                f"message {i + shift} is from {message['role']!r} but should be from {expected!r}: "
                "messages alternate user/assistant after an optional leading system message"
            )
    return messages, shift


def cap_documents(docs: Iterable[str], max_chars: int, doc_cap: int) -> Iterator[str]:
    """Documents in pieces of at most doc_cap characters, stopping after exactly max_chars characters in
    all. nanochat crops each document to doc_cap; cutting it instead lets one long file train a tokenizer."""
    left = max_chars
    for doc in docs:
        for start in range(0, max(len(doc), 1), doc_cap):
            piece = doc[start : start + min(doc_cap, left)]
            left -= len(piece)
            yield piece
            if left <= 0:
                return


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def check_vocab_size(vocab_size: int) -> None:
    """The 256 byte tokens and the special tokens come first: a vocabulary must hold them."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise UserError(f"vocab size {vocab_size} is too small: it must be at least {256 + len(SPECIAL_TOKENS)}")


def tokenizer_dir(base_dir=None) -> Path:
    return get_base_dir(base_dir) / "tokenizer"


def get_tokenizer(base_dir=None) -> Tokenizer:
    """The tokenizer that scripts.tok_train saved under the base dir."""
    return Tokenizer.load(tokenizer_dir(base_dir))
