"""CORE scoring, val bpb and scripts.base_eval on a tiny checkpoint trained here, with the hand-written
bundle in tests/data/core_bundle.

Run: python -m pytest -q tests/test_base_eval.py
"""

import dataclasses
import random
import re
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_RUN
from flax import nnx

from nanojax import core_eval, dataset
from nanojax.common import UserError
from nanojax.core_eval import Scorer, Task, continuation_spans, evaluate_example, render_lm, render_mc, render_schema
from nanojax.engine import load_model
from nanojax.pretrain import pretrain
from nanojax.tokenizer import get_tokenizer
from scripts import base_eval
from scripts import pretrain as pretrain_script

BUNDLE = Path(__file__).parent / "data" / "core_bundle"


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    """A copy of tiny_base with a 3-step checkpoint (tag tiny) whose final val bpb used 512 tokens, and whose
    run evaluated CORE on 3 examples a task at steps 2 and 3."""
    base = tmp_path_factory.mktemp("eval_base")
    for name in ("base_data", "tokenizer"):
        shutil.copytree(tiny_base / name, base / name)
    core = [f"--core-bundle={BUNDLE}", "--core-metric-every=2", "--core-metric-max-per-task=3"]
    args = pretrain_script.parse_args(
        [*TINY_RUN, *core, "--num-iterations=3", "--model-tag=tiny", f"--base-dir={base}"]
    )
    pretrain(args, base, ["alpha"])
    return base


@pytest.fixture(scope="module")
def loaded(trained):
    model, meta = load_model(trained / "base_checkpoints" / "tiny")
    return model, meta, get_tokenizer(trained)


def test_prompts_render_as_nanochat():
    mc = [
        {"query": "Q: 1+1?", "choices": ["2", "3"], "gold": 0},
        {"query": "Q: 2+2?", "choices": ["4", "5"], "gold": 0},
    ]
    assert render_mc(mc[1], "\nA: ", [mc[0]]) == ["Q: 1+1?\nA: 2\n\nQ: 2+2?\nA: 4", "Q: 1+1?\nA: 2\n\nQ: 2+2?\nA: 5"]
    schema = [{"context_options": ["a", "b"], "continuation": "x.", "gold": 1},
              {"context_options": ["c", "d"], "continuation": "y.", "gold": 0}]  # fmt: skip
    assert render_schema(schema[1], " ", [schema[0]]) == ["b x.\n\nc y.", "b x.\n\nd y."]
    lm = [{"context": " one two ", "continuation": "three"}, {"context": "four five\n", "continuation": "six"}]
    assert render_lm(lm[1], " ", [lm[0]]) == ["one two three\n\nfour five", "one two three\n\nfour five six"]
    assert render_mc(mc[0], " ") == ["Q: 1+1? 2", "Q: 1+1? 3"]  # zero-shot: no separator


def test_continuation_spans():
    assert continuation_spans("multiple_choice", [[9, 1, 2, 3], [9, 1, 4], [9, 1, 2, 5, 6]])[1] == [
        (2, 4),
        (2, 3),
        (2, 5),
    ]
    assert continuation_spans("schema", [[9, 1, 7, 8], [9, 2, 3, 7, 8]])[1] == [(2, 4), (3, 5)]
    assert continuation_spans("language_modeling", [[9, 1], [9, 1, 2, 3]]) == ([[9, 1, 2, 3]], [(2, 4)])
    with pytest.raises(UserError, match="prefix"):
        continuation_spans("language_modeling", [[9, 1], [9, 2, 3]])


@nnx.jit
def forward(model, idx_BT):
    return model(idx_BT)


def reference_logits(model, seqs, length=256):
    """Logits of each sequence padded with token 0 to one fixed length: independent of the scorer's
    bucketed shapes and pad token (causality makes padding irrelevant to the positions read)."""
    idx = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        idx[i, : len(s)] = s
    return np.asarray(forward(model, jnp.asarray(idx)))


def reference_losses(model, seqs):
    """Loss of predicting seq[t+1] at each t < len(seq) - 1."""
    logits = reference_logits(model, seqs)
    logz = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    return [logz[i, : len(s) - 1] - logits[i, np.arange(len(s) - 1), s[1:]] for i, s in enumerate(seqs)]


