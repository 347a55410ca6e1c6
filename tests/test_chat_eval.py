"""chat_eval: task files, answer checking, categorical scoring by letter logits (padding included),
generative scoring by sampled answers, and scripts.chat_eval on a checkpoint trained here.

Run: python -m pytest -q tests/test_chat_eval.py
"""

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_RUN
from flax import nnx

from nanojax import chat_eval
from nanojax.common import UserError
from nanojax.engine import Engine
from nanojax.model import GPT, GPTConfig
from nanojax.pretrain import pretrain
from nanojax.tokenizer import get_tokenizer
from scripts import chat_eval as chat_eval_script
from scripts import pretrain as pretrain_script

LETTERS = ["A", "B", "C", "D"]


@pytest.fixture(scope="module")
def tok(tiny_base):
    return get_tokenizer(tiny_base)


@pytest.fixture(scope="module")
def model(tok):
    config = GPTConfig(sequence_len=64, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    return GPT(config, rngs=nnx.Rngs(0))


def question(text, answer):
    return [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize(
    "answer,reference,ok",
    [("The answer is 1,234.", "The answer is 1234.", True), ("It is 42. Or 41.", "#### 41", True),
     ("The answer is 42.", "The answer is -42.", False), ("no number", "The answer is 3.", False),
     ("Apple is  spelled a-p-p-l-e", "apple is spelled a-p-p-l-e.", True), ("a-p-l-e", "a-p-p-l-e", False)],
)  # fmt: skip
def test_an_answer_agrees_by_its_last_number_else_its_text(answer, reference, ok):
    assert chat_eval.agrees(answer, reference) is ok


def test_the_final_text_is_after_the_last_tool_call(tok):
    s = tok.encode_special
    ids = [s("<|python_start|>"), *tok.encode("2+2"), s("<|python_end|>"), s("<|output_start|>"), *tok.encode("4"),
           s("<|output_end|>"), *tok.encode("The answer is 4.")]  # fmt: skip
    assert chat_eval.answer_text(tok, ids) == "The answer is 4."
    parts = [{"type": "python", "text": "2+2"}, {"type": "python_output", "text": "4"},
             {"type": "text", "text": "The answer is 4."}]  # fmt: skip
    assert chat_eval.final_text(parts) == "The answer is 4." and chat_eval.final_text("plain") == "plain"


def test_task_files_are_checked_line_by_line(tmp_path):
    good = {"messages": question("Pick one", "B"), "letters": LETTERS}
    task = chat_eval.read_task("mc", write_jsonl(tmp_path / "mc.jsonl", [good, good]))
    assert task.categorical and len(task.items) == 2 and task.chance == 0.25
    cases = [
        ([good, {"messages": question("x", "E"), "letters": LETTERS}], r"mc.jsonl:2: the answer 'E' is not one of"),
        ([good, {"messages": question("x", "y")}], "mixes categorical items .* and generative ones"),
        ([{"messages": question("x", "A"), "letters": ["A"]}], 'mc.jsonl:1: "letters" must list two or more'),
        ([{"messages": [{"role": "user", "content": "x"}]}], "mc.jsonl:1: no assistant message"),
        ([{"messages": [*question("x", "y"), {"role": "user", "content": "z"}]}], "mc.jsonl:1: the last message"),
        ([{"messages": question("x", "y"), "test": ["assert 1"]}], 'mc.jsonl:1: "test" must be Python code'),
        ([{"messages": question("x", "y"), "test": "pass", "entry_point": "f()"}], '"entry_point" must name the'),
        ([{"messages": question("x", "y"), "test": "pass", "entry_point": "import"}], '"entry_point" must name the'),
        ([{"messages": question("x", "y"), "test": " \n"}], 'mc.jsonl:1: "test" is empty: every answer would pass'),
        (
            [{"messages": question("x", "y"), "test": "def check(candidate):\n    pass"}],
            'defines check.* no "entry_point"',
        ),
        ([{"messages": question("x", "y"), "entry_point": "f"}], 'mc.jsonl:1: "entry_point" without a "test"'),
        ([{**good, "test": "assert 1"}], 'mc.jsonl:1: an item has "letters" .* or a "test" .*, not both'),
    ]
    for records, match in cases:
        with pytest.raises(UserError, match=match):
            chat_eval.read_task("mc", write_jsonl(tmp_path / "mc.jsonl", records))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match="bad.jsonl:1: not JSON"):
        chat_eval.read_task("mc", tmp_path / "bad.jsonl")
    with pytest.raises(UserError, match="--task mc: no file"):
        chat_eval.read_task("mc", tmp_path / "missing.jsonl")


HUMANEVAL_LIKE = {  # the shape of nanochat's HumanEval items: a prompt to complete, check(candidate) tests
    "prompt": 'from math import sqrt\n\n\ndef hypot(a, b):\n    """The hypotenuse."""\n',
    "test": "def check(candidate):\n    assert candidate(3, 4) == 5\n    assert candidate(5, 12) == 13\n",
    "entry_point": "hypot",
}


@pytest.mark.parametrize(
    "answer, ok",
    [
        ("def hypot(a, b):\n    return sqrt(a * a + b * b)", True),  # the prompt's import comes along
        ("Here it is:\n```python\ndef hypot(a, b):\n    return (a * a + b * b) ** 0.5\n```\nDone.", True),
        ("def hypot(a, b):\n    return a + b", False),
        ("def hypot(a, b):\n    return sqrt(a * a + b * b", False),  # a syntax error
        ("import os\nos._exit(0)", False),  # leaving early, with success, is not passing
        ("while True:\n    pass", False),  # stopped at the time limit
        ("x = bytearray(2**32)", False),  # past the memory limit
    ],
)
def test_code_answers_pass_when_their_program_passes_the_tests(answer, ok):
    item = HUMANEVAL_LIKE
    assert chat_eval.passes_tests(item["prompt"], answer, item["test"], item["entry_point"], timeout=3) is ok


def test_only_the_imports_a_prompt_opens_with_are_kept():
    prompt = "from math import sqrt\n# a comment\n\nimport os\nComplete this.\nfrom a list, the largest:\nimport re"
    assert chat_eval.opening_imports(prompt) == ["from math import sqrt", "import os"]  # nanochat's extract_imports


def gone(pid: int) -> bool:
    """No such process, or a zombie left for an init that does not reap (as in some containers), within the
    few seconds a SIGKILL may take to land on a loaded machine."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_what_code_answers_start_neither_outlives_nor_holds_up_the_scoring(tmp_path):
    pid_file = tmp_path / "pid"
    spawn = (
        f"import subprocess\np = subprocess.Popen(['sleep', '60'])\nopen({str(pid_file)!r}, 'w').write(str(p.pid))\n"
    )
    assert chat_eval.passes_tests("", spawn + "def f():\n    return 1", "assert f() == 1", timeout=5)
    assert gone(int(pid_file.read_text()))  # a passing answer's leftovers are killed too
    detached = "import subprocess\nsubprocess.Popen(['sleep', '60'], start_new_session=True)\nwhile True:\n    pass"
    flood = "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)"
    for answer in (detached, flood):  # one keeps stdout open past the time limit, one fills it
        start = time.monotonic()
        assert not chat_eval.passes_tests("", answer, "", timeout=2)
        assert time.monotonic() - start < 20  # not the 60 s of the sleep


def test_ctrl_c_while_code_runs_kills_it(tmp_path):
    pid_file = tmp_path / "pid"
    answer = f"import os\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\nwhile True:\n    pass"
    runner = f"from nanojax.chat_eval import passes_tests\npasses_tests('', {answer!r}, '', timeout=60)"
    proc = subprocess.Popen([sys.executable, "-c", runner], cwd=Path(__file__).parents[1], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    assert b"KeyboardInterrupt" in proc.communicate(timeout=30)[1]
    assert gone(int(pid_file.read_text()))


def test_code_items_are_scored_by_running_the_samples(tok, tmp_path):
    """Through sample_answers (as chat_eval and chat_rl call it), on answers given by a stand-in engine."""
    reference = "def hypot(a, b):\n    return sqrt(a * a + b * b)"
    record = {"messages": question(HUMANEVAL_LIKE["prompt"], reference), "test": HUMANEVAL_LIKE["test"],
              "entry_point": "hypot"}  # fmt: skip
    task = chat_eval.read_task("code", write_jsonl(tmp_path / "code.jsonl", [record]))

    class Said:  # answers the reference, then a wrong function
        tokenizer, max_positions = tok, 10_000

        def generate_batch(self, prompt, num_samples, **sampling):
            said = [reference, "def hypot(a, b):\n    return 0"]
            return [prompt + tok.encode(text) for text in said], [[0] * len(prompt) + [1] * 9] * num_samples

    answers = chat_eval.sample_answers(Said(), task, 0, 2, max_tokens=64, temperature=0.0, top_k=50, seed=0)
    assert not task.categorical and answers.rewards == [1.0, 0.0]
    result = chat_eval.run_generative(Said(), task, num_samples=2, max_tokens=64, progress=False)
    assert (result.kind, result.passed, result.total) == ("code", 1, 1)  # one sample of two passing is a pass


def test_categorical_items_are_scored_by_the_letter_logits_at_the_answer(tok, model):
    """Prompts of different lengths share a padded batch: each is read at its own last position."""
    texts = ["Pick one", "alpha beta gamma delta, which one?", "x", "a longer question " * 3, "the last"]
    favourite = []
    for text in texts:  # the model's own choice, from a forward of the prompt alone
        prompt = tok.render_for_completion(question(text, "A"))
        logits = np.asarray(model(np.array([prompt])))[0, -1]
        favourite.append(LETTERS[int(np.argmax([logits[tok.encode(x)[0]] for x in LETTERS]))])
    items = [{"messages": question(t, f), "letters": LETTERS} for t, f in zip(texts, favourite, strict=True)]
    result = chat_eval.run_categorical(model, tok, chat_eval.Task("mc", items, True), batch_size=2, progress=False)
    assert (result.passed, result.total, result.centered) == (5, 5, 1.0)
    for item, f in zip(items, favourite, strict=True):
        item["messages"][-1]["content"] = LETTERS[(LETTERS.index(f) + 1) % 4]
    result = chat_eval.run_categorical(model, tok, chat_eval.Task("mc", items, True), batch_size=4, progress=False)
    assert result.passed == 0 and result.centered == pytest.approx(-1 / 3)


def test_generative_items_pass_when_a_sample_agrees(tok, model):
    engine = Engine(model, tok)
    texts = ["alpha", "beta gamma", "delta"]
    answers = []
    for text in texts:  # the model's greedy answer, as the reference
        prompt = tok.render_for_completion(question(text, ""))
        samples, _ = engine.generate_batch(prompt, 1, max_tokens=6, temperature=0.0)
        answers.append(tok.decode(samples[0][len(prompt) :]))
    items = [{"messages": question(t, a)} for t, a in zip(texts, answers, strict=True)]
    items.append({"messages": question("epsilon", "zeta eta theta iota")})  # not what it says
    task = chat_eval.Task("gen", items, False)
    result = chat_eval.run_generative(engine, task, max_tokens=6, temperature=0.0, progress=False)
    assert (result.passed, result.total, result.chance) == (3, 4, 0.0)


def test_the_script_scores_builtin_and_file_tasks_and_appends_the_report(tiny_base, tmp_path, capsys):
    for name in ("base_data", "tokenizer"):
        shutil.copytree(tiny_base / name, tmp_path / name)
    args = pretrain_script.parse_args([*TINY_RUN, "--num-iterations=1", f"--base-dir={tmp_path}"])
    pretrain(args, tmp_path, ["a"])
    mc = write_jsonl(
        tmp_path / "mc.jsonl", [{"messages": question(f"q{i}", "C"), "letters": LETTERS} for i in range(3)]
    )
    chat_eval_script.main(["--source=base", f"--base-dir={tmp_path}", f"--task=MC={mc}", "-a", "MC|Spelling",
                           "-x", "2", "-m", "4"])  # fmt: skip
    out = capsys.readouterr().out
    assert re.search(r"\| MC \| categorical \| [0-2]/2 \| .* \| 25% \|", out)  # -x 2: two of its three
    assert re.search(r"\| Spelling \| generative \| [0-2]/2 \|", out) and "ChatCORE over these 2 task(s): " in out
    report = (tmp_path / "base_checkpoints" / "d2" / "report.md").read_text()
    assert "## Chat evaluation (base model, step 1)" in report


@pytest.mark.parametrize(
    "argv,message",
    [(["-a", "GSM8K"], "no task 'GSM8K': the built-in ones are Arithmetic, SpellingBee, Spelling; give yours with "
      "--task GSM8K=FILE"),
     (["--task", "Spelling=x.jsonl"], "--task Spelling: a built-in task has that name"),
     (["--task", "A=x", "--task", "A=y"], "--task: each task name may be given once")],
)  # fmt: skip
def test_task_names_are_checked_before_anything_loads(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        chat_eval_script.main([f"--base-dir={tmp_path}", *argv])
    assert message in capsys.readouterr().err
