"""Talk to a finetuned model in the browser, as nanochat's chat_web:

    python -m scripts.chat_web                          # then open http://127.0.0.1:8000
    python -m scripts.chat_web --model-tag d4 --port 8080 --temperature 0.6
    python -m scripts.chat_web --host 0.0.0.0           # reachable from other machines too

Serves a ChatGPT-like page and nanochat's API (POST /chat/completions, streamed as server-sent events;
GET /health), from <base_dir>/chatsft_checkpoints/<model tag>/ (base_checkpoints with --source base)
and the tokenizer under <base_dir>/tokenizer/. Calculator calls run in the engine, as in chat_cli.
One answer is generated at a time; Ctrl-C stops the server.
"""

import argparse

from nanojax.common import (
    HelpFormatter,
    add_checkpoint_flags,
    cli,
    get_base_dir,
    nonnegative_int,
    positive_int,
    temperature,
)


def port(text: str) -> int:
    value = nonnegative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port: pick one from 0 to 65535")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    a = p.add_argument
    add_checkpoint_flags(p, "sft")
    a("-t", "--temperature", type=temperature, default=0.8, help="sampling temperature of requests that set none; "
      "0 is greedy")  # fmt: skip
    a("-k", "--top-k", type=nonnegative_int, default=50, help="top-k of requests that set none; 0 for all tokens")
    a("-m", "--max-tokens", type=positive_int, default=512, help="limit on an answer's tokens, for requests that "
      "set none")  # fmt: skip
    a("-p", "--port", type=port, default=8000, help="port to serve on (0: any free one)")
    a("--host", default="127.0.0.1", help="address to serve on; 0.0.0.0 serves other machines too")
    a("--base-dir", default=None, help="default $NANOJAX_BASE_DIR, else ~/.cache/nanojax")
    return p.parse_args(argv)


@cli
def main(argv=None):
    args = parse_args(argv)
    from nanojax import engine  # imports jax: after --help
    from nanojax.web import make_server

    base_dir = get_base_dir(args.base_dir)
    model, tokenizer, _, _ = engine.load_for_inference(base_dir, args.source, args.model_tag, args.step)
    server = make_server(engine.Engine(model, tokenizer), args.host, args.port, temperature=args.temperature,
                         top_k=args.top_k, max_tokens=args.max_tokens)  # fmt: skip
    host, port = server.server_address[:2]
    print(f"nanojax chat on http://{host}:{port} (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
