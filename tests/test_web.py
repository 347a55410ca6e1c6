"""chat_web's server (nanojax/web.py) on 127.0.0.1: the page, nanochat's API streamed as server-sent
events, the answer the engine gives for the same conversation, and refused requests.

Run: python -m pytest -q tests/test_web.py
"""

import http.client
import json
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import TINY_RUN, script_env
from flax import nnx

from nanojax.common import UserError
from nanojax.engine import Engine
from nanojax.model import GPT, GPTConfig
from nanojax.pretrain import pretrain
from nanojax.tokenizer import get_tokenizer
from nanojax.web import make_server
from scripts import chat_web
from scripts import pretrain as pretrain_script

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def served(tiny_base):
    tok = get_tokenizer(tiny_base)
    config = GPTConfig(sequence_len=64, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    engine = Engine(GPT(config, rngs=nnx.Rngs(0)), tok)
    logged = []
    server = make_server(engine, "127.0.0.1", 0, max_tokens=12, log=logged.append)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield engine, f"http://127.0.0.1:{server.server_address[1]}", logged
    server.shutdown()
    server.server_close()


def post(url, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + "/chat/completions", data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.headers["Content-Type"] == "text/event-stream"
            blocks = response.read().decode().split("\n\n")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["detail"]
    assert blocks[-1] == "" and all(b.startswith("data: ") for b in blocks[:-1])
    return 200, [json.loads(b.removeprefix("data: ")) for b in blocks[:-1]]


def test_the_page_and_health(served):
    _, url, _ = served
    with urllib.request.urlopen(url + "/", timeout=10) as response:
        page = response.read().decode()
    assert "<title>nanojax chat</title>" in page and "/chat/completions" in page
    with urllib.request.urlopen(url + "/health", timeout=10) as response:
        assert json.loads(response.read()) == {"status": "ok", "ready": True}


def test_an_answer_streams_what_the_engine_says_to_the_conversation(served):
    engine, url, logged = served
    tok = engine.tokenizer
    messages = [{"role": "user", "content": "alpha beta"}, {"role": "assistant", "content": "gamma"},
                {"role": "user", "content": "delta"}]  # fmt: skip
    status, events = post(url, {"messages": messages, "temperature": 0, "max_tokens": 8})
    assert status == 200 and events[-1] == {"done": True} and all(set(e) == {"token"} for e in events[:-1])
    prompt = tok.render_for_completion([*messages, {"role": "assistant", "content": ""}])
    expected = "".join(engine.stream(prompt, max_tokens=8, temperature=0, top_k=50))
    assert "".join(e["token"] for e in events[:-1]) == expected
    assert logged[-1].startswith("127.0.0.1 | 3 messages | answered ")


@pytest.mark.parametrize(
    "body,detail",
    [(b"{not json", "not JSON"),
     ({"messages": []}, 'a non-empty "messages" list'),
     ({"messages": [{"role": "system", "content": "x"}]}, 'message 1: must be {"role": "user" or "assistant"'),
     ({"messages": [{"role": "user", "content": "x" * 8001}]}, "message 1 has 8,001 characters: at most 8,000"),
     ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]},
      "the last message must be the user's"),
     ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature must be a number from 0.0"),
     ({"messages": [{"role": "user", "content": "hi"}], "top_k": 2.5}, "top_k must be a whole number"),
     ({"messages": [{"role": "user", "content": "alpha " * 700}]}, "fills the model's 640 positions: start a new")],
)  # fmt: skip
def test_bad_requests_are_refused_by_name(served, body, detail):
    status, message = post(served[1], body)
    assert status == 400 and detail in message


def test_a_body_too_large_is_refused_unread(served):
    host, port = served[1].removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.putrequest("POST", "/chat/completions")
    connection.putheader("Content-Length", str(10**9))  # and no body: reading it would wait forever
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 400 and "Content-Length 1000000000: give the body's size" in response.read().decode()
    connection.close()


def test_a_port_in_use_is_one_line(served):
    _, url, _ = served
    port = int(url.rsplit(":", 1)[1])
    with pytest.raises(UserError, match=f"can't serve on 127.0.0.1:{port} .*pick another --port"):
        make_server(served[0], "127.0.0.1", port)
    with pytest.raises(UserError, match="can't serve on 192.0.2.1:0 .*check --host"):  # an address not on this machine
        make_server(served[0], "192.0.2.1", 0)


def test_a_port_out_of_range_is_refused(capsys):
    with pytest.raises(SystemExit):
        chat_web.parse_args(["--port", "70000"])
    assert "70000 is not a port: pick one from 0 to 65535" in capsys.readouterr().err


def test_no_chat_model_is_said_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        chat_web.main([f"--base-dir={tmp_path}"])
    assert "error: no checkpoints in" in capsys.readouterr().err


def test_the_script_serves_a_checkpoint_until_ctrl_c(tiny_base, tmp_path):
    for name in ("base_data", "tokenizer"):
        shutil.copytree(tiny_base / name, tmp_path / name)
    pretrain(pretrain_script.parse_args([*TINY_RUN, "--num-iterations=1", f"--base-dir={tmp_path}"]), tmp_path, ["a"])
    cmd = [sys.executable, "-m", "scripts.chat_web", "--source=base", "--port=0", f"--base-dir={tmp_path}"]
    env = script_env(8, cache=False)  # its first two lines are read to the letter
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(2)]  # the checkpoint, then the address
        assert "base_checkpoints/d2 step 1 |" in lines[0] and lines[1].startswith("nanojax chat on http://127.0.0.1:")
        url = lines[1].split()[3]
        status, events = post(url, {"messages": [{"role": "user", "content": "alpha"}], "max_tokens": 3})
        assert status == 200 and events[-1] == {"done": True}
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and out.endswith("stopped\n")
