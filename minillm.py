"""
MiniLLM: knowledge distillation of a small GPT student from a larger GPT teacher, in one readable file.

    python minillm.py                                              # the built-in default, end to end (see README)
    python minillm.py --method sft --model teacher --out out/teacher          # supervised fine-tuning (stage 1)
    python minillm.py --method sft --model student --out out/student-sft
    python minillm.py --method minillm --teacher out/teacher/best.pt --init out/student-sft/best.pt --out out/minillm
    python minillm.py --bench generate                             # KV-cache vs recomputation benchmark

Follows Gu, Dong, Wei, Huang, "MiniLLM: Knowledge Distillation of Large Language Models" (ICLR 2024).
This file holds, top to bottom: the run settings, the GPT model (GPT-2 layout and parameter names), generation
with a KV cache, teacher-mixed rollouts, the MiniLLM objective (Eq. 2-7), checkpoints, supervised fine-tuning
(Algorithm 1, step 1: the student's initialization and the teacher), MiniLLM distillation (Algorithm 1, step 2),
the validity evaluation of the built-in task, and main. Data and tokenizers live in data.py, the fused reverse-KL
kernel in kernels.py.

What this version simplifies or changes (relative to the paper and its official code):
- The built-in task is a small procedurally generated instruction world (data.py) so that the whole method runs
  on a 2-core CPU in minutes; GPT-2 shapes are available by name for real runs.
- Where the official code departs from the paper (the return includes step t, a discount of 0.95, whitened and
  scaled advantages, no importance weight on the single-step term), this follows the paper.
- The teacher's logits are recomputed for each mini-batch instead of being stored with the rollouts (memory over
  time; the teacher forward is cheap next to the rollouts).
- Distillation keeps the checkpoint with the lowest validation reverse KL (the paper selects by validation
  Rouge-L).
"""
import argparse
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import kernels


class InputError(Exception):
    """A checkpoint, device or length that cannot be used. The message is one line naming the problem."""

# -----------------------------------------------------------------------------
# Model configuration


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # tokens in the vocabulary (GPT-2: 50257)
    block_size: int = 1024   # longest sequence the position embedding covers
    n_layer: int = 12        # transformer blocks
    n_head: int = 12         # attention heads per block
    n_embd: int = 768        # width of the residual stream
    dropout: float = 0.0     # dropout on attention weights and residual branches (0 for fine-tuning)
    bias: bool = True        # biases in Linear and LayerNorm layers, as GPT-2 has


MODEL_SIZES = {  # name -> GPTConfig maker; vocab_size and block_size may be overridden
    # the built-in task (data.py): teacher 1.03M parameters, student 0.033M (31x smaller and short of capacity:
    # one layer cannot copy a variable-length sequence in order, 16 dims cannot hold every fact)
    "teacher": lambda **kw: GPTConfig(**{"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 256, **kw}),
    "student": lambda **kw: GPTConfig(**{"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 256, **kw}),
    # GPT-2 family, for real checkpoints (the paper: teacher gpt2-xl, students gpt2 / gpt2-medium / gpt2-large)
    "gpt2": lambda **kw: GPTConfig(**{"n_layer": 12, "n_head": 12, "n_embd": 768, **kw}),
    "gpt2-medium": lambda **kw: GPTConfig(**{"n_layer": 24, "n_head": 16, "n_embd": 1024, **kw}),
    "gpt2-large": lambda **kw: GPTConfig(**{"n_layer": 36, "n_head": 20, "n_embd": 1280, **kw}),
    "gpt2-xl": lambda **kw: GPTConfig(**{"n_layer": 48, "n_head": 25, "n_embd": 1600, **kw}),
}

# -----------------------------------------------------------------------------
# The model: GPT-2 (Radford et al. 2019) with the parameter names of Hugging Face's GPT2LMHeadModel


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v projections
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask, kv):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        if kv is not None:  # KV cache: write this step's keys and values, attend over everything so far
            k_cache, v_cache, start = kv  # (B, H, T_max, hd) each
            k_cache[:, :, start:start + T], v_cache[:, :, start:start + T] = k, v
            k, v = k_cache[:, :, :start + T], v_cache[:, :, :start + T]  # (B, H, S, hd), S = start + T
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's gelu


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask, kv):
        x = x + self.attn(self.ln_1(x), mask, kv)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding
            wpe=nn.Embedding(config.block_size, config.n_embd),  # position embedding
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # wte counted once: lm_head shares it

    def forward(self, idx, targets=None, valid=None, cache=None, last_only=False):
        """idx (B, T) token ids. targets (B, T) with -100 where no loss is taken.
        valid (B, T) bool, False on left padding (then positions count real tokens only and padding is never
        attended to). cache: a KV cache from new_cache(); idx is then appended after what it already holds.
        Returns (logits (B, T, V), or (B, 1, V) with last_only; mean cross-entropy or None)."""
        B, T = idx.shape
        start = 0 if cache is None else cache["len"]  # slots already in the cache
        if start + T > self.config.block_size:  # (a position never exceeds its slot)
            raise InputError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        if cache is None and valid is None:  # training: right padding only, plain causal attention
            pos, mask = torch.arange(T, device=idx.device), None
        else:
            if cache is not None:
                cache["valid"][:, start:start + T] = True if valid is None else valid
                valid = cache["valid"][:, :start + T]  # (B, S) over every slot so far
            pos = (valid.long().cumsum(1) - 1).clamp(min=0)[:, start:]  # (B, T) position among real tokens
            q_slot = torch.arange(start, start + T, device=idx.device)[:, None]  # (T, 1)
            k_slot = torch.arange(start + T, device=idx.device)[None, :]         # (1, S)
            mask = (k_slot <= q_slot) & valid[:, None, :]  # (B, T, S) causal, and never a padding key
            mask = (mask | (k_slot == q_slot))[:, None]    # (B, 1, T, S): a padding query sees itself, so no NaN
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, None if cache is None else (cache["k"][i], cache["v"][i], start))
        if cache is not None:
            cache["len"] += T
        x = self.transformer.ln_f(x)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1), ignore_index=-100)
        return logits, loss

