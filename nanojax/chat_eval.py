"""Chat evaluation, as nanochat's chat_eval: a chat model's accuracy on tasks, and ChatCORE.

A task is a list of conversations whose last message is the assistant's reference answer, of one of
nanochat's kinds:
- categorical (its ARC and MMLU): the item lists its answer "letters" and the reference is one of them.
  One forward pass per item; the model's answer is the letter with the highest logit where its answer
  would start (the letters alone compete, as in nanochat).
- generative (its GSM8K and SpellingBee): the model answers by sampling, its calculator calls run; an
  item passes when one of its samples' final text (after the last tool call) agrees with the reference's:
  the same last number when the reference's has one (GSM8K's "#### 72", "The answer is 42."), else the
  same text, case and spacing aside.
- code (its HumanEval): a generative item with a "test" (Python that raises when the answer is wrong,
  and "entry_point", the function to check, when the tests define check(candidate) as HumanEval's do)
  passes when a sample's code passes the tests, run by a fresh Python (see passes_tests).

Built-in tasks are drawn from the generator of the default finetuning set (chat.generate_task), with
another seed than the set's; the user's own are JSONL files, a conversation per line as chat_sft reads
them, plus "letters" for categorical items. ChatCORE is the mean accuracy centred on chance (1/letters
for categorical tasks, 0 for generative), over the tasks evaluated.
"""

import contextlib
import json
import keyword
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from nanojax import chat
from nanojax.common import UserError
from nanojax.engine import bucket


@dataclass
class Task:
    name: str
    items: list[dict]  # {"messages": [...], "letters"?: [...], "test"?: code, "entry_point"?: name}
    categorical: bool

    @property
    def chance(self) -> float:
        return float(np.mean([1 / len(item["letters"]) for item in self.items])) if self.categorical else 0.0


@dataclass
class TaskResult:
    task: str
    kind: str
    passed: int
    total: int
    chance: float

    @property
    def accuracy(self) -> float:
        return self.passed / self.total

    @property
    def centered(self) -> float:
        return (self.accuracy - self.chance) / (1 - self.chance)


def builtin_task(name: str, n: int, seed: int) -> Task:
    return Task(name, [{"messages": m} for m in chat.generate_task(name, n, seed)], categorical=False)


def read_task(name: str, path, flag: str | None = None) -> Task:
    """A task from a JSONL file; every line is checked, and the first bad one is named. Errors name the
    flag that gave the file (default --task NAME)."""
    flag = flag or f"--task {name}"
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{flag}: no file {path}")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            messages = chat.parse_conversation(line)
        except ValueError as e:
            raise UserError(f"{where}: {e}") from None
        if messages[-1]["role"] != "assistant":
            raise UserError(f"{where}: the last message must be the assistant's reference answer")
        record = json.loads(line)
        letters = record.get("letters") if isinstance(record, dict) else None
        if letters is not None:
            if not (isinstance(letters, list) and len(letters) > 1 and all(isinstance(x, str) for x in letters)):
                raise UserError(f'{where}: "letters" must list two or more answer letters')
            if messages[-1]["content"] not in letters:
                raise UserError(f"{where}: the answer {messages[-1]['content']!r} is not one of the letters {letters}")
        test, entry_point = (record.get(key) if isinstance(record, dict) else None for key in ("test", "entry_point"))
        if test is not None and not isinstance(test, str):
            raise UserError(f'{where}: "test" must be Python code (a string)')
        if test is not None and not test.strip():
            raise UserError(f'{where}: "test" is empty: every answer would pass it')
        named = isinstance(entry_point, str) and entry_point.isidentifier() and not keyword.iskeyword(entry_point)
        if entry_point is not None and not named:
            raise UserError(f'{where}: "entry_point" must name the function the tests check')
        if entry_point is not None and test is None:
            raise UserError(f'{where}: "entry_point" without a "test" to check it')
        if test is not None and entry_point is None and re.search(r"^def check\(", test, re.MULTILINE):
            raise UserError(f'{where}: the "test" defines check(candidate) but no "entry_point" names the function '
                            "to pass it (HumanEval's items have one)")  # fmt: skip
        if letters is not None and test is not None:
            raise UserError(f'{where}: an item has "letters" (categorical) or a "test" (code), not both')
        items.append({"messages": messages, "letters": letters, "test": test, "entry_point": entry_point})
    if not items:
        raise UserError(f"{flag}: {path} holds no conversations")
    kinds = {item["letters"] is not None for item in items}
    if len(kinds) > 1:
        raise UserError(f"{flag}: {path} mixes categorical items (with letters) and generative ones")
    return Task(name, items, categorical=kinds.pop())


