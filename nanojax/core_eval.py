"""Base-model evaluation: CORE (DCLM's in-context tasks, scored as nanochat's core_eval), val bpb, samples.

    tasks = load_bundle(bundle_dir)                          # nanochat's eval_bundle layout, read locally
    core, results = evaluate_core(model, tokenizer, tasks, max_per_task=500)
    bpb, tokens = val_bpb(model, tokenizer, list_shards(base_dir, "val"), eval_tokens=2**20)

A bundle holds `core.yaml` (icl_tasks: label, dataset_uri, icl_task_type, num_fewshot: [k],
continuation_delimiter), `eval_meta_data.csv` (columns "Eval Task" and "Random baseline", in percent)
and `eval_data/<dataset_uri>`, one JSON item per line:

    multiple_choice    {"query", "choices", "gold"}               one context, a continuation per choice
    schema             {"context_options", "continuation", "gold"}  a context per option, one continuation
    language_modeling  {"context", "continuation"}                right iff greedy decoding reproduces it

Items are shuffled with a fixed seed (so --max-per-task takes a fixed subset), and each is preceded by k
few-shot examples drawn from the others. An option's score is its mean loss over the continuation tokens;
the lowest wins. A task's accuracy is centered, (acc - baseline) / (1 - baseline), and CORE is their mean.
"""

import csv
import itertools
import json
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx
from tqdm import tqdm

from nanojax.common import UserError
from nanojax.engine import CalculatorTool, bucket, greedy, prompt_ids
from nanojax.loader import make_val_loader
from nanojax.model import GPT, ROTARY_OVERSIZE, cross_entropy
from nanojax.sharding import make_mesh, replicated
from nanojax.train import PROGRESS_BATCHES, make_evaluator

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED, FEWSHOT_SEED = 1337, 1234  # nanochat's, so the same subsets and shots are drawn
SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]


@dataclass(frozen=True)
class Task:
    label: str
    task_type: str
    num_fewshot: int
    delimiter: str
    random_baseline: float  # a fraction: the accuracy of guessing
    items: list


@dataclass(frozen=True)
class TaskResult:
    label: str
    task_type: str
    num_fewshot: int
    examples: int
    accuracy: float
    centered: float


# --- the bundle -----------------------------------------------------------------------------------


TASK_KEYS = ("label", "dataset_uri", "icl_task_type", "num_fewshot")  # what a core.yaml task must give


def load_bundle(bundle_dir) -> list[Task]:
    """The tasks of a bundle, in core.yaml's order."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise UserError(f"no CORE task bundle at {bundle_dir}: give the folder that holds core.yaml, "
                        "eval_meta_data.csv and eval_data/")  # fmt: skip
    config_path, meta_path = bundle_dir / "core.yaml", bundle_dir / "eval_meta_data.csv"
    for path in (config_path, meta_path):
        if not path.is_file():
            raise UserError(f"no {path.name} in {bundle_dir}: a CORE bundle holds core.yaml, eval_meta_data.csv "
                            "and eval_data/")  # fmt: skip
    with meta_path.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    try:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in rows}
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{meta_path}: every row needs an 'Eval Task' and a number as its 'Random baseline' "
                        "(nanochat's eval_meta_data.csv columns)") from None  # fmt: skip
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{config_path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    specs = config.get("icl_tasks") if isinstance(config, dict) else None
    if not isinstance(specs, list) or not all(isinstance(spec, dict) for spec in specs):
        raise UserError(f"{config_path} must hold `icl_tasks:`, a list of tasks with the keys {', '.join(TASK_KEYS)}")
    for n, spec in enumerate(specs, 1):
        if missing := [key for key in TASK_KEYS if key not in spec]:
            raise UserError(f"{config_path}: task {n} ({spec.get('label', 'no label')}) has no {', '.join(missing)}")
    try:
        return [_read_task(spec, bundle_dir, baselines) for spec in specs]
    except (TypeError, ValueError) as e:  # a value of the wrong kind: JSON errors are ValueErrors
        raise UserError(f"malformed CORE bundle at {bundle_dir}: {type(e).__name__}: {e}") from e


def find_tasks(core_bundle, base_dir, max_per_task: int = -1) -> tuple[list[Task] | None, Path]:
    """The tasks of --core-bundle, else of <base_dir>/eval_bundle when there is one (None when not: CORE is
    skipped), checked against max_per_task before anything long runs; and the bundle's path, to name it."""
    bundle = Path(core_bundle).expanduser() if core_bundle else Path(base_dir) / "eval_bundle"
    if not core_bundle and not bundle.is_dir():
        return None, bundle
    tasks = load_bundle(bundle)
    check_shots(tasks, max_per_task)
    return tasks, bundle