# -----------------------------------------------------------------------------
# Generation with a KV cache. prefill() and decode() are separate so that two models (student q and teacher p)
# can be stepped in lockstep and their next-token distributions combined before sampling, as MiniLLM's
# teacher-mixed sampling needs: p_mix = alpha * p + (1 - alpha) * q at every step.


def new_cache(model, batch_size, max_len, device):
    """Per-layer keys and values (n_layer, B, H, max_len, hd), which slots hold real tokens, and the fill level."""
    c = model.config
    dtype = next(model.parameters()).dtype
    shape = (c.n_layer, batch_size, c.n_head, max_len, c.n_embd // c.n_head)
    return {"k": torch.zeros(shape, dtype=dtype, device=device), "v": torch.zeros(shape, dtype=dtype, device=device),
            "valid": torch.zeros(batch_size, max_len, dtype=torch.bool, device=device), "len": 0}


def left_pad(prompts, pad_id, device):
    """List of token lists -> idx (B, T) left-padded, valid (B, T) bool, so that every row ends at column T-1."""
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        idx[i, T - len(p):], valid[i, T - len(p):] = torch.tensor(p), True
    return idx.to(device), valid.to(device)


def prefill(model, idx, valid, max_new_tokens):
    """Runs the prompts through the model once; returns (cache, next-token logits (B, V))."""
    cache = new_cache(model, idx.size(0), idx.size(1) + max_new_tokens, idx.device)
    logits, _ = model(idx, valid=valid, cache=cache, last_only=True)
    return cache, logits[:, -1].float()


def decode(model, cache, token):
    """Appends one token per row (B,) to the cache; returns the next-token logits (B, V)."""
    logits, _ = model(token[:, None], cache=cache, last_only=True)
    return logits[:, -1].float()


def next_token_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """(B, V) logits -> (B, V) sampling distribution after temperature, top-k (0: off) and top-p (1: off)."""
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p < 1.0:  # keep the smallest set of most likely tokens whose mass reaches top_p
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # mass before this token already reaches top_p
        probs = probs.masked_fill(drop.scatter(-1, order, drop), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


@torch.no_grad()
def generate(model, prompts, max_new_tokens, eos_id, temperature=1.0, top_k=0, top_p=1.0, greedy=False,
             generator=None, use_cache=True, pad_id=None):
    """Batched generation for prompts (list of token lists) of different lengths.
    Returns (B, n) new tokens, n <= max_new_tokens: each row stops at its first EOS and is padded after it
    (pad_id, default eos_id). eos_id None never stops (benchmarks). use_cache=False recomputes the whole prefix
    every step (the reference the KV cache is tested against)."""
    pad_id = (eos_id if eos_id is not None else 0) if pad_id is None else pad_id
    device = next(model.parameters()).device
    idx, valid = left_pad(prompts, pad_id, device)
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if idx.size(1) + max_new_tokens > model.config.block_size:
        raise InputError(f"prompt ({idx.size(1)} tokens) + max_new_tokens ({max_new_tokens}) exceeds block_size "
                         f"{model.config.block_size}")
    if use_cache:
        cache, logits = prefill(model, idx, valid, max_new_tokens)
    else:
        logits = model(idx, valid=valid, last_only=True)[0][:, -1].float()
    B = idx.size(0)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        probs = next_token_probs(logits, temperature, top_k, top_p)  # (B, V)
        token = probs.argmax(-1) if greedy else torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)
        out[:, t] = torch.where(done, pad_id, token)
        if eos_id is not None:
            done |= token == eos_id
        if done.all() or t == max_new_tokens - 1:
            break
        if use_cache:
            logits = decode(model, cache, token)
        else:
            idx, valid = torch.cat([idx, token[:, None]], 1), torch.cat([valid, valid.new_ones(B, 1)], 1)
            logits = model(idx, valid=valid, last_only=True)[0][:, -1].float()
    return out[:, :t + 1]

# -----------------------------------------------------------------------------
# Rollouts (Algorithm 1, step 2): responses sampled from the teacher-mixed distribution (Eq. 4-5)
#     p_mix(y_t | y_<t, x) = alpha * p(y_t | y_<t, x) + (1 - alpha) * q(y_t | y_<t, x)
# with the student q and the teacher p stepped in lockstep, each with its own KV cache. alpha = 0 is pure student
# sampling; T = 1, no top-k, no top-p, as the paper samples.


@torch.no_grad()
def rollout(student, teacher, prompts, max_new_tokens, eos_id, alpha, generator=None):
    """Samples one response per prompt from p_mix. Returns a dict of (B, n) tensors, n <= max_new_tokens:
    tokens (padded with eos_id after each row's EOS), mask (True on response tokens, EOS included, False after),
    logq_old = log q_old(y_t) (the student at rollout time), logp = log p(y_t), log_pmix = log p_mix(y_t);
    and prompt_idx, prompt_valid: the left-padded prompts (B, Tp)."""
    device = next(student.parameters()).device
    idx, valid = left_pad(prompts, eos_id, device)
    V = student.config.vocab_size
    s_cache, s_logits = prefill(student, idx, valid, max_new_tokens)
    t_cache, t_logits = prefill(teacher, idx, valid, max_new_tokens)
    B = idx.size(0)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    steps = []
    for t in range(max_new_tokens):
        log_q = F.log_softmax(s_logits, -1)             # (B, V)
        log_p = F.log_softmax(t_logits[:, :V], -1)      # (B, V); a teacher padded past V is sliced
        p_mix = alpha * log_p.exp() + (1 - alpha) * log_q.exp()  # Eq. 4
        token = torch.multinomial(p_mix, 1, generator=generator)  # (B, 1)
        live = ~done
        steps.append((torch.where(live, token[:, 0], eos_id), live, log_q.gather(1, token)[:, 0],
                      log_p.gather(1, token)[:, 0], p_mix.gather(1, token)[:, 0].log()))
        done |= token[:, 0] == eos_id
        if done.all() or t == max_new_tokens - 1:
            break
        s_logits, t_logits = decode(student, s_cache, token[:, 0]), decode(teacher, t_cache, token[:, 0])
    tokens, mask, logq_old, logp, log_pmix = (torch.stack(x, 1) for x in zip(*steps))  # (B, n) each
    zero = torch.zeros((), device=device)
    return {"prompt_idx": idx, "prompt_valid": valid, "tokens": tokens, "mask": mask,
            # nothing after EOS or in padding may reach a reward, a return, an advantage or a loss:
            "logq_old": torch.where(mask, logq_old, zero), "logp": torch.where(mask, logp, zero),
            "log_pmix": torch.where(mask, log_pmix, zero)}


def response_logits(model, batch):
    """Logits (B, n, V) that predict each response token: one forward over prompt + response."""
    idx = torch.cat([batch["prompt_idx"], batch["tokens"]], 1)  # (B, Tp + n)
    valid = torch.cat([batch["prompt_valid"], torch.ones_like(batch["mask"])], 1)
    logits, _ = model(idx[:, :-1], valid=valid[:, :-1])  # position i predicts token i + 1
    Tp = batch["prompt_idx"].size(1)
    return logits[:, Tp - 1:]  # (B, n, V): the last prompt position predicts the first response token

# -----------------------------------------------------------------------------
# The MiniLLM objective (Eq. 7 with PPO clipping), per response token


def returns(r, mask, length_norm=True):
    """Long-term return R_{t+1} of the steps after t (Eq. 2; the paper's return excludes step t).
    length_norm (Eq. 6): R^Norm_{t+1} = mean of r_{t'} over the valid steps t' = t+1 .. T of the response
    (T - t terms, the number actually summed; 0 at the last step). Without it: the plain sum."""
    r = r * mask
    after = r.flip(1).cumsum(1).flip(1) - r  # (B, n): sum over t' > t
    count = mask.flip(1).cumsum(1).flip(1) - mask.long()  # (B, n): valid steps after t
    if not length_norm:
        return after * mask
    return torch.where(count > 0, after / count.clamp(min=1), 0.0) * mask


def minillm_terms(logq, kl, logq_old, advantage, w_single, w_long, clip_eps=0.2):
    """Per-token loss terms (B, n) whose gradient is Eq. 7's estimate of grad KL[q_theta || p]:
    single-step: w_t * KL(q_theta(.|y_<t) || p(.|y_<t)), the exact expectation over y_t (Eq. 3-4);
    long-term: PPO-clipped policy gradient, rho_t = q_theta(y_t) / q_old(y_t) * w_t = q_theta / p_mix,
               max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)) with A_t = R^Norm_{t+1} (no clipping: eps None).
    w_single and w_long are the importance weights q/p_mix (Eq. 5): in training both are the per-step ratio
    w_t = q_old(y_t) / p_mix(y_t); the estimator test passes exact sequence-level weights instead."""
    rho = torch.exp(logq - logq_old) * w_long
    long_term = -advantage * rho
    if clip_eps is not None:
        long_term = torch.max(long_term, -advantage * rho.clamp(1 - clip_eps, 1 + clip_eps))
    return w_single * kl, long_term

# -----------------------------------------------------------------------------
# Checkpoints: one file, written atomically, loaded without executing pickled code (weights_only=True)


def save_checkpoint(path, model, optimizer, step, args, tokenizer, best_val_loss):
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None,
            "config": asdict(model.config), "step": step, "args": vars(args) if args else {},
            "tokenizer": tokenizer, "best_val_loss": best_val_loss}
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: a crash leaves the previous checkpoint whole


