"""Conversations: reading JSONL, SFT rows and their loss masks (SPEC 5), packing, loader state, the
generated set, the chat session.

Run: python -m pytest -q tests/test_chat.py
"""

import json

import numpy as np
import pytest
from flax import nnx

from nanojax import chat
from nanojax.common import UserError
from nanojax.engine import Engine, calculate
from nanojax.model import GPT, GPTConfig
from nanojax.tokenizer import get_tokenizer
from scripts import chat_cli, chat_sft, make_conversations, sample


@pytest.fixture(scope="module")
def tok(tiny_base):
    return get_tokenizer(tiny_base)


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def specials(tok, *names):
    return [tok.encode_special(f"<|{n}|>") for n in names]


def test_rows_train_on_assistant_tokens_only(tok, tmp_path):
    """Text, tool call, tool output and a leading system message, through file, loader and targets."""
    bos, us, ue, as_, ae, ps, pe, os_, oe = specials(
        tok, "bos", "user_start", "user_end", "assistant_start", "assistant_end", "python_start", "python_end",
        "output_start", "output_end",
    )  # fmt: skip
    parts = [{"type": "text", "text": "Let me see."}, {"type": "python", "text": "12+30"},
             {"type": "python_output", "text": "42"}, {"type": "text", "text": "It is 42."}]  # fmt: skip
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "12+30?"},
                {"role": "assistant", "content": parts}, {"role": "user", "content": "thanks"},
                {"role": "assistant", "content": "You are welcome."}]  # fmt: skip
    enc = tok.encode
    segments = [  # (tokens, trained?) as SPEC 5 lays them out
        ([bos, us, *enc("Be brief.\n\n12+30?"), ue, as_], 0),
        (enc("Let me see."), 1),
        ([ps, *enc("12+30"), pe], 1),
        ([os_, *enc("42"), oe], 0),
        ([*enc("It is 42."), ae], 1),
        ([us, *enc("thanks"), ue, as_], 0),
        ([*enc("You are welcome."), ae], 1),
    ]
    ids = np.array([t for tokens, _ in segments for t in tokens])
    mask = np.array([m for tokens, m in segments for _ in tokens], bool)

    convs = chat.read_conversations([write_lines(tmp_path / "c.jsonl", [{"messages": messages}])], tok, 128)
    inputs, targets = next(chat.SFTLoader(convs, rows=1, seq_len=127))
    n = len(ids)
    np.testing.assert_array_equal(inputs[0, :n], ids)
    np.testing.assert_array_equal(targets[0, : n - 1], np.where(mask[1:], ids[1:], -1))
    assert (inputs[0, n:] == bos).all() and (targets[0, n - 1 :] == -1).all()  # padding: no loss


def test_packing_keeps_conversations_whole(tok, tmp_path):
    convs = chat.read_conversations([write_lines(tmp_path / "g.jsonl", chat.generate_conversations(60))], tok, 257)
    lengths = [len(t) for t in convs.tokens]
    packer = chat._Packer(convs, 257, iter(range(len(convs))), buffer_size=8)
    rows = list(iter(packer.row, []))
    assert sorted(c for row in rows for c in row) == list(range(len(convs)))  # each one once, none split
    assert all(sum(lengths[c] for c in row) <= 257 for row in rows)
    assert sum(lengths) / 257 <= len(rows) == chat.rows_per_epoch(convs, 256, buffer_size=8) < len(convs)
    inputs, targets = chat.make_batch(convs, rows[:3], 257)
    for r, row in enumerate(rows[:3]):
        expected = np.concatenate([convs.tokens[c] for c in row])
        np.testing.assert_array_equal(inputs[r, : len(expected)], expected[:256])
        assert (inputs[r, len(expected) :] == tok.get_bos_token_id()).all()