@pytest.mark.parametrize("label", ["tiny_arc", "tiny_winograd"])
def test_option_scores_are_mean_continuation_losses(loaded, label):
    model, _, tok = loaded
    task = next(t for t in core_eval.load_bundle(BUNDLE) if t.label == label)
    scorer = Scorer(model, tok.get_bos_token_id())
    for i in range(len(task.items)):
        correct, info = evaluate_example(scorer, tok, task, task.items, i)
        others = [j for j in range(len(task.items)) if j != i]
        shots = [task.items[j] for j in random.Random(1234 + i).sample(others, task.num_fewshot)]
        prompts = core_eval.RENDER[task.task_type](task.items[i], task.delimiter, shots)
        tokens = tok.encode(prompts, prepend=tok.get_bos_token_id())
        _, spans = continuation_spans(task.task_type, tokens)
        losses = reference_losses(model, tokens)
        expected = [loss[s - 1 : e - 1].mean() for loss, (s, e) in zip(losses, spans, strict=True)]
        np.testing.assert_allclose(info["scores"], expected, atol=1e-5)
        assert info["pred"] == int(np.argmin(expected)) and correct == (info["pred"] == task.items[i]["gold"])


def test_language_modeling_is_right_iff_greedy(loaded):
    model, _, tok = loaded
    scorer = Scorer(model, tok.get_bos_token_id())
    found = 0
    for context in ["alpha beta", "def x", "return (", "gamma = delta +"]:
        ids = tok.encode(context, prepend=tok.get_bos_token_id())
        logits = reference_logits(model, [ids])[0, len(ids) - 1]
        best, worst = int(logits.argmax()), int(logits.argmin())
        good, bad = tok.decode([best]), tok.decode([worst])
        if tok.encode(context + good) != [*ids[1:], best] or tok.encode(context + bad) != [*ids[1:], worst]:
            continue  # the tokens would merge with the context: not a clean test case
        found += 1
        task = Task("t", "language_modeling", 0, "", 0.0, [])
        assert evaluate_example(scorer, tok, task, [{"context": context, "continuation": good}], 0)[0]
        assert not evaluate_example(scorer, tok, task, [{"context": context, "continuation": bad}], 0)[0]
    assert found


def test_core_is_the_mean_centered_accuracy(loaded):
    model, _, tok = loaded
    tasks = core_eval.load_bundle(BUNDLE)
    core, results = core_eval.evaluate_core(model, tok, tasks, max_per_task=3, log=lambda *a: None)
    assert [r.label for r in results] == ["tiny_arc", "tiny_winograd", "tiny_lambada"]
    for r, t in zip(results, tasks, strict=True):
        assert r.examples == 3 and r.accuracy in (0, 1 / 3, 2 / 3, 1)
        assert r.centered == pytest.approx((r.accuracy - t.random_baseline) / (1 - t.random_baseline))
    assert core == pytest.approx(np.mean([r.centered for r in results]))
    assert [t.random_baseline for t in tasks] == [0.25, 0.5, 0.0] and tasks[0].delimiter == "\nAnswer: "


def test_pretraining_evaluates_core_as_base_eval_does(trained, loaded):
    model, meta, tok = loaded
    history = meta["loop_state"]["history"]["core_metric"]  # on 8 devices, during the run
    assert [step for step, _ in history] == [2, 3]
    core, _ = core_eval.evaluate_core(model, tok, core_eval.load_bundle(BUNDLE), max_per_task=3, log=lambda *a: None)
    assert history[-1][1] == pytest.approx(core)  # the saved step-3 model, on one device
    report = (trained / "base_checkpoints" / "tiny" / "report.md").read_text()
    assert f"| CORE metric | {history[0][1]:.4f} (step 2), {core:.4f} (step 3) |" in report


def test_val_bpb_equals_trainings(trained, loaded):
    model, meta, tok = loaded
    shards = dataset.list_shards(trained, "val")
    bpb, tokens = core_eval.val_bpb(model, tok, shards, 512, device_batch_size=1)
    assert tokens == 512 and bpb == pytest.approx(meta["val_bpb"], abs=1e-6)
    # The whole split, once, whatever the batch size: the last batch is padded, not filled by a replay.
    (bpb_1, tokens_1), (bpb_4, tokens_4) = (core_eval.val_bpb(model, tok, shards, 10**9, b) for b in (1, 4))
    assert tokens_1 == tokens_4 and tokens_1 % 32 == 0 and bpb_1 == pytest.approx(bpb_4, rel=1e-6)


def test_base_eval_script(trained, loaded, capsys):
    _, meta, _ = loaded
    report = trained / "base_checkpoints" / "tiny" / "report.md"
    training_report = report.read_text()
    flags = [f"--base-dir={trained}", "--model-tag=tiny", "--eval-tokens=512", "--device-batch-size=1"]
    base_eval.main([*flags, f"--core-bundle={BUNDLE}", "--max-per-task=3"])
    out = capsys.readouterr().out
    assert f"| val bpb | {meta['val_bpb']:.4f} (512 tokens) |" in out and "| CORE |" in out
    assert all(f"| {label} |" in out for label in ("tiny_arc", "tiny_winograd", "tiny_lambada"))
    assert "'The capital of France is" in out
    assert report.read_text().startswith(training_report + "\n## Base model evaluation, step 3\n")

    base_eval.main([*flags, "--eval-tokens=0"])  # no bundle in the base dir: CORE is skipped, with a note
    out = capsys.readouterr().out
    assert "CORE skipped: no task bundle" in out and "val bpb" not in out
    assert report.read_text().count("## Base model evaluation") == 2