def run_categorical(model, tokenizer, task: Task, batch_size: int, progress: bool = True) -> TaskResult:
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, idx: nnx.merge(graphdef, p)(idx))
    letter_ids = {}
    for item in task.items:
        for letter in item["letters"]:
            ids = tokenizer.encode(letter)
            if len(ids) != 1:
                raise UserError(f"task {task.name}: the answer letter {letter!r} is {len(ids)} tokens in this "
                                "tokenizer, not one: use single-token letters (A, B, C, D)")  # fmt: skip
            letter_ids[letter] = ids[0]
    passed = 0
    # disable=None: no bar when stderr is not a terminal, where every redraw would pile up in the log
    bar = tqdm(total=len(task.items), desc=task.name, disable=None if progress else True, leave=False)
    for start in range(0, len(task.items), batch_size):
        batch = task.items[start : start + batch_size]
        prompts = [tokenizer.render_for_completion(item["messages"]) for item in batch]
        # A full batch of bucketed length however many items are left: one compilation per bucket.
        idx = np.full((batch_size, bucket(max(len(p) for p in prompts))), tokenizer.get_bos_token_id(), np.int32)
        for row, prompt in enumerate(prompts):
            check_room(task, start + row, len(prompt), model.config.sequence_len)
            idx[row, : len(prompt)] = prompt
        logits = np.asarray(forward(params, idx))
        for row, (item, prompt) in enumerate(zip(batch, prompts, strict=True)):
            scores = logits[row, len(prompt) - 1, [letter_ids[x] for x in item["letters"]]]
            passed += item["letters"][int(np.argmax(scores))] == item["messages"][-1]["content"]
        bar.update(len(batch))
    bar.close()
    return TaskResult(task.name, "categorical", passed, len(task.items), task.chance)


def run_generative(engine, task: Task, *, num_samples=1, max_tokens=512, temperature=0.0, top_k=50, seed=0,
                   progress: bool = True) -> TaskResult:  # fmt: skip
    passed = 0
    bar = tqdm(range(len(task.items)), desc=task.name, disable=None if progress else True, leave=False)
    for i in bar:
        answers = sample_answers(engine, task, i, num_samples, max_tokens=max_tokens, temperature=temperature,
                                 top_k=top_k, seed=seed + i)  # fmt: skip
        passed += any(answers.rewards)
        bar.set_postfix(passed=f"{passed}/{i + 1}")
    kind = "code" if all(item.get("test") is not None for item in task.items) else "generative"
    return TaskResult(task.name, kind, passed, len(task.items), task.chance)


@dataclass
class Answers:
    """Sampled answers to one item: sequences (prompt included) and masks as Engine.generate_batch gives
    them, and each one's reward, 1.0 when its final text agrees with the reference."""

    sequences: list[list[int]]
    masks: list[list[int]]
    rewards: list[float]


def sample_answers(engine, task: Task, i: int, num_samples: int, **sampling) -> Answers:
    """num_samples answers to item i, each given at most the room its prompt leaves (and max_tokens)."""
    tokenizer = engine.tokenizer
    item = task.items[i]
    prompt = tokenizer.render_for_completion(item["messages"])
    room = check_room(task, i, len(prompt), engine.max_positions)
    sequences, masks = engine.generate_batch(
        prompt, num_samples, **sampling | {"max_tokens": min(sampling["max_tokens"], room)}
    )
    texts = [answer_text(tokenizer, s[len(prompt) :]) for s in sequences]
    if item.get("test") is not None:  # code: run against the item's tests
        question = final_text(next(m["content"] for m in item["messages"] if m["role"] == "user"))
        rewards = [float(passes_tests(question, text, item["test"], item.get("entry_point"))) for text in texts]
    else:
        reference = final_text(item["messages"][-1]["content"])
        rewards = [float(agrees(text, reference)) for text in texts]
    return Answers(sequences, masks, rewards)


