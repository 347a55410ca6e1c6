"""Generation. For now greedy decoding by repeated full forward passes at one fixed length (so one
compilation serves every token); causality makes the padding after each position irrelevant.

    tokens, logits = greedy(forward, [prompt_ids, ...], max_tokens)   # forward(idx_BT) -> logits_BTV
"""

import numpy as np


def greedy(forward, prompts: list[list[int]], max_tokens: int, stop_tokens=()) -> tuple[list[list[int]], list]:
    """max_tokens greedy continuations of each prompt (cut after a stop token), and the logits that chose them."""
    total = max(len(p) for p in prompts) + max_tokens
    seq = np.zeros((len(prompts), total), np.int32)
    for i, p in enumerate(prompts):
        seq[i, : len(p)] = p
    lengths = np.array([len(p) for p in prompts])
    rows = np.arange(len(prompts))
    chosen = []
    for k in range(max_tokens):
        logits = np.asarray(forward(seq))[rows, lengths + k - 1]
        seq[rows, lengths + k] = logits.argmax(-1)
        chosen.append(logits)
    out = []
    for i, n in enumerate(lengths):
        tokens = seq[i, n : n + max_tokens].tolist()
        stops = [j for j, t in enumerate(tokens) if t in stop_tokens]
        out.append(tokens[: stops[0]] if stops else tokens)
    return out, np.stack(chosen, axis=1)


def sample_texts(forward, tokenizer, prompts: list[str], max_tokens: int = 16) -> list[str]:
    """Greedy completions of text prompts (each starting with <|bos|>), decoded: training's samples."""
    bos = tokenizer.get_bos_token_id()
    ids = tokenizer.encode(prompts, prepend=bos)
    out, _ = greedy(forward, ids, max_tokens, stop_tokens=(bos,))
    return [p + tokenizer.decode(t) for p, t in zip(prompts, out, strict=True)]