def check_shots(tasks: list[Task], max_per_task: int = -1) -> None:
    """Each task needs more items than its shots (the shots are other items): said before any evaluation."""
    for task in tasks:
        n = min(len(task.items), max_per_task) if max_per_task > 0 else len(task.items)
        if task.num_fewshot >= n:
            raise UserError(f"task {task.label} asks for {task.num_fewshot} shots but has {n} items"
                            f"{' (--max-per-task)' if n < len(task.items) else ''}: it needs at least "
                            f"{task.num_fewshot + 1}; raise --max-per-task")  # fmt: skip


def _read_task(spec: dict, bundle_dir: Path, baselines: dict) -> Task:
    label, task_type = spec["label"], spec["icl_task_type"]
    if task_type not in TASK_TYPES:
        raise UserError(f"CORE task {label} has type {task_type!r}, not one of {TASK_TYPES}")
    if label not in baselines:
        raise UserError(f"{bundle_dir / 'eval_meta_data.csv'} has no random baseline for task {label}")
    data_path = bundle_dir / "eval_data" / spec["dataset_uri"]
    if not data_path.is_file():
        raise UserError(f"CORE task {label}: no data at {data_path}")
    baseline = baselines[label]
    if not 0 <= baseline < 100:
        raise UserError(f"{bundle_dir / 'eval_meta_data.csv'}: task {label}'s random baseline {baseline} is not a "
                        "percentage in [0, 100)")  # fmt: skip
    items = []
    with data_path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                items.append(_read_item(line, task_type, f"{data_path}:{lineno}"))
    if not items:
        raise UserError(f"CORE task {label}: {data_path} holds no items")
    shots = spec["num_fewshot"]  # a list in nanochat's core.yaml, of which the first is used
    shots = shots[0] if isinstance(shots, list) else shots
    delimiter = spec.get("continuation_delimiter", " ")
    return Task(label, task_type, shots, delimiter, 0.01 * baseline, items)


ITEM_FIELDS = {  # per task type: the text fields, and the list of options gold indexes
    "multiple_choice": (("query",), "choices"),
    "schema": (("continuation",), "context_options"),
    "language_modeling": (("context", "continuation"), None),
}


def _read_item(line: str, task_type: str, where: str) -> dict:
    """One item of a task's data, checked: a UserError names the file and line."""
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
    texts, options = ITEM_FIELDS[task_type]
    fields = ", ".join(f'"{k}"' for k in [*texts, *([options, "gold"] if options else [])])
    ok = isinstance(item, dict) and all(isinstance(item.get(k), str) for k in texts)
    if ok and options:
        choices, gold = item.get(options), item.get("gold")
        ok = isinstance(choices, list) and len(choices) > 1 and all(isinstance(c, str) for c in choices)
        ok = ok and isinstance(gold, int) and 0 <= gold < len(choices)
    if not ok:
        kind = f"two or more {options} and a gold index among them" if options else "strings"
        raise UserError(f"{where}: a {task_type} item needs {fields} ({kind})")
    return item


# --- prompts: nanochat's templates, shots separated by a blank line ---------------------------------


def render_mc(item, delimiter: str, fewshot=()) -> list[str]:
    shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
    return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def render_schema(item, delimiter: str, fewshot=()) -> list[str]:
    shots = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    return [f"{shots}{context}{delimiter}{item['continuation']}" for context in item["context_options"]]


def render_lm(item, delimiter: str, fewshot=()) -> list[str]:
    """The prompt without and with the continuation. Contexts are trimmed (some datasets carry trailing
    whitespace), and so is the prompt without: a trailing space would be a token of its own there but
    part of the continuation's first token in the other, so it would not be a prefix."""
    shots = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    prompt = f"{shots}{item['context'].strip()}{delimiter}"
    return [prompt.strip(), prompt + item["continuation"]]


RENDER = {"multiple_choice": render_mc, "schema": render_schema, "language_modeling": render_lm}


def common_length(seqs, from_end: bool = False) -> int:
    """How many leading (or trailing) tokens all sequences share."""
    seqs = [s[::-1] for s in seqs] if from_end else seqs
    n = min(len(s) for s in seqs)
    return next((i for i in range(n) if any(s[i] != seqs[0][i] for s in seqs)), n)