def check_room(task: Task, i: int, prompt_len: int, positions: int) -> int:
    """The room left for an answer; an item that leaves none is named."""
    if prompt_len >= positions:
        raise UserError(f"task {task.name}, item {i + 1}: its prompt ({prompt_len} tokens) fills the model's "
                        f"{positions} positions: leave it out or shorten it")  # fmt: skip
    return positions - prompt_len


def final_text(content) -> str:
    """The reference's last text part: what the answer is compared with (tool calls come before it)."""
    if isinstance(content, str):
        return content
    texts = [part["text"] for part in content if part["type"] == "text"]
    return texts[-1] if texts else ""


def answer_text(tokenizer, ids: list[int]) -> str:
    """A sample's text after its last tool call or output: its final answer."""
    ends = {tokenizer.encode_special(f"<|{name}|>") for name in ("python_end", "output_end")}
    last = max((i for i, t in enumerate(ids) if t in ends), default=-1)
    return tokenizer.decode(ids[last + 1 :])


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def agrees(answer: str, reference: str) -> bool:
    if expected := NUMBER.findall(reference):
        got = NUMBER.findall(answer)
        return bool(got) and _number(got[-1]) == _number(expected[-1])
    return _words(answer) == _words(reference)


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def _words(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".")


CODE_BLOCK = re.compile(r"```(?:python)?[^\n]*\n(.*?)```", re.DOTALL)
CODE_TIMEOUT_S = 10.0


def passes_tests(prompt: str, answer: str, test: str, entry_point: str | None = None, timeout=CODE_TIMEOUT_S) -> bool:
    """Whether an answer's code passes an item's tests, as nanochat scores HumanEval: the imports that open
    the prompt, the answer's first ```python block (else all of it), the tests, then check(entry_point) if
    the item names one. A fresh Python runs it in an empty temporary folder, with 2 GiB of memory, 16 MiB of
    output and `timeout` seconds; it passes when it prints a random token written after the tests. Whatever
    it started is killed when it ends, passed or not. Like nanochat's, this runs the model's code on this
    machine: a guard against accidents, not a sandbox."""
    code = match[1] if (match := CODE_BLOCK.search(answer)) else answer
    done = secrets.token_hex(8)  # an early exit(0) in the answer does not print it
    program = "\n".join([
        "import resource",
        "resource.setrlimit(resource.RLIMIT_AS, (2**31, 2**31))",
        "resource.setrlimit(resource.RLIMIT_FSIZE, (2**24, 2**24))",
        *opening_imports(prompt), "", code, "", test, f"check({entry_point})" if entry_point else "",
        f"print({done!r})",
    ])  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "output"
        with output.open("wb") as out:  # a file, not a pipe: nothing left running can keep us waiting on it
            proc = subprocess.Popen([sys.executable, "-I", "-c", program], cwd=folder, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        finally:  # also on Ctrl-C, which the program's own session does not get
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return proc.returncode == 0 and output.read_bytes()[-64:].decode(errors="replace").rstrip().endswith(done)


def opening_imports(prompt: str) -> list[str]:
    """The import lines a prompt opens with (comments and blank lines aside), as nanochat's extract_imports."""
    imports = []
    for line in map(str.strip, prompt.splitlines()):
        if line.startswith(("import ", "from ")):
            imports.append(line)
        elif line and not line.startswith("#"):
            break
    return imports


def report_lines(step: int, source: str, results: list[TaskResult]) -> list[str]:
    core = chat_core(results)
    lines = [f"## Chat evaluation ({source} model, step {step})", "",
             "| task | kind | passed | accuracy | chance | centered |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        lines.append(f"| {r.task} | {r.kind} | {r.passed}/{r.total} | {100 * r.accuracy:.2f}% | "
                     f"{100 * r.chance:.0f}% | {r.centered:.4f} |")  # fmt: skip
    lines += ["", f"ChatCORE over these {len(results)} task(s): {core:.4f}", ""]
    return lines


def chat_core(results: list[TaskResult]) -> float:
    return float(np.mean([r.centered for r in results]))