def load_checkpoint(path, device="cpu"):
    """Returns (model, checkpoint dict). Refuses anything that is not a plain-tensor checkpoint of ours."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, or pickled objects weights_only refuses
        raise InputError(f"{path}: not a loadable checkpoint ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "tokenizer"} <= set(ckpt):
        raise InputError(f"{path}: not a minillm checkpoint (expected keys model, config, tokenizer)")
    model = GPT(GPTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device), ckpt

# -----------------------------------------------------------------------------
# Training: supervised fine-tuning (Algorithm 1, step 1). Cross-entropy on the response tokens only.


def make_optimizer(model, args):
    """AdamW (0.9, 0.95), weight decay on matrices only (nanoGPT)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))


def get_lr(step, args):
    """Linear warm-up to args.lr, then cosine decay to args.min_lr at args.max_steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def validation_loss(model, pairs, batch_size, device, ctx):
    """Token-weighted mean cross-entropy over the response tokens of every validation example."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(pairs), batch_size):
        x, y = data.collate(pairs[i:i + batch_size], pad_id=0)
        x, y = x.to(device), y.to(device)
        with ctx:
            logits, _ = model(x)
        n = (y != -100).sum().item()
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum").item()
        count += n
    model.train()
    return total / max(count, 1)


def logger(folder):
    """Returns log(line): prints the line and appends it to folder/log.txt."""
    def log(line):
        print(line, flush=True)
        with open(os.path.join(folder, "log.txt"), "a") as f:
            f.write(line + "\n")
    return log