def continuation_spans(task_type: str, tokens: list[list[int]]) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """The sequences to score and each one's continuation as [start, end) token positions."""
    if task_type == "multiple_choice":  # a shared context: the choices start where the sequences part
        start = common_length(tokens)
        return tokens, [(start, len(t)) for t in tokens]
    if task_type == "schema":  # a shared continuation: the common suffix
        n = common_length(tokens, from_end=True)
        return tokens, [(len(t) - n, len(t)) for t in tokens]
    without, with_ = tokens
    if len(without) >= len(with_) or with_[: len(without)] != without:
        raise UserError("a language-modeling prompt does not tokenize to a prefix of itself with its continuation")
    return [with_], [(len(without), len(with_))]


# --- scoring --------------------------------------------------------------------------------------


@partial(jax.jit, static_argnames=("graphdef",))
def _losses_and_predictions(graphdef, params, idx_BT):
    """Loss of predicting idx[:, t+1] at each t (the last column's target wraps around: never read) and
    the argmax prediction at each t."""
    logits_BTV = nnx.merge(graphdef, params)(idx_BT)
    return cross_entropy(logits_BTV, jnp.roll(idx_BT, -1, axis=1), "none"), jnp.argmax(logits_BTV, axis=-1)


class Scorer:
    """Per-position losses and argmax predictions of token sequences, padded (with pad_id, after the
    real tokens, which causality ignores) to power-of-two shapes of at least 64 tokens, so a handful of
    compilations serve a whole bundle. Sequences past the rotary table lose their first tokens, as nanochat crops."""

    def __init__(self, model: GPT, pad_id: int, place=None):
        self.graphdef, self.params = nnx.split(model)
        self.pad_id = pad_id
        self.place = place or (lambda idx: idx)  # a host batch -> where the params are (see evaluate_core)
        self.max_len = model.config.sequence_len * ROTARY_OVERSIZE

    def __call__(self, tokens, spans):
        crops = [max(0, len(t) - self.max_len) for t in tokens]
        if any(start - crop < 1 for (start, _), crop in zip(spans, crops, strict=True)):
            raise UserError(f"a continuation is longer than the model's {self.max_len}-token context")
        tokens = [t[c:] for t, c in zip(tokens, crops, strict=True)]
        spans = [(s - c, e - c) for (s, e), c in zip(spans, crops, strict=True)]
        T = min(bucket(max(map(len, tokens)), smallest=64), self.max_len)
        idx = np.full((bucket(len(tokens), smallest=1), T), self.pad_id, np.int32)
        for i, t in enumerate(tokens):
            idx[i, : len(t)] = t
        outputs = _losses_and_predictions(self.graphdef, self.params, self.place(idx))
        losses, predictions = (np.asarray(a) for a in outputs)
        return idx, losses, predictions, spans


def evaluate_example(scorer: Scorer, tokenizer, task: Task, items: list, i: int) -> tuple[bool, dict]:
    """Whether the model gets items[i] right, and what it chose (for multiple choice and schema, the
    mean continuation loss of each option)."""
    fewshot = []
    if task.num_fewshot > 0:
        others = [j for j in range(len(items)) if j != i]
        fewshot = [items[j] for j in random.Random(FEWSHOT_SEED + i).sample(others, task.num_fewshot)]
    item = items[i]
    prompts = RENDER[task.task_type](item, task.delimiter, fewshot)
    try:
        tokens, spans = continuation_spans(
            task.task_type, tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
        )
    except UserError as e:
        raise UserError(f"task {task.label}, item {item}: {e}") from e
    idx, losses, predictions, spans = scorer(tokens, spans)
    if task.task_type == "language_modeling":
        [(s, e)] = spans
        correct = bool(np.all(predictions[0, s - 1 : e - 1] == idx[0, s:e]))
        return correct, {"correct": correct}
    scores = [float(losses[r, s - 1 : e - 1].mean()) for r, (s, e) in enumerate(spans)]
    pred = int(np.argmin(scores))
    return pred == item["gold"], {"gold": item["gold"], "pred": pred, "scores": scores}