def test_bad_bundles(tmp_path, loaded, capsys):
    model, _, tok = loaded
    shutil.copytree(BUNDLE, tmp_path / "b")
    (tmp_path / "b" / "eval_meta_data.csv").write_text("Eval Task,Random baseline\ntiny_arc,25\n")
    with pytest.raises(UserError, match="no random baseline for task tiny_winograd"):
        core_eval.load_bundle(tmp_path / "b")
    with pytest.raises(UserError, match="no core.yaml"):
        core_eval.load_bundle(tmp_path)
    with pytest.raises(UserError, match=f"no CORE task bundle at {tmp_path / 'missing'}: give the folder that holds"):
        core_eval.load_bundle(tmp_path / "missing")
    task = dataclasses.replace(core_eval.load_bundle(BUNDLE)[0], num_fewshot=5)
    with pytest.raises(UserError, match="asks for 5 shots but has 5 items: it needs at least 6"):
        core_eval.evaluate_core(model, tok, [task])
    with pytest.raises(SystemExit):
        base_eval.main([f"--base-dir={tmp_path}"])
    assert "no checkpoints in" in capsys.readouterr().err


def test_too_few_items_for_the_shots_are_refused_before_the_bpb_pass(trained, monkeypatch, capsys):
    monkeypatch.setattr(core_eval, "val_bpb", None)  # never reached
    with pytest.raises(SystemExit):
        base_eval.main([f"--base-dir={trained}", "--model-tag=tiny", f"--core-bundle={BUNDLE}", "--max-per-task=2"])
    assert "task tiny_arc asks for 2 shots but has 2 items (--max-per-task): it needs at least 3" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "config,message",
    [("icl_tasks: [", "core.yaml is not valid YAML at line 1, column 13: expected the node content"),
     ("- label: tiny_arc", "core.yaml must hold `icl_tasks:`, a list of tasks with the keys label, dataset_uri"),
     ("icl_tasks:\n- label: tiny_arc\n  dataset_uri: tiny_arc.jsonl\n  num_fewshot: [0]",
      "core.yaml: task 1 (tiny_arc) has no icl_task_type")],
)  # fmt: skip
def test_a_malformed_core_yaml_is_named_in_one_line(tmp_path, config, message):
    shutil.copytree(BUNDLE, tmp_path / "b")
    (tmp_path / "b" / "core.yaml").write_text(config)
    with pytest.raises(UserError, match=re.escape(message)) as e:
        core_eval.load_bundle(tmp_path / "b")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "task,line,message",
    [("tiny_arc", '{"question": "q", "choices": ["a", "b"], "gold": 0}', 'needs "query", "choices", "gold"'),
     ("tiny_arc", '{"query": "q", "choices": ["a", "b"], "gold": 7}', "gold index among them"),
     ("tiny_winograd", '{"context_options": ["a", "b"], "gold": 0', "not JSON"),
     ("tiny_lambada", '{"context": "a"}', 'needs "context", "continuation"')],
)  # fmt: skip
def test_a_bad_item_names_its_file_and_line(tmp_path, task, line, message):
    shutil.copytree(BUNDLE, tmp_path / "b")
    data = tmp_path / "b" / "eval_data" / f"{task}.jsonl"
    lines = data.read_text().splitlines()
    data.write_text("\n".join([*lines[:2], line, *lines[2:]]) + "\n")
    with pytest.raises(UserError, match=f"{re.escape(str(data))}:3: .*{re.escape(message)}"):
        core_eval.load_bundle(tmp_path / "b")


def test_an_empty_task_or_an_impossible_baseline_is_refused(tmp_path):
    shutil.copytree(BUNDLE, tmp_path / "b")
    meta = tmp_path / "b" / "eval_meta_data.csv"
    meta.write_text(meta.read_text().replace("tiny_winograd,language understanding,schema,1,50",
                                             "tiny_winograd,language understanding,schema,1,100"))  # fmt: skip
    with pytest.raises(UserError, match="tiny_winograd's random baseline 100.0 is not a percentage"):
        core_eval.load_bundle(tmp_path / "b")
    shutil.copy(BUNDLE / "eval_meta_data.csv", meta)
    (tmp_path / "b" / "eval_data" / "tiny_lambada.jsonl").write_text("\n")
    with pytest.raises(UserError, match="CORE task tiny_lambada: .* holds no items"):
        core_eval.load_bundle(tmp_path / "b")