def train(args):
    """Supervised fine-tuning. Writes best.pt (lowest validation loss) and last.pt into args.out.
    Returns the path of best.pt."""
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    os.makedirs(args.out, exist_ok=True)
    log = logger(args.out)
    log(f"# {' '.join(sys.argv)}\n# settings: {vars(args)}")

    # model: a named size from scratch, or continued from a checkpoint (--init)
    tokenizer = args.tokenizer if args.tokenizer != "auto" else "builtin" if args.data == "builtin" else "gpt2"
    if args.init:
        model, ckpt = load_checkpoint(args.init, device)
        if args.tokenizer != "auto" and ckpt["tokenizer"] != args.tokenizer:
            raise InputError(f"{args.init}: trained with tokenizer {ckpt['tokenizer']}, not --tokenizer {args.tokenizer}")
        tokenizer = ckpt["tokenizer"]
    enc = data.get_encoding(tokenizer)
    if not args.init:
        model = GPT(MODEL_SIZES[args.model](vocab_size=enc.n_vocab, dropout=args.dropout)).to(device)
    if model.config.vocab_size < enc.n_vocab:
        raise InputError(f"{args.init}: vocabulary of {model.config.vocab_size} tokens is smaller than the "
                              f"{tokenizer} tokenizer's {enc.n_vocab}")

    # data: prompt + response + EOS, prompt masked; prompts too long for the context dropped and counted
    template = "builtin" if args.data == "builtin" else "dolly"
    splits, skipped = data.load_instructions(args.data, args.n_train, args.n_valid, args.n_test, skip_bad=args.skip_bad)
    max_length = min(args.max_length, model.config.block_size)
    train_pairs, dropped = data.tokenize(splits["train"], enc, template, max_length, args.max_prompt_length)
    valid_pairs, dropped_v = data.tokenize(splits["valid"], enc, template, max_length, args.max_prompt_length)
    if skipped:
        log(f"skipped {len(skipped)} bad rows (--skip_bad), first: {skipped[0]}")
    log(f"data {args.data}: {len(train_pairs)} train / {len(valid_pairs)} valid examples "
        f"({dropped} / {dropped_v} dropped: prompt over {args.max_prompt_length} tokens)")
    if len(train_pairs) < args.batch_size:
        raise data.DataError(f"{args.data}: {len(train_pairs)} usable training examples, fewer than one batch "
                             f"of {args.batch_size}")

    optimizer = make_optimizer(model, args)
    log(f"model {args.init or args.model}: {model.num_params() / 1e6:.3f}M parameters, {model.config}")
    fwd = model
    if args.compile:
        log("compiling the model with torch.compile")
        fwd = torch.compile(model)

    best_path, last_path = os.path.join(args.out, "best.pt"), os.path.join(args.out, "last.pt")
    best_val, tokens, t_start = float("inf"), 0, time.time()
    train_iter = data.batches(train_pairs, args.batch_size, args.seed)
    for step in range(args.max_steps + 1):
        elapsed = time.time() - t_start
        out_of_time = args.max_minutes and elapsed > args.max_minutes * 60
        if step % args.eval_interval == 0 or step == args.max_steps or out_of_time:
            val = validation_loss(model, valid_pairs, 64, device, ctx)
            if not math.isfinite(val):
                raise FloatingPointError(f"step {step}: validation loss is {val}; stopping (lower --lr?)")
            if val < best_val:
                best_val = val
                save_checkpoint(best_path, model, optimizer, step, args, tokenizer, best_val)
            log(f"step {step:5d} | val loss {val:.4f} | best {best_val:.4f} | {elapsed:6.1f}s")
        if step == args.max_steps or out_of_time:
            break
        lr = get_lr(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        epoch, x, y = next(train_iter)
        x, y = x.to(device), y.to(device)
        with ctx:
            _, loss = fwd(x, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: training loss is {loss.item()}; stopping (lower --lr?)")
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += x.numel()
        if step % args.log_interval == 0:
            elapsed = time.time() - t_start
            steps_left = args.max_steps - step - 1
            eta = elapsed / (step + 1) * steps_left
            if args.max_minutes:
                eta = min(eta, args.max_minutes * 60 - elapsed)
            log(f"step {step:5d} | epoch {epoch} | loss {loss.item():.4f} | lr {lr:.2e} | "
                f"{tokens / elapsed:7.0f} tok/s | ETA {eta:5.0f}s")
    save_checkpoint(last_path, model, optimizer, step, args, tokenizer, best_val)
    log(f"done: {step} steps in {time.time() - t_start:.0f}s, best val loss {best_val:.4f} -> {best_path}")
    return best_path

# -----------------------------------------------------------------------------
# MiniLLM distillation (Algorithm 1, step 2): rollouts from p_mix, then ppo_epochs passes of mini-batches over them,
# each step on single-step + long-term + L_PT


@torch.no_grad()
def reverse_kl_k3(student, teacher, prompts, args, generator):
    """Sequence-level KL[q || p] estimated on pure student samples with k3 = p/q - 1 - log(p/q) per token."""
    was_training = student.training
    student.eval()
    b = rollout(student, teacher, prompts, args.max_new_tokens, args.eos_id, 0.0, generator)
    student.train(was_training)
    log_ratio = (b["logp"] - b["logq_old"]) * b["mask"]
    k3 = (log_ratio.exp() - 1 - log_ratio) * b["mask"]
    return k3.sum(1).mean().item(), b["mask"].sum(1).float().mean().item()


def pretrain_loss(student, teacher, x, y, kd_ratio, ctx):
    """L_PT: language modelling on the pretraining stream; kd_ratio mixes in soft cross-entropy to the teacher
    (the official code uses 0.5; the paper's L_PT is the pure LM loss, kd_ratio = 0)."""
    with ctx:
        logits, lm = student(x, y)
    if kd_ratio == 0:
        return lm
    with torch.no_grad(), ctx:
        p = F.softmax(teacher(x)[0][..., :logits.size(-1)].float(), -1)
    soft = -(p * F.log_softmax(logits.float(), -1)).sum(-1).mean()
    return (1 - kd_ratio) * lm + kd_ratio * soft


def distill(args):
    """MiniLLM: --teacher CKPT and --init STUDENT_CKPT; best.pt is the lowest validation reverse KL."""
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    if not args.teacher or not args.init:
        raise InputError("--method minillm needs --teacher CKPT and --init STUDENT_CKPT")
    teacher, t_ckpt = load_checkpoint(args.teacher, device)
    student, s_ckpt = load_checkpoint(args.init, device)
    teacher.eval()
    if t_ckpt["tokenizer"] != s_ckpt["tokenizer"]:
        raise InputError(f"{args.teacher}: tokenizer {t_ckpt['tokenizer']} differs from the student's "
                         f"{s_ckpt['tokenizer']} ({args.init})")
    if teacher.config.vocab_size < student.config.vocab_size:
        raise InputError(f"{args.teacher}: vocabulary {teacher.config.vocab_size} is smaller than the student's "
                         f"{student.config.vocab_size}")
    os.makedirs(args.out, exist_ok=True)
    log = logger(args.out)
    log(f"# {' '.join(sys.argv)}\n# settings: {vars(args)}")
    enc = data.get_encoding(s_ckpt["tokenizer"])
    args.eos_id = enc.eot_token
    template = "builtin" if args.data == "builtin" else "dolly"
    splits, _ = data.load_instructions(args.data, args.n_train, args.n_valid, args.n_test, skip_bad=args.skip_bad)
    longest = min(student.config.block_size, teacher.config.block_size) - args.max_new_tokens
    if longest < 1:
        raise InputError(f"--max_new_tokens {args.max_new_tokens} leaves no room for a prompt in block_size "
                         f"{student.config.block_size}")
    prompts = {s: [p for p in (enc.encode_ordinary(data.prompt_text(r, template)) for r in splits[s])
                   if len(p) <= min(args.max_prompt_length, longest)] for s in ("train", "valid")}
    log(f"{len(prompts['train'])} train / {len(prompts['valid'])} valid prompts (longer than "
        f"{min(args.max_prompt_length, longest)} tokens dropped)")
    pt_iter = data.pretrain_batches(args.pt_data, enc, args.batch_size, min(128, student.config.block_size),
                                    args.seed)
    optimizer = make_optimizer(student, args)
    if len(prompts["train"]) < args.rollout_size or not prompts["valid"]:
        raise data.DataError(f"{args.data}: {len(prompts['train'])} usable training prompts, fewer than "
                             f"--rollout_size {args.rollout_size} (or no validation prompts)")
    rng, gen = random.Random(args.seed), torch.Generator(device=device).manual_seed(args.seed)  # prompts, sampling
    shuffle = torch.Generator().manual_seed(args.seed)  # mini-batch order
    valid_prompts = prompts["valid"][:args.rollout_size]
    best, step, t_start, tokens, next_eval = float("inf"), 0, time.time(), 0, 0
    while True:
        if step >= next_eval or step >= args.max_steps:  # validation reverse KL, on fixed prompts and seed
            next_eval += args.eval_interval
            val, _ = reverse_kl_k3(student, teacher, valid_prompts, args, torch.Generator(device).manual_seed(0))
            if val < best:
                best = val
                save_checkpoint(os.path.join(args.out, "best.pt"), student, optimizer, step, args,
                                s_ckpt["tokenizer"], val)
            log(f"step {step:5d} | val reverse KL {val:.4f} | best {best:.4f} | {time.time() - t_start:6.1f}s")
        if step >= args.max_steps:
            break
        # 1. rollouts from p_mix with the student of now (q_old), rewards and advantages (no gradient)
        student.eval()
        batch = rollout(student, teacher, rng.sample(prompts["train"], args.rollout_size), args.max_new_tokens,
                        args.eos_id, args.alpha, gen)
        student.train()
        mask = batch["mask"]
        # the paper, where the official code differs (../shared/MINILLM.md section 5): the return excludes step t,
        # no discount, no advantage whitening or reward scaling, and w_t also weighs the single-step term
        r = batch["logp"] - batch["logq_old"]                    # r_t = log p(y_t) - log q_old(y_t)
        batch["A"] = returns(r, mask, args.length_norm)          # Eq. 6: R^Norm_{t+1}
        batch["w"] = torch.exp(batch["logq_old"] - batch["log_pmix"])  # Eq. 5: w_t = q_old(y_t) / p_mix(y_t)
        tokens += int(mask.sum())
        # 2. ppo_epochs passes over the rollouts in mini-batches (Algorithm 1)
        for _ in range(args.ppo_epochs):
            order = torch.randperm(args.rollout_size, generator=shuffle)
            for i in range(0, args.rollout_size, args.batch_size):
                rows = order[i:i + args.batch_size].to(device)
                mb = {k: v[rows] for k, v in batch.items()}
                mb_mask = mb["mask"]
                lr = get_lr(step, args)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with ctx:
                    logits_q = response_logits(student, mb)  # (b, n, V)
                    with torch.no_grad():
                        logits_p = response_logits(teacher, mb)[..., :logits_q.size(-1)]
                kl, logq, _ = kernels.reverse_kl(logits_q, logits_p, mb["tokens"].masked_fill(~mb_mask, -100))
                single, long_term = minillm_terms(logq, kl, mb["logq_old"], mb["A"], mb["w"], mb["w"], args.clip_eps)
                n_tok = mb_mask.sum().clamp(min=1)
                loss_single = (single * mb_mask).sum() / n_tok
                loss_long = (long_term * mb_mask).sum() / n_tok
                x, y = (t.to(device) for t in next(pt_iter))
                loss_pt = pretrain_loss(student, teacher, x, y, args.kd_ratio, ctx)
                loss = loss_single + loss_long + args.lm_coef * loss_pt
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"step {step}: loss is {loss.item()} (single {loss_single.item()}, "
                                             f"long {loss_long.item()}, L_PT {loss_pt.item()}); stopping")
                loss.backward()
                if args.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if step % args.log_interval == 0:
                    rho = torch.exp(logq.detach() - mb["logq_old"]) * mb["w"]
                    clipped = (((rho - 1).abs() > args.clip_eps) & mb_mask).sum() / n_tok
                    rkl, length = reverse_kl_k3(student, teacher, valid_prompts[:16], args, gen)
                    elapsed = time.time() - t_start
                    log(f"step {step:5d} | rkl {rkl:.4f} | reward {(r * mask).sum().item() / mask.sum().item():+.4f} | "
                        f"single {loss_single.item():.4f} | long {loss_long.item():+.4f} | L_PT {loss_pt.item():.4f} | "
                        f"clip {clipped.item():.2f} | w {(mb['w'] * mb_mask).sum().item() / n_tok.item():.3f} | "
                        f"len {length:.1f} | lr {lr:.2e} | {tokens / elapsed:6.0f} tok/s | "
                        f"ETA {elapsed / (step + 1) * (args.max_steps - step - 1):5.0f}s")
                step += 1
                if step >= args.max_steps:
                    break
            if step >= args.max_steps:
                break
    save_checkpoint(os.path.join(args.out, "last.pt"), student, optimizer, step, args, s_ckpt["tokenizer"], best)
    log(f"done: {step} steps in {time.time() - t_start:.0f}s, best validation reverse KL {best:.4f}")
    return os.path.join(args.out, "best.pt")

# -----------------------------------------------------------------------------
# Evaluation on the built-in task: validity (data.is_valid) per family


@torch.no_grad()
def validity(model, enc, rows, greedy=True, seed=0, batch_size=128, max_new_tokens=96):
    """Fraction of valid responses per family (and 'all'); generation as the paper evaluates (T = 1, top-p 1)
    unless greedy."""
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    max_new_tokens = min(max_new_tokens, model.config.block_size - 32)
    hits = {}
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        prompts = [enc.encode_ordinary(data.prompt_text(r, "builtin")) for r in chunk]
        out = generate(model, prompts, max_new_tokens, enc.eot_token, greedy=greedy, generator=gen)
        for r, toks in zip(chunk, out.tolist()):
            text = enc.decode([t for t in toks if t != enc.eot_token])
            hits.setdefault(r["category"], []).append(data.is_valid(r, text))
    scores = {f: sum(h) / len(h) for f, h in hits.items()}
    scores["all"] = sum(sum(h) for h in hits.values()) / len(rows)
    return scores

# -----------------------------------------------------------------------------
# Benchmark: generation with the KV cache vs recomputing the whole prefix at every step


def bench_generation(args):
    device = pick_device(args.device)
    enc = data.get_encoding("builtin")
    torch.manual_seed(0)
    # random weights: the cost does not depend on them, and with eos_id=None every row runs all 128 tokens
    model = GPT(MODEL_SIZES["teacher"](vocab_size=enc.n_vocab)).to(device).eval()
    rows = data.make_builtin(0, 0, 64)["test"]
    prompts = [enc.encode_ordinary(data.prompt_text(r, "builtin")) for r in rows]
    print(f"teacher {model.num_params() / 1e6:.2f}M parameters, {len(prompts)} prompts of "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens, 128 new tokens each, device {device}")
    times = {}
    for use_cache in (True, False):
        best = float("inf")
        for _ in range(3):
            t0 = time.time()
            out = generate(model, prompts, 128, None, greedy=True, use_cache=use_cache)
            best = min(best, time.time() - t0)
        times[use_cache] = best
        print(f"{'KV cache' if use_cache else 'recompute':<10} {best:7.2f}s  {out.numel() / best:8.0f} tokens/s")
    print(f"speedup {times[False] / times[True]:.1f}x")

# -----------------------------------------------------------------------------
# main


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA GPU is available")
    return torch.device(name)


def builtin_default(args):
    """`python minillm.py`: the teacher and the SFT student on the built-in task (reused from earlier runs in
    args.out if there), then their validity on the test split."""
    runs = {}
    # peak learning rates: for the student, 1e-2 beat 3e-3 and 3e-2 (validation loss after 15,000 steps)
    for name, steps, lr in (("teacher", args.teacher_steps, 2e-3), ("student", args.student_steps, 1e-2)):
        folder = os.path.join(args.out, name if name == "teacher" else "student-sft")
        path = os.path.join(folder, "best.pt")
        if os.path.isfile(path):
            print(f"reusing {path}")
        else:
            t0 = time.time()
            run = argparse.Namespace(**{**vars(args), "method": "sft", "model": name, "out": folder,
                                        "max_steps": steps, "lr": lr, "min_lr": lr / 10})
            train(run)
            print(f"{name} trained in {time.time() - t0:.0f}s")
        runs[name] = path
    enc = data.get_encoding("builtin")
    test = data.load_instructions("builtin", args.n_train, args.n_valid, args.n_test)[0]["test"]
    print(f"\nvalidity on the built-in test split ({len(test)} prompts; greedy, and sampled at T = 1 as the paper "
          f"evaluates)")
    print(f"{'model':<9}{'decoding':>9}{'params':>9}{'val loss':>9}" + "".join(f"{f:>8}" for f in data.FAMILIES + ["all"]))
    for name, path in runs.items():
        model, ckpt = load_checkpoint(path, pick_device(args.device))
        for greedy in (True, False):
            v = validity(model, enc, test, greedy=greedy)
            print(f"{name:<9}{'greedy' if greedy else 'sampled':>9}{model.num_params() / 1e6:8.3f}M"
                  f"{ckpt['best_val_loss']:9.3f}" + "".join(f"{v[f]:8.1%}" for f in data.FAMILIES + ["all"]))


def get_args(argv=None):
    ap = argparse.ArgumentParser(description="MiniLLM distillation (see the docstring of minillm.py)")
    # what to run
    ap.add_argument("--method", choices=["sft", "minillm"],
                    help="sft: supervised fine-tuning; minillm: distillation (default: the built-in pipeline)")
    ap.add_argument("--teacher", help="minillm: the teacher checkpoint")
    ap.add_argument("--model", default="student", choices=sorted(MODEL_SIZES), help="size to train from scratch")
    ap.add_argument("--init", help="start from this checkpoint instead of a fresh --model")
    ap.add_argument("--out", default="out", help="run folder: log.txt, best.pt, last.pt")
    ap.add_argument("--bench", choices=["generate"], help="run a benchmark instead of training")
    # data
    ap.add_argument("--data", default="builtin", help="builtin | dolly | a .jsonl/.json file | a folder")
    ap.add_argument("--n_train", type=int, default=100000, help="built-in task: training examples")
    ap.add_argument("--n_valid", type=int, default=500, help="built-in task: validation examples (or PATH split)")
    ap.add_argument("--n_test", type=int, default=500, help="built-in task: test examples (or PATH split)")
    ap.add_argument("--max_length", type=int, default=512, help="prompt + response tokens (the paper: 512)")
    ap.add_argument("--max_prompt_length", type=int, default=256, help="longer prompts are dropped (paper: 256)")
    ap.add_argument("--tokenizer", default="auto", help="auto (builtin for --data builtin, else gpt2) | builtin | gpt2")
    ap.add_argument("--skip_bad", action="store_true", help="skip and count malformed data rows instead of stopping")
    ap.add_argument("--pt_data", default="builtin", help="minillm: L_PT text: builtin | openwebtext | a .txt/.jsonl")
    # MiniLLM (the paper's GPT-2 values in brackets)
    ap.add_argument("--alpha", type=float, default=0.2, help="teacher share of the sampling mixture p_mix [0.2]")
    ap.add_argument("--rollout_size", type=int, default=64, help="responses sampled per round [256]")
    ap.add_argument("--ppo_epochs", type=int, default=4, help="passes over each round's rollouts [4]")
    ap.add_argument("--clip_eps", type=float, default=0.2, help="PPO clipping of rho = q_theta / p_mix [0.2]")
    ap.add_argument("--max_new_tokens", type=int, default=96, help="longest response sampled [256]")
    ap.add_argument("--no_length_norm", dest="length_norm", action="store_false",
                    help="use the plain sum R_{t+1} instead of the mean (Eq. 6) [on]")
    ap.add_argument("--lm_coef", type=float, default=1.0, help="weight of L_PT [1]")
    ap.add_argument("--kd_ratio", type=float, default=0.0, help="soft cross-entropy share of L_PT [official code 0.5]")
    # optimization
    ap.add_argument("--max_steps", type=int, default=2000)
    ap.add_argument("--max_minutes", type=float, default=0, help="also stop after this much wall-clock time (0: off)")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (the built-in pipeline sets its own)")
    ap.add_argument("--min_lr", type=float, default=1e-4, help="learning rate at the end of the cosine decay")
    ap.add_argument("--warmup_steps", type=int, default=100)
    ap.add_argument("--weight_decay", type=float, default=0.01)
    ap.add_argument("--dropout", type=float, default=0.0, help="dropout of a model trained from scratch")
    ap.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm (0: off)")
    # the built-in default pipeline
    ap.add_argument("--teacher_steps", type=int, default=7000, help="built-in default: teacher SFT steps")
    ap.add_argument("--student_steps", type=int, default=15000, help="built-in default: student SFT steps")
    # bookkeeping
    ap.add_argument("--eval_interval", type=int, default=500, help="steps between validation losses")
    ap.add_argument("--log_interval", type=int, default=250)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu) | cpu | cuda | mps")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (off by default)")
    return ap.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    try:
        if args.bench == "generate":
            bench_generation(args)
        elif args.method == "sft":
            train(args)
        elif args.method == "minillm":
            distill(args)
        else:
            builtin_default(args)
    except (data.DataError, InputError, FloatingPointError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