def evaluate_task(scorer: Scorer, tokenizer, task: Task, max_per_task: int = -1) -> TaskResult:
    items = list(task.items)
    random.Random(SHUFFLE_SEED).shuffle(items)  # datasets often come sorted; a fixed seed keeps subsets fixed
    if max_per_task > 0:
        items = items[:max_per_task]
    # A bar in a terminal (disable=None), on process 0 only: a task of 500 items takes a while on a CPU.
    quiet = True if jax.process_index() != 0 else None
    bar = tqdm(range(len(items)), desc=task.label, unit="item", leave=False, disable=quiet)
    correct = sum(evaluate_example(scorer, tokenizer, task, items, i)[0] for i in bar)
    accuracy = correct / max(len(items), 1)
    centered = (accuracy - task.random_baseline) / (1.0 - task.random_baseline)
    return TaskResult(task.label, task.task_type, task.num_fewshot, len(items), accuracy, centered)


def evaluate_core(model: GPT, tokenizer, tasks: list[Task], max_per_task: int = -1, log=print, place=None):
    """(CORE, one TaskResult per task): CORE is the mean centered accuracy. place(host batch), if given, puts
    each batch where the model's params are: in a multi-process run, a global array that every process
    builds from the same batch (they all score every item)."""
    check_shots(tasks, max_per_task)
    scorer = Scorer(model, tokenizer.get_bos_token_id(), place)
    results = []
    for task in tasks:
        results.append(evaluate_task(scorer, tokenizer, task, max_per_task))
        r = results[-1]
        log(f"{r.label} ({r.num_fewshot}-shot, {r.task_type}): accuracy {r.accuracy:.4f} | centered {r.centered:.4f}")
    return sum(r.centered for r in results) / max(len(results), 1), results


# --- bits per byte and samples --------------------------------------------------------------------


def val_bpb(
    model: GPT, tokenizer, shards, eval_tokens: int, device_batch_size: int = 32, crop_long_docs: bool = False
) -> tuple[float, int]:
    """Bits per byte over the first batches of the validation split, as training evaluates it (the same
    batches for the same eval_tokens, device_batch_size and crop_long_docs); returns it and the tokens
    evaluated, fewer than eval_tokens when one pass over the split holds fewer."""
    mesh = make_mesh()
    graphdef, params = nnx.split(model)
    params = jax.device_put(params, replicated(mesh))
    T = model.config.sequence_len
    num_batches = max(1, eval_tokens // (device_batch_size * T * mesh.size))
    batches = make_val_loader(shards, tokenizer, device_batch_size * jax.local_device_count(), T,
                              process_index=jax.process_index(), process_count=jax.process_count(),
                              crop_long_docs=crop_long_docs)  # fmt: skip
    batches = list(itertools.islice(batches, num_batches))
    return make_evaluator(graphdef, mesh, tokenizer.token_bytes)(params, batches, len(batches) >= PROGRESS_BATCHES)


def greedy_samples(model: GPT, tokenizer, prompts, max_tokens: int = 16, chat: bool = False) -> list[str]:
    """Greedy continuations of the prompts (for a chat model: answers to them as messages, its calculator
    calls answered), up to a stop token: all prompts in one batch at one length, so one compilation
    serves them all."""
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, idx: nnx.merge(graphdef, p)(idx))
    ids = [prompt_ids(tokenizer, prompt, chat) for prompt in prompts]
    stops = (tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>"))
    tool = CalculatorTool(tokenizer) if chat else None
    out, _ = greedy(lambda idx: forward(params, idx), ids, max_tokens, stop_tokens=stops, tool=tool)
    sep = " -> " if chat else ""  # a base model continues the prompt; a chat model answers it
    return [prompt + sep + tokenizer.decode(tokens) for prompt, tokens in zip(prompts, out, strict=True)]


def report_lines(step: int, bpb, core, results, samples, notes=(), source: str = "base") -> list[str]:
    """A markdown section: the summary, the per-task table, the samples."""
    kind = "Base" if source == "base" else "Chat"
    lines = [f"## {kind} model evaluation, step {step}", "", "| | |", "|---|---|"]
    if bpb is not None:
        lines.append(f"| val bpb | {bpb[0]:.4f} ({bpb[1]:,} tokens) |")
    if core is not None:
        lines.append(f"| CORE | {core:.4f} ({len(results)} tasks) |")
    lines += [f"| note | {note} |" for note in notes]
    if results:
        lines += ["", "| task | type | shots | examples | accuracy | centered |", "|---|---|---|---|---|---|"]
        lines += [f"| {r.label} | {r.task_type} | {r.num_fewshot} | {r.examples} | {r.accuracy:.4f} | "
                  f"{r.centered:.4f} |" for r in results]  # fmt: skip
    lines += ["", "Samples (greedy):", "", *[f"    {s!r}" for s in samples], ""]
    return lines
