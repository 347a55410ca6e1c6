"""nanochat's PyTorch train step on this machine: the baseline our JAX step is measured against (issue #8).

    python -m benchmarks.nanochat_torch --check          # is it nanochat's computation? (reference vectors A, B)
    python -m benchmarks.nanochat_torch                  # the check, then nanochat's step: d4 seed shape, batch 1 and 8
    python -m benchmarks.nanochat_torch --against-jax    # the check, then ours and nanochat's in turns, one process

nanochat's source is not on this machine: below are its GPT and MuonAdamW (version 2026-02-03), written from
shared/SPEC.md, and the check compares them with the vectors nanochat's own code produced (shared/reference)
before anything is timed. The step runs as nanochat's base_train runs it on a CPU: float32 (autocast is for
cuda only), `torch.compile(model, dynamic=False)`, the optimizer's fused steps compiled, gradient accumulation
over micro-batches, `loss.item()` once per step. The check runs in a child process, so that the timed process's
first call and peak memory carry nothing of it, and inductor's cache is a fresh folder (its first call is a
cold compilation; set TORCHINDUCTOR_CACHE_DIR to keep one). Needs torch: .venv/bin/pip install -e '.[baseline]'
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks import SEED_HYPERPARAMS, add_shape_flags, machine, timed
from nanojax.common import HelpFormatter, cli, nonnegative_int, positive_int

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:
    raise SystemExit("nanochat_torch needs torch: .venv/bin/pip install -e '.[baseline]' (torch 2.13.0, CPU)") from None

REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "nanochat_vectors"


# --- nanochat's model (nanochat/gpt.py) ---------------------------------------------------------------------


@dataclass
class GPTConfig:
    sequence_len: int = 512
    vocab_size: int = 8192
    n_layer: int = 4
    n_head: int = 2
    n_kv_head: int = 2
    n_embd: int = 128
    window_pattern: str = "L"


def norm(x):
    return F.rms_norm(x, (x.size(-1),))  # eps: finfo(float32).eps


def has_ve(i, n_layer):
    return i % 2 == (n_layer - 1) % 2


def apply_rotary_emb(x, cos, sin):
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], 3)


def flash_attn_func(q, k, v, window):
    """nanochat's SDPA fallback for flash attention (no FA3 off Hopper): (B, T, H, D) in and out."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    T, gqa = q.size(2), q.size(1) != k.size(1)
    if window < 0 or window >= T:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        row, col = torch.arange(T).unsqueeze(1), torch.arange(T).unsqueeze(0)
        mask = (col <= row) & (row - col <= window)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return y.transpose(1, 2)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, i):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = hd = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, self.n_head * hd, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * hd, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * hd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.ve_gate = nn.Linear(32, self.n_kv_head, bias=False) if has_ve(i, config.n_layer) else None

    def forward(self, x, ve, cos_sin, window):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :32]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary_emb(q, *cos_sin), apply_rotary_emb(k, *cos_sin)
        q, k = norm(q), norm(k)
        y = flash_attn_func(q, k, v, window)
        return self.c_proj(y.contiguous().view(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, i):
        super().__init__()
        self.attn, self.mlp = CausalSelfAttention(config, i), MLP(config)

    def forward(self, x, ve, cos_sin, window):
        x = x + self.attn(norm(x), ve, cos_sin, window)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        padded_vocab = -(-config.vocab_size // 64) * 64
        pattern = (config.window_pattern * config.n_layer)[: config.n_layer - 1] + "L"  # the last layer is L
        self.windows = [config.sequence_len if c == "L" else config.sequence_len // 2 for c in pattern]
        self.transformer = nn.ModuleDict(
            {"wte": nn.Embedding(padded_vocab, config.n_embd),
             "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)])}
        )  # fmt: skip
        self.lm_head = nn.Linear(config.n_embd, padded_vocab, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        self.value_embeds = nn.ModuleDict(
            {str(i): nn.Embedding(padded_vocab, kv_dim) for i in range(config.n_layer) if has_ve(i, config.n_layer)}
        )
        cos, sin = self._precompute_rotary_embeddings(10 * config.sequence_len, config.n_embd // config.n_head)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self):
        s = 3**0.5 * self.config.n_embd**-0.5
        nn.init.normal_(self.transformer.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(linear.weight, -s, s)
            for linear in (block.attn.c_proj, block.mlp.c_proj, block.attn.ve_gate):
                if linear is not None:
                    nn.init.zeros_(linear.weight)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)

    def _precompute_rotary_embeddings(self, seq_len, head_dim, base=10000):
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
        return freqs.cos().bfloat16()[None, :, None, :], freqs.sin().bfloat16()[None, :, None, :]

    def estimate_flops(self):
        """Per token: 6 x the matmul params, plus attention's 12 h d (window-limited) per layer."""
        embeddings = self.transformer.wte.weight.numel() + sum(v.weight.numel() for v in self.value_embeds.values())
        matmul = sum(p.numel() for p in self.parameters()) - embeddings - 2 * self.config.n_layer
        hd = self.config.n_embd // self.config.n_head
        return 6 * matmul + sum(12 * self.config.n_head * hd * min(w, self.config.sequence_len) for w in self.windows)

    def forward(self, idx, targets=None):
        B, T = idx.size()
        assert self.cos.dtype == torch.bfloat16
        cos_sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.transformer.wte(idx))
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.windows[i])
        logits = self.lm_head(norm(x))[..., : self.config.vocab_size].float()
        logits = 15 * torch.tanh(logits / 15)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    def setup_optimizer(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                        adam_betas=(0.8, 0.95), scalar_lr=0.5, orth_dtype=torch.bfloat16, compile=True):  # fmt: skip
        scale = (self.config.n_embd / 768) ** -0.5
        adamw = dict(kind="adamw", betas=tuple(adam_betas), eps=1e-10, weight_decay=0.0)
        groups = [
            dict(params=[self.lm_head.weight], lr=unembedding_lr * scale, **adamw),
            dict(params=[self.transformer.wte.weight], lr=embedding_lr * scale, **adamw),
            dict(params=list(self.value_embeds.parameters()), lr=embedding_lr * scale, **adamw),
            dict(params=[self.resid_lambdas], lr=scalar_lr * 0.01, **adamw),
            dict(params=[self.x0_lambdas], lr=scalar_lr, **{**adamw, "betas": (0.96, 0.95)}),
        ]
        matrices = list(self.transformer.h.parameters())
        for shape in sorted({p.shape for p in matrices}):
            groups.append(dict(kind="muon", params=[p for p in matrices if p.shape == shape], lr=matrix_lr,
                               momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=weight_decay))  # fmt: skip
        for group in groups:
            group["initial_lr"] = group["lr"]
        return MuonAdamW(groups, orth_dtype, compile)


# --- nanochat's optimizer (nanochat/optim.py) ---------------------------------------------------------------

POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def adamw_step_fused(p, grad, exp_avg, exp_avg_sq, step_t, lr_t, beta1_t, beta2_t, eps_t, wd_t):
    p.mul_(1 - lr_t * wd_t)
    exp_avg.lerp_(grad, 1 - beta1_t)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2_t)
    bias1, bias2 = 1 - beta1_t**step_t, 1 - beta2_t**step_t
    denom = (exp_avg_sq / bias2).sqrt() + eps_t
    p.add_(exp_avg / denom, alpha=-(lr_t / bias1))


def muon_step_fused(grads, params, momentum_buffer, second_momentum_buffer, momentum_t, lr_t, wd_t, beta2_t,
                    ns_steps: int, red_dim: int, orth_dtype: torch.dtype):  # fmt: skip
    # Nesterov momentum
    momentum = momentum_t.to(grads.dtype)
    momentum_buffer.lerp_(grads, 1 - momentum)
    g = grads.lerp_(momentum_buffer, momentum)
    # Polar Express (bfloat16 in nanochat; the reference's float32 variant changes only this cast)
    X = g.to(orth_dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        if g.size(-2) > g.size(-1):
            A = X.mT @ X
            X = a * X + X @ (b * A + c * (A @ A))
        else:
            A = X @ X.mT
            X = a * X + (b * A + c * (A @ A)) @ X
    g = X
    # NorMuon variance normalisation, factored over red_dim
    beta2 = beta2_t.to(g.dtype)
    v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
    n = g.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
    second_momentum_buffer.lerp_(v_mean.to(dtype=second_momentum_buffer.dtype), 1 - beta2)
    step_size = second_momentum_buffer.clamp_min(1e-10).rsqrt()
    v_norm_new = ((v_mean * n) * step_size.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    g = g * (step_size * (v_norm / v_norm_new.clamp_min(1e-10))).to(g.dtype)
    # Cautious weight decay and the update
    lr, wd = lr_t.to(g.dtype), wd_t.to(g.dtype)
    mask = (g * params) >= 0
    params.sub_(lr * g + lr * wd * params * mask)


class MuonAdamW(torch.optim.Optimizer):
    """AdamW for the kind="adamw" groups, Muon for the kind="muon" ones (one process: no sharding)."""

    def __init__(self, param_groups, orth_dtype=torch.bfloat16, compile=True):
        super().__init__(param_groups, defaults={})
        self.orth_dtype = orth_dtype
        # nanochat decorates both steps with @torch.compile(dynamic=False, fullgraph=True)
        fused = (torch.compile(f, dynamic=False, fullgraph=True) if compile else f for f in (adamw_step_fused,
                                                                                         muon_step_fused))  # fmt: skip
        self.adamw_step_fused, self.muon_step_fused = fused
        # 0-d CPU tensors, so that torch.compile does not recompile when a value changes
        self._adamw_t = [torch.tensor(0.0) for _ in range(6)]  # step, lr, beta1, beta2, eps, wd
        self._muon_t = [torch.tensor(0.0) for _ in range(4)]  # momentum, lr, wd, beta2

    def _step_adamw(self, group):
        step_t, lr_t, beta1_t, beta2_t, eps_t, wd_t = self._adamw_t
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
            for t, value in zip(self._adamw_t, (state["step"], group["lr"], *group["betas"], group["eps"],
                                                group["weight_decay"]), strict=True):  # fmt: skip
                t.fill_(value)
            self.adamw_step_fused(p, p.grad, state["exp_avg"], state["exp_avg_sq"], step_t, lr_t, beta1_t, beta2_t,
                                  eps_t, wd_t)  # fmt: skip

    def _step_muon(self, group):
        params = group["params"]
        state, shape = self.state[params[0]], params[0].shape
        if not state:
            rows, cols = shape[-2:]
            state["momentum_buffer"] = torch.zeros(len(params), *shape)
            state["second_momentum_buffer"] = torch.zeros(len(params), *((rows, 1) if rows >= cols else (1, cols)))
        red_dim = -1 if shape[-2] >= shape[-1] else -2
        grads, stacked = torch.stack([p.grad for p in params]), torch.stack(params)
        lr = group["lr"] * max(1.0, shape[-2] / shape[-1]) ** 0.5
        for t, value in zip(self._muon_t, (group["momentum"], lr, group["weight_decay"], group["beta2"]), strict=True):
            t.fill_(value)
        self.muon_step_fused(grads, stacked, state["momentum_buffer"], state["second_momentum_buffer"], *self._muon_t,
                        group["ns_steps"], red_dim, self.orth_dtype)  # fmt: skip
        torch._foreach_copy_(params, list(stacked.unbind(0)))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            (self._step_adamw if group["kind"] == "adamw" else self._step_muon)(group)


# --- the check: nanochat's reference vectors, link by link -------------------------------------------------

# Max abs differences allowed. shared/reference/README.md measures float32 noise at 2e-8 (grads) to 5e-7
# (logits, losses, an optimizer step); the bounds leave room for inductor's fused kernels. Polar Express in
# bfloat16 is defined to about 1e-3 (bf16 vs fp32 9.2e-4, eager vs compiled 8.3e-4): the README's 2e-3 and 5e-3.
TOLERANCES = {"rotary tables": 0.0, "logits": 1e-5, "loss_mean": 1e-5, "grad1": 1e-6, "logits_after_step1": 1e-5,
              "loss2": 1e-5, "grad2": 1e-6, "step1_fp32": 1e-5, "step1": 2e-3, "step2": 5e-3}  # fmt: skip
GROUP_KEYS = ("kind", "lr", "betas", "eps", "weight_decay", "momentum", "ns_steps", "beta2")


def load_reference(name: str) -> tuple[dict, dict]:
    meta, arrays = json.loads((REFERENCE / f"{name}.json").read_text()), {}
    for file in meta["files"]:  # larger configs are split over several files, no key in two
        with np.load(REFERENCE / file) as z:
            arrays.update({k: z[k] for k in z.files})
    return meta, arrays


def check_groups(optimizer, model, reference_groups) -> None:
    names = {id(p): n for n, p in model.named_parameters()}
    ours = [{"params": [names[id(p)] for p in g["params"]], **{k: g[k] for k in GROUP_KEYS if k in g}}
            for g in optimizer.param_groups]  # fmt: skip
    theirs = [{"params": g["params"], **{k: g[k] for k in GROUP_KEYS if k in g}} for g in reference_groups]
    for group in ours + theirs:
        group["betas"] = list(group.get("betas", []))
    if ours != theirs:
        raise SystemExit(f"check FAILED: optimizer groups differ from the reference's: {ours} against {theirs}")


def check_config(name: str, compile: bool) -> dict[str, float]:
    """Max abs difference of each quantity in TOLERANCES from reference config `name`'s, link by link."""
    torch._dynamo.reset()  # a fresh compile cache for each config: dynamo's recompile limit is per function
    meta, d = load_reference(name)
    model = GPT(GPTConfig(**meta["gpt_config"]))
    named = list(model.named_parameters())

    def err(t, key):
        return (t.detach().double() - torch.from_numpy(d[key]).double()).abs().max().item()

    def load(prefix, grads=None):
        model.load_state_dict({n: torch.from_numpy(d[f"{prefix}/{n}"]) for n, _ in named})
        for n, p in named:
            p.grad = None if grads is None else torch.from_numpy(d[f"{grads}/{n}"]).clone()

    diffs = {"rotary tables": max(err(model.cos[0, :, 0], "buffer/cos"), err(model.sin[0, :, 0], "buffer/sin"))}
    model.cos = torch.from_numpy(d["buffer/cos"]).bfloat16()[None, :, None, :]
    model.sin = torch.from_numpy(d["buffer/sin"]).bfloat16()[None, :, None, :]
    run = torch.compile(model, dynamic=False) if compile else model
    idx, targets = torch.from_numpy(d["idx"]).long(), torch.from_numpy(d["targets"]).long()
    # At init logits are ~1e-3 (the softcap barely acts) and every c_proj is 0: the step-1 params exercise both.
    for params, logits, loss, grads in (("param", "logits", "loss_mean", "grad1"),
                                        ("step1", "logits_after_step1", "loss2", "grad2")):  # fmt: skip
        load(params)
        with torch.no_grad():
            diffs[logits] = err(run(idx), logits)
        value = run(idx, targets)
        value.backward()
        diffs[loss] = err(value, loss)
        diffs[grads] = max(err(p.grad, f"{grads}/{n}") for n, p in named)
    # The optimizer, fed the stored grads: float32 Polar Express (tight), then nanochat's bfloat16 for two steps.
    for orth_dtype, key in ((torch.float32, "step1_fp32"), (torch.bfloat16, "step1")):
        load("param", grads="grad1")
        optimizer = model.setup_optimizer(**meta["optimizer"]["kwargs"], orth_dtype=orth_dtype, compile=compile)
        check_groups(optimizer, model, meta["optimizer"]["groups"])
        optimizer.step()
        diffs[key] = max(err(p, f"{key}/{n}") for n, p in named)
    load("step1", grads="grad2")
    optimizer.step()
    diffs["step2"] = max(err(p, f"step2/{n}") for n, p in named)
    return diffs


def check(compile: bool) -> None:
    """nanochat's step against its reference vectors A and B, eagerly (as they were made) and, with `compile`,
    compiled as it is timed; exits with one line if a quantity is out of tolerance."""
    start, columns = time.perf_counter(), {}
    for mode in ("eager", "compiled") if compile else ("eager",):
        for name in "ab":
            columns[f"{name.upper()} {mode}"] = check_config(name, mode == "compiled")
    print(f"check against nanochat's reference vectors A and B ({REFERENCE.resolve()}): max abs differences")
    print(f"{'quantity':>18} " + " ".join(f"{c:>11}" for c in columns) + f" {'tolerance':>9}")
    for key, tol in TOLERANCES.items():
        print(f"{key:>18} " + " ".join(f"{d[key]:>11.2e}" for d in columns.values()) + f" {tol:>9.0e}")
    for column, d in columns.items():
        if bad := [f"{key} by {d[key]:.2e} (tolerance {tol:.0e})" for key, tol in TOLERANCES.items() if d[key] > tol]:
            raise SystemExit(f"check FAILED: {column} differs from nanochat's reference in {', '.join(bad)}")
    print(f"check passed ({time.perf_counter() - start:.0f} s): nanochat's forward, loss, gradients, optimizer groups "
          "and steps")  # fmt: skip


# --- timing -------------------------------------------------------------------------------------------------


def model_config(args) -> GPTConfig:
    """base_train's sizing from --depth: width rounded up to whole heads."""
    dim = -(-args.depth * args.aspect_ratio // args.head_dim) * args.head_dim
    heads = dim // args.head_dim
    return GPTConfig(args.max_seq_len, args.vocab_size, args.depth, heads, heads, dim, args.window_pattern)


def schedule(it: int, num_iterations: int = 10_000, warmdown_ratio: float = 0.5) -> tuple[float, float, float]:
    """base_train's lr multiplier, Muon momentum and weight decay multiplier at step `it` (no warmup, final 0)."""
    warmdown = round(warmdown_ratio * num_iterations)
    lrm = 1.0 if it <= num_iterations - warmdown else (num_iterations - it) / warmdown
    frac = min(it / 300, 1)
    return lrm, (1 - frac) * 0.85 + frac * 0.95, 1 - it / num_iterations


def torch_train_step(args, x_ABT: np.ndarray, y_ABT: np.ndarray):
    """nanochat's base_train step on fixed micro-batches, as a call that returns the last micro-batch's loss."""
    model = GPT(model_config(args))
    model.init_weights()
    hp, lr_scale = SEED_HYPERPARAMS, (args.total_batch_size / 2**19) ** 0.5
    weight_decay = hp["weight_decay"] * (12 / args.depth) ** 2
    optimizer = model.setup_optimizer(
        unembedding_lr=hp["unembedding_lr"] * lr_scale, embedding_lr=hp["embedding_lr"] * lr_scale,
        matrix_lr=hp["matrix_lr"] * lr_scale, scalar_lr=hp["scalar_lr"] * lr_scale, weight_decay=weight_decay,
        adam_betas=hp["adam_betas"], compile=args.compile,
    )  # fmt: skip
    run = torch.compile(model, dynamic=False) if args.compile else model
    x, y = torch.from_numpy(x_ABT).long(), torch.from_numpy(y_ABT).long()
    step = 0

    def one_step():
        nonlocal step
        for micro in range(len(x)):
            loss = run(x[micro], y[micro])
            (loss / len(x)).backward()
        lrm, momentum, wd_multiplier = schedule(step)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"], group["weight_decay"] = momentum, weight_decay * wd_multiplier
        optimizer.step()
        model.zero_grad(set_to_none=True)
        step += 1
        return loss.item()

    return one_step, model


def random_batches(args, B: int, seed: int = 0) -> tuple[int, np.ndarray, np.ndarray]:
    T = args.max_seq_len
    accum = args.total_batch_size // (B * T)
    if accum * B * T != args.total_batch_size:
        raise SystemExit(f"--total-batch-size {args.total_batch_size} is not a multiple of {B} x {T} tokens")
    rng = np.random.default_rng(seed)
    x, y = (rng.integers(0, args.vocab_size, (accum, B, T), dtype=np.int32) for _ in range(2))
    return accum, x, y


def time_torch(args, batch_sizes) -> None:
    print("peak memory: process peak RSS so far (it only grows across rows)")
    print()
    header = (f"{'batch':>5} {'accum':>5} {'dtype':>8} {'attention':>9} {'1st call s':>10} {'step ms':>8} "
              f"{'tokens/s':>9} {'peak MiB':>8} {'GFLOP/s':>8} {'MFU':>6}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for B in batch_sizes:
        accum, x, y = random_batches(args, B)
        one_step, model = torch_train_step(args, x, y)
        first, dt = timed(one_step, args.steps, args.warmup)
        tok_s = args.total_batch_size / dt
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
        print(f"{B:>5} {accum:>5} {'float32':>8} {'sdpa':>9} {first:>10.1f} {1000 * dt:>8.1f} {tok_s:>9,.0f} "
              f"{peak:>8,.0f} {model.estimate_flops() * tok_s / 1e9:>8,.1f} {'n/a':>6}")  # fmt: skip


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def thread_cpu() -> dict[int, float]:
    """CPU seconds of each thread of this process so far (Linux)."""
    seconds = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # it ended meanwhile
            continue
        seconds[int(tid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return seconds


def against_jax(args, batch_sizes) -> None:
    """nanochat's step and ours (float32; bfloat16 with both CPU options) on the same batches, timed in turns."""
    import jax.numpy as jnp

    from benchmarks import train_throughput as tt
    from nanojax.sharding import make_mesh
    from nanojax.train import YNN_DOTS, init_state, platform_attention

    ours = [("float32", None, False), ("bfloat16", 2048, True)]  # (dtype, --loss-chunk, --ynn-dots)
    print(f"{args.rounds} rounds of {args.steps} steps of each, in turns (never two at once), after "
          f"{args.warmup} warmup steps each; step = median over the rounds")  # fmt: skip
    print()
    header = (f"{'batch':>5} {'accum':>5} {'train step':<44} {'1st call s':>10} {'step ms':>8} {'tokens/s':>9} "
              f"{'ours/theirs':>11}  per round")  # fmt: skip
    print(header)
    print("-" * len(header))
    usage, wall = {}, 0.0  # (side, thread id) -> CPU seconds during that side's timed steps
    for B in batch_sizes:
        accum, x, y = random_batches(args, B)
        steps = {"nanochat (torch, float32)": torch_train_step(args, x, y)[0]}
        config, optim = tt.seed_setup(args)
        mesh = make_mesh()
        for dtype, chunk, ynn in ours:
            state = init_state(config, optim, mesh, dtype=jnp.dtype(dtype), loss_chunk=chunk,
                               attention=platform_attention("auto", dtype, config.head_dim))  # fmt: skip
            label = f"nanojax {dtype}" + (f" --loss-chunk {chunk}" if chunk else "") + (" --ynn-dots" if ynn else "")
            steps[label] = tt.train_step_fn(state, mesh, jnp.asarray(x), jnp.asarray(y), YNN_DOTS if ynn else None)
        firsts, times = {}, {label: [] for label in steps}
        for label, fn in steps.items():
            firsts[label] = seconds(fn)
            for _ in range(args.warmup):
                fn()
        for _ in range(args.rounds):
            for label, fn in steps.items():
                side, before = label.split()[0], thread_cpu()
                times[label] += [seconds(fn) for _ in range(args.steps)]
                for tid, cpu in thread_cpu().items():
                    usage[side, tid] = usage.get((side, tid), 0.0) + cpu - before.get(tid, 0.0)
        theirs = statistics.median(times["nanochat (torch, float32)"])
        for label in steps:
            dt = statistics.median(times[label])
            rounds = [statistics.median(times["nanochat (torch, float32)"][r * args.steps : (r + 1) * args.steps])
                      / statistics.median(times[label][r * args.steps : (r + 1) * args.steps])
                      for r in range(args.rounds)]  # fmt: skip
            print(f"{B:>5} {accum:>5} {label:<44} {firsts[label]:>10.1f} {1000 * dt:>8.1f} "
                  f"{args.total_batch_size / dt:>9,.0f} {theirs / dt:>10.2f}x  "
                  f"{', '.join(f'{r:.2f}x' for r in rounds)}")  # fmt: skip
        wall += sum(map(sum, times.values()))
        del steps
    # A thread belongs to the side it worked for most; the main thread runs both, one at a time.
    main_tid, tids = threading.get_native_id(), {tid for _, tid in usage}
    cross = {"nanochat": 0.0, "nanojax": 0.0}
    for tid in tids - {main_tid}:
        mine = {side: usage.get((side, tid), 0.0) for side in cross}
        owner = max(mine, key=mine.get)
        cross[owner] += sum(mine.values()) - mine[owner]
    print()
    print(f"cores: the timed steps took {sum(usage.values()):.1f} CPU-s in {wall:.1f} s; torch's threads used "
          f"{cross['nanochat']:.2f} CPU-s while JAX ran, JAX's {cross['nanojax']:.2f} while torch ran")  # fmt: skip


@cli
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_shape_flags(parser)
    parser.add_argument("--steps", type=positive_int, default=10,
                        help="timed steps per row (the median is reported); per round with --against-jax")  # fmt: skip
    parser.add_argument("--warmup", type=nonnegative_int, default=2, help="untimed steps after the first")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.compile the model and the optimizer's steps, as nanochat does")  # fmt: skip
    parser.add_argument("--check", action="store_true", help="only the check against nanochat's reference vectors")
    parser.add_argument("--against-jax", action="store_true", help="time nanojax's step (float32, and bfloat16 "
                        "--loss-chunk 2048 --ynn-dots) and nanochat's in turns, in one process: the ratio")  # fmt: skip
    parser.add_argument("--rounds", type=positive_int, default=3, help="--against-jax: rounds of --steps each")
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count())  # nanochat leaves torch's default
    if args.check:
        if not REFERENCE.is_dir():
            raise SystemExit(f"no reference vectors at {REFERENCE.resolve()}: nothing to check")
        return check(args.compile)
    if not REFERENCE.is_dir():
        print(f"no reference vectors at {REFERENCE.resolve()}: the check is skipped")
    else:  # in a child process: this one's first call and peak memory carry nothing of it
        flags = ["--check", "--compile" if args.compile else "--no-compile"]
        if code := subprocess.run([sys.executable, "-m", "benchmarks.nanochat_torch", *flags]).returncode:
            sys.exit(code)
        print()
    with tempfile.TemporaryDirectory(prefix="inductor-") as fresh:
        cache = os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", fresh)
        print(f"machine: {machine()}")
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (torch's default here: "
              f"{default_threads}), torch.compile {'on' if args.compile else 'off'}"
              + (f", inductor cache {'fresh' if cache == fresh else cache}" if args.compile else ""))  # fmt: skip
        config = model_config(args)
        with torch.device("meta"):  # as nanochat builds it: shapes only
            model = GPT(config)
        print(f"model: {config}")
        print(f"{sum(p.numel() for p in model.parameters()):,} parameters, {model.estimate_flops():.3e} FLOPs/token, "
              f"{args.total_batch_size:,} tokens per step")  # fmt: skip
        batch_sizes = args.device_batch_size or [1, 8]
        (against_jax if args.against_jax else time_torch)(args, batch_sizes)


if __name__ == "__main__":
    main()