def test_long_conversations_are_truncated_with_a_warning(tok, tmp_path):
    long = [{"role": "user", "content": "alpha " * 5}, {"role": "assistant", "content": "beta " * 50}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    logged = []
    path = write_lines(tmp_path / "long.jsonl", [short, long])
    convs = chat.read_conversations([path], tok, 33, log=logged.append)
    assert [len(t) for t in convs.tokens] == [len(tok.render_conversation(short)[0]), 33]
    assert any("truncated" in line for line in logged) and any(f"{path}:2:" in line for line in logged)


def test_conversations_without_an_assistant_token_in_a_row_are_left_out(tok, tmp_path):
    """A user turn that fills the row would train on nothing: left out, and refused if none is left."""
    long_user = [{"role": "user", "content": "alpha " * 50}, {"role": "assistant", "content": "ok"}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    logged = []
    convs = chat.read_conversations([write_lines(tmp_path / "a.jsonl", [long_user, short])], tok, 33, log=logged.append)
    assert convs.sources == [f"{tmp_path / 'a.jsonl'}:2"]
    assert any("left out 1" in line and "no assistant token" in line for line in logged)
    with pytest.raises(UserError, match="no conversation .* has an assistant token .* raise --max-seq-len"):
        chat.read_conversations([write_lines(tmp_path / "b.jsonl", [long_user] * 3)], tok, 33, log=logged.append)


def test_a_byte_order_mark_is_read_and_messages_are_numbered_as_in_the_file(tok, tmp_path):
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(good).encode() + b"\r\n")
    assert len(chat.read_conversations([path], tok, 64)) == 1
    system_first = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                    {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]  # fmt: skip
    logged = []
    with pytest.raises(UserError):
        chat.read_conversations([write_lines(tmp_path / "s.jsonl", [system_first])], tok, 64, log=logged.append)
    assert "message 2 is from 'user'" in "\n".join(logged)


def test_malformed_lines_are_reported_with_line_numbers(tok, tmp_path):
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = write_lines(tmp_path / "mixed.jsonl", [
        good,                                                                          # 1
        '{"messages": [{"role": "user", "content": "hi"}',                             # 2 cut-off JSON
        "",                                                                            # 3 blank: ignored
        [{"role": "assistant", "content": "hello"}],                                   # 4 wrong order
        {"messages": [{"role": "user", "content": "hi"},
                      {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]},  # 5 bad part
        [{"role": "user", "content": "anyone?"}],                                      # 6 nothing to train on
        {"messages": good},                                                            # 7
    ])  # fmt: skip
    logged = []
    with pytest.raises(UserError, match="4 malformed line.*--skip-bad-lines"):
        chat.read_conversations([path], tok, 64, log=logged.append)
    text = "\n".join(logged)
    for lineno in (2, 4, 5, 6):
        assert f"{path}:{lineno}:" in text
    assert f"{path}:1:" not in text and f"{path}:3:" not in text and f"{path}:7:" not in text
    assert "not JSON" in text and "should be from 'user'" in text and "part 0" in text

    logged = []
    convs = chat.read_conversations([path], tok, 64, skip_bad_lines=True, log=logged.append)
    assert convs.sources == [f"{path}:1", f"{path}:7"]
    assert sum(f"{path}:" in line for line in logged) == 4


def test_loader_state_resumes_the_same_batches_on_any_process_count(tok, tmp_path):
    convs = chat.read_conversations([write_lines(tmp_path / "g.jsonl", chat.generate_conversations(40))], tok, 129)

    def loaders(count, state=None):  # count processes of 4 // count rows each: 4 rows a step in all
        rows = 4 // count
        return [chat.SFTLoader(convs, rows, 128, process_index=i, process_count=count, seed=5, buffer_size=6,
                               state=state) for i in range(count)]  # fmt: skip

    def steps(loaders, n):  # each step's global batch: the processes' rows in process order
        return [np.concatenate([np.stack(next(loader)) for loader in loaders], axis=1) for _ in range(n)]

    one, two = loaders(1), loaders(2)
    np.testing.assert_array_equal(steps(one, 15), steps(two, 15))  # past the end of an epoch
    assert two[0].epoch == two[1].epoch == one[0].epoch > 1
    # As train merges the processes' states (all_processes_state), through JSON as a checkpoint.
    state = json.loads(json.dumps({"readers": two[0].get_state()["readers"] | two[1].get_state()["readers"]}))
    assert state == one[0].get_state()
    expected = steps(two, 5)
    for count in (1, 2, 4):
        np.testing.assert_array_equal(steps(loaders(count, state), 5), expected)
    with pytest.raises(UserError, match="conversations: saved 40, now 30; data_fingerprint: saved .*same conv"):
        chat.SFTLoader(convs.subset(range(30)), 2, 128, seed=5, state=state)
    others = chat.read_conversations([write_lines(tmp_path / "h.jsonl", chat.generate_conversations(40, 1))], tok, 129)
    with pytest.raises(UserError, match=r"\(data_fingerprint: saved [0-9a-f]{12}, now [0-9a-f]{12}\)"):
        chat.SFTLoader(others, 2, 128, seed=5, state=state)  # as many, other conversations
    with pytest.raises(UserError, match=r"\(seed: saved 5, now 6\)"):
        chat.SFTLoader(convs, 2, 128, seed=6, state=state)


def test_the_epoch_counts_the_conversations_in_rows_not_those_read_ahead(tok, tmp_path):
    convs = chat.read_conversations([write_lines(tmp_path / "g.jsonl", chat.generate_conversations(40))], tok, 129)
    loader, rows = chat.SFTLoader(convs, 1, 128), chat.rows_per_epoch(convs, 128)  # its buffer holds all 40
    epochs = [next(loader) and loader.epoch for _ in range(3 * rows)]
    assert loader.read_epoch >= 2 and epochs[0] == 1  # it read the next epoch's conversations before the first row
    assert epochs[rows // 2] == 1 and epochs[2 * rows] >= 2 and epochs == sorted(epochs)


def test_val_batches_cover_every_conversation_once(tok, tmp_path):
    convs = chat.read_conversations([write_lines(tmp_path / "g.jsonl", chat.generate_conversations(30))], tok, 129)
    first = list(chat.val_batches(convs, rows=2, seq_len=128, process_index=1, process_count=2))
    again = list(chat.val_batches(convs, rows=2, seq_len=128, process_index=1, process_count=2))
    other = list(chat.val_batches(convs, rows=2, seq_len=128, process_index=0, process_count=2))
    assert len(first) == len(other) > 0
    for (x, y), (ax, ay) in zip(first, again, strict=True):
        np.testing.assert_array_equal(ax, x)
        np.testing.assert_array_equal(ay, y)
    trained = sum(int((y >= 0).sum()) for _, y in first + other)
    assert trained == sum(int(m[1:].sum()) for m in convs.masks)


def test_generated_set_is_seeded_and_its_tool_outputs_are_the_calculators(tmp_path):
    conversations = chat.generate_conversations(300, seed=1)
    assert conversations == chat.generate_conversations(300, seed=1) != chat.generate_conversations(300, seed=2)
    calls = 0
    for messages in conversations:
        for m in messages:
            if isinstance(m["content"], list):
                code = [p["text"] for p in m["content"] if p["type"] == "python"]
                outputs = [p["text"] for p in m["content"] if p["type"] == "python_output"]
                assert [calculate(c) for c in code] == outputs
                calls += len(code)
    assert calls > 100
    path = chat.write_conversations(tmp_path / "s.jsonl", conversations)
    assert [chat.parse_conversation(line) for line in path.read_text().splitlines()] == conversations


def test_chat_session_keeps_the_history(tok):
    config = GPTConfig(sequence_len=64, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    session = chat.ChatSession(Engine(GPT(config, rngs=nnx.Rngs(0)), tok), max_tokens=5, temperature=1.0)
    bos, us, ue, as_, ae = specials(tok, "bos", "user_start", "user_end", "assistant_start", "assistant_end")
    first = "".join(session.reply("hi"))
    after_one = list(session.tokens)
    assert after_one[: 3 + len(tok.encode("hi"))] == [bos, us, *tok.encode("hi"), ue]
    assert after_one[-1] == ae and tok.decode(after_one[len(tok.encode("hi")) + 4 : -1]) == first
    "".join(session.reply("alpha"))
    assert session.tokens[: len(after_one)] == after_one and session.tokens.count(as_) == 2
    session.reset()
    assert session.tokens == [bos]


def test_chat_session_answers_in_the_room_left(tok):
    config = GPTConfig(sequence_len=64, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    session = chat.ChatSession(Engine(GPT(config, rngs=nnx.Rngs(0)), tok), max_tokens=600, temperature=1.0)
    session.tokens = session.tokens * 630  # a long conversation: 640 positions, 4 left for the answer
    "".join(session.reply("hi"))
    assert len(session.tokens) <= 640
    with pytest.raises(UserError, match="fills the model's 640 positions"):
        "".join(session.reply("hi"))
    session.reset()
    with pytest.raises(UserError, match="the message is too long for the model's 640 positions"):
        "".join(session.reply("alpha " * 700))


@pytest.mark.parametrize("script", [chat_cli, sample])
@pytest.mark.parametrize(
    "flag,message",
    [*((f"--temperature={v}", f"must be a finite number >= 0 (0 is greedy), got '{v}'")
       for v in ["-1", "nan", "inf", "warm"]),
     ("--top-k=-5", "must be an integer >= 0, got '-5'")],
)  # fmt: skip
def test_sampling_settings_are_checked(script, flag, message, capsys):
    with pytest.raises(SystemExit):
        script.parse_args([flag])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag,message",
    [("--val-fraction=0", "must be a fraction above 0 and below 1, got '0'"),
     ("--val-fraction=1.5", "must be a fraction above 0 and below 1, got '1.5'"),
     ("--num-epochs=0", "must be a number above 0, got '0'"), ("--num-epochs=nan", "must be a number above 0")],
)  # fmt: skip
def test_finetuning_amounts_are_checked(flag, message, capsys):
    with pytest.raises(SystemExit):
        chat_sft.parse_args([flag])
    assert message in capsys.readouterr().err


def test_an_empty_one_shot_message_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        chat_cli.main([f"--base-dir={tmp_path}", "-p", "  "])
    assert "-p: the message is empty" in capsys.readouterr().err


def test_make_conversations_refuses_a_bad_count_or_a_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        make_conversations.main(["--num=-3"])
    assert "argument --num: must be a positive integer, got '-3'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        make_conversations.main([f"--output={tmp_path}"])
    assert f"--output {tmp_path} is a folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind
