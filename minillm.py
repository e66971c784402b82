"""
MiniLLM: knowledge distillation of a small GPT student q_theta from a larger GPT teacher p by minimizing the
reverse KL divergence with a policy gradient (Gu, Dong, Wei, Huang, "MiniLLM: Knowledge Distillation of Large
Language Models", ICLR 2024), in one file that reads top to bottom.

    python minillm.py                                  # Algorithm 1 end to end on the built-in task, and the comparison
    python minillm.py --teacher CKPT [--init STUDENT_CKPT]         # the same with your teacher (and SFT student)
    python minillm.py --method sft --model student --out out/student-sft    # supervised fine-tuning (stage 1)
    python minillm.py --method minillm --teacher out/teacher/best.pt --init out/student-sft/best.pt --out out/minillm
    python minillm.py --method kd|seqkd|onpolicy --teacher ... --init ... --out out/kd   # the baselines, the same loop
    torchrun --nproc_per_node=N minillm.py --method ...            # any method on N processes (DDP)
    python minillm.py ... --resume                                 # go on after a crash, SIGTERM or Ctrl-C, exactly
    python minillm.py --teacher Qwen/Qwen2.5-1.5B-Instruct --init Qwen/Qwen2.5-0.5B-Instruct --data dolly \
        --pt_data openwebtext       # Hugging Face checkpoints: gpt2, opt, llama, mistral, qwen2, qwen3 (README)

The method, from Eq. 1 to Eq. 7. Knowledge distillation usually minimizes the forward KL[p || q_theta] on given
text: wherever the teacher p puts mass the student q_theta must too, so a small student spreads itself over
everything the teacher might say, including what it cannot say well. MiniLLM minimizes the reverse KL at the
sequence level, on the student's own samples: the student is punished for saying what the teacher would not, and
may leave out what it cannot say well (mode seeking):

    L(theta) = KL[q_theta || p] = - E_{x ~ D, y ~ q_theta(.|x)} log( p(y|x) / q_theta(y|x) )                 (Eq. 1)

1. A policy gradient (Eq. 2). The samples y depend on theta, so the gradient goes through log q_theta (REINFORCE):
   the student is the policy, and each token earns the reward r_t = log p(y_t|y_<t,x) - log q_theta(y_t|y_<t,x),
   whose sum over t is the log-ratio inside Eq. 1. A token can only change the rewards from its own step on, so
       grad L = - E_{x, y ~ q_theta} sum_t (R_t - 1) grad log q_theta(y_t|y_<t,x),   R_t = sum_{t' >= t} r_t'  (Eq. 2)
   (the -1, from the log q_theta inside r_t, has expectation 0 and is dropped). Unbiased, but R_t sums T - t + 1
   sampled rewards: the estimate is noisy.
2. Its variance: the single-step term (Eq. 3). Split R_t = r_t + R_{t+1}. The first part depends on y_t alone, whose
   distribution q_theta(.|y_<t,x) is known, so its expectation is a sum over the vocabulary, taken exactly instead of
   sampled: sum_{y'} q_theta(y') log(p(y') / q_theta(y')) = -KL_t, with KL_t = KL(q_theta(.|y_<t,x) || p(.|y_<t,x)).
   Then grad L = E sum_t [ grad KL_t - R_{t+1} grad log q_theta(y_t) ]: a dense, exact signal at every step (the
   token-level reverse KL), plus a long-term term for what y_t does to the later tokens, whose return R_{t+1}
   excludes step t.
3. Reward hacking: teacher-mixed sampling (Eq. 4-5). A small student early in training samples degenerate responses
   (repeated phrases, say) that the teacher happens to score well, and the policy gradient reinforces them. So each
   token is sampled from p_mix = alpha p + (1 - alpha) q_theta (alpha = 0.2), which keeps rollouts near text the
   teacher would write, and the expectation is corrected by importance weights. The exact weight, the product of
   q_theta / p_mix over steps 1..t, has too much variance; the per-step w_t = q_theta(y_t|.) / p_mix(y_t|.) is used.
4. The bias toward short responses: length normalization (Eq. 6). Each r_t is on average -KL_t < 0, so the sum
   R_{t+1} is more negative the more tokens follow, and the policy gradient learns to stop early. The mean of the
   later rewards removes that: R^Norm_{t+1} = R_{t+1} / (T - t), over the T - t steps t+1..T.
Together (Eq. 7; . = y_<t, x):

    grad L = - E_{x, y ~ p_mix} sum_t w_t [ grad sum_{y' in V} q_theta(y'|.) log( p(y'|.) / q_theta(y'|.) )
                                            + R^Norm_{t+1} grad log q_theta(y_t|.) ]
           =   E_{x, y ~ p_mix} sum_t w_t [ grad KL_t - R^Norm_{t+1} grad log q_theta(y_t|.) ]

In code (minillm_terms, minillm_loss): w_t KL_t plus the long-term term -w_t R^Norm_{t+1} q_theta(y_t)/q_old(y_t),
whose gradient at q_theta = q_old is -w_t R^Norm_{t+1} grad log q_theta(y_t); both averaged over the response tokens
of a mini-batch, as the official code does, rather than summed over t and averaged over responses: the same
direction for each mini-batch, scaled by 1 / (its mean response length), so that the step size does not grow with
the responses' length. Why a fused kernel (kernels.py): KL_t needs both models' log-softmax over the whole
vocabulary at every response token, (b, n, V) tensors (a GPT-2 vocabulary: 50,257 floats a token); done with
PyTorch ops that is several passes and (b, n, V) temporaries kept for the backward; the kernel reads each row of
logits once, and its backward recomputes the gradient q_j (log q_j - log p_j - KL_t) from them.

Algorithm 1: (1) fine-tune the student on the instruction data (SFT), keeping the checkpoint with the lowest
validation loss; (2) repeat: roll out a round of responses from p_mix, score it once with q_old, the student that
sampled it (r_t, R^Norm_{t+1}, w_t), and take PPO-style steps over mini-batches of the round on Eq. 7 (the long-term
term's ratio q_theta / p_mix clipped to 1 +- eps) plus the language-modelling loss L_PT on pretraining text.

This file: settings, model, rollouts, scoring, loss, baselines and L_PT, rollout buffer, validation, optimizer,
train(), Algorithm 1 end to end, main(); below main, under a ruler, what a first reading can skip. data.py holds the
data and tokenizers, kernels.py the fused kernel, eval.py the evaluation and benchmarks.

What this version changes (relative to the paper and its official code):
- Where the official code departs from the paper (RECIPES: the return includes step t and is discounted, rewards
  are scaled and clipped, advantages whitened, no w_t on the single-step term; and its L_PT is half distillation,
  --kd_ratio 0.5), this follows the paper; --recipe official gives the official code's loss.
- The teacher's logits are recomputed for each mini-batch, not stored with the rollouts (memory over time).
- A drift guard on PPO's reuse of a round (--target_kl, default 0.001; not in the paper; PPO's early stop on a
  target KL): at the end of a pass, once the mean kl_old (how far q_theta has moved from q_old) of the round's
  mini-batches passes 1.5x the target, the round's remaining passes are skipped. It acts where rounds are reused
  (--ppo_epochs above 1: on your data, and --method minillm typed alone); chosen on validation (eval.py --guard).
- The built-in task (data.py) is a small generated instruction world that runs on a 2-core CPU in minutes. There
  the distilled checkpoint is chosen by the validity of sampled validation responses (elsewhere, as in the paper, by
  validation Rouge-L), and the pipeline's MiniLLM stage (CHOSEN) runs one pass over rounds of 64 in mini-batches of
  32 at lr 3e-3 with L_PT off, where the paper has 4 passes over rounds of 256 and L_PT: chosen on validation
  (eval.py --sweep: one pass scored above four in 22 of 24 paired settings), and L_PT on a text the 0.033M student
  never learned cost it validity at every weight tried (docs/results.md).
"""
import argparse
import difflib
import functools
import itertools
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import sys
import time
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import data
import kernels

# -----------------------------------------------------------------------------
# Settings: the model's shape, the sizes by name, and MiniLLM's options


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # rows of the token embedding (GPT-2: 50257; may exceed the tokenizer's tokens)
    block_size: int = 1024   # longest sequence: the position table (learned) or the checkpoint's limit (rotary)
    n_layer: int = 12        # transformer blocks
    n_head: int = 12         # attention heads per block
    n_embd: int = 768        # width of the residual stream
    dropout: float = 0.0     # dropout on attention weights and residual branches (0 for fine-tuning)
    bias: bool = True        # biases in every Linear and LayerNorm, as GPT-2 and OPT have
    # The other families in a few fields (the defaults are GPT-2); from_pretrained sets them from config.json.
    model_type: str = "gpt2"    # the Hugging Face family: gpt2, opt, llama, mistral, qwen2, qwen3 (names the export)
    norm: str = "layernorm"     # layernorm (GPT-2, OPT) or rmsnorm (Llama, Mistral, Qwen)
    norm_eps: float = 1e-5
    pos: str = "learned"        # learned: a table of position embeddings (GPT-2, OPT); rope: rotary (the others)
    pos_offset: int = 0         # learned: OPT's table starts 2 rows in
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()    # Llama-3's: (factor, low_freq_factor, high_freq_factor, original context length)
    mlp: str = "gelu"           # gelu (GPT-2's tanh form), relu (OPT), swiglu: silu(x W_gate) * x W_up (the others)
    n_inner: int = 0            # MLP width; 0: 4 * n_embd
    n_kv_head: int = 0          # key/value heads, shared by n_head / n_kv_head query heads each (GQA); 0: n_head
    head_dim: int = 0           # 0: n_embd // n_head (Qwen3 and some Mistral models set their own)
    qkv_bias: bool = False      # biases on q, k and v only (Qwen2)
    qk_norm: bool = False       # RMSNorm of every head's q and k before the rotation (Qwen3)
    tie_embeddings: bool = True  # lm_head is the token embedding (GPT-2, OPT, small Llama and Qwen models)
    n_vocab: int = 0            # the tokenizer's tokens; embedding rows past them (padding) are never predicted;
                                # 0: vocab_size

    @property
    def kv_heads(self):  # key/value heads (n_kv_head, 0 meaning n_head)
        return self.n_kv_head or self.n_head

    @property
    def head_size(self):  # width of one head (head_dim, 0 meaning n_embd / n_head)
        return self.head_dim or self.n_embd // self.n_head

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

# MiniLLM's options (Algorithm 1, step 2), each --name on the command line: (the paper's value, with a GPT-2 XL
# teacher on Dolly; this version's default, sized for the built-in task on a CPU; what it sets).
MINILLM_OPTIONS = {
    "alpha": (0.2, 0.2, "teacher share of the sampling mixture p_mix (Eq. 4); 0: pure student samples"),
    "rollout_size": (256, 64, "responses rolled out per round (onpolicy: default --batch_size, a fresh round "
                              "every step)"),
    "ppo_epochs": (4, 4, "passes over each round's rollouts, in mini-batches of --batch_size (onpolicy: default 1)"),
    "target_kl": (0.0, 0.001, "drift guard on PPO's reuse: once the mean kl_old of a round's mini-batches so far "
                              "passes 1.5x this, the round's remaining passes are skipped and a new round is rolled "
                              "out (0: off; the paper has none)"),
    "clip_eps": (0.2, 0.2, "PPO clipping of the ratio rho_t = q_theta(y_t) / p_mix(y_t)"),
    "max_new_tokens": (256, 96, "longest response sampled"),
    "length_norm": (True, True, "the long-term return is the mean of the later rewards (Eq. 6); "
                                "--no_length_norm: their sum (ablation)"),
    "single_step": (True, True, "the single-step term (Eq. 3); --no_single_step: none, and the long-term term "
                                "uses R_t, step t included (Eq. 2; ablation)"),
    "long_term": (True, True, "the long-term term of Eq. 7; --no_long_term: the single-step term alone, on MiniLLM's "
                              "own rollouts (ablation)"),
    "lm_coef": (1.0, None, "weight of L_PT (default: 1 for minillm, 0 for the other methods)"),
    "kd_ratio": (0.5, None, "kd, seqkd: the forward-KL share of the loss (default 0.5); minillm: the soft "
                            "cross-entropy share of L_PT (default: 0, the paper's pure LM loss; --recipe official: "
                            "0.5)"),
}

# The two recipes of MiniLLM's loss: `paper` is Eq. 7 as the paper writes it (the default), `official` the loss of
# the official code (microsoft/LMOps, minillm/minillm/), which differs from Eq. 7 by these switches (and its L_PT by
# --kd_ratio 0.5, MINILLM_OPTIONS). --recipe sets them all; a typed switch (--gamma 1, --no_whiten, ...) wins. Each
# is used where it acts: score_round (the first four) and minillm_loss (the last two). (paper, official, what, where)
RECIPES = {
    "include_t": (False, True, "the long-term return includes step t: R_t / (T - t + 1) instead of R^Norm_{t+1} "
                               "(losses.py 39-49: rw_t = r_t + gamma rw_{t+1}, divided by the valid steps from t on)"),
    "gamma": (1.0, 0.95, "discount of the long-term return (losses.py 45; 0.95 in the official scripts)"),
    "reward_scaling": (1.0, 0.5, "the rewards r_t are divided by this (sampler.py run_sample: rewards / "
                                 "reward_scaling)"),
    "reward_clip": (0.0, 100.0, "the rewards are clipped to +-this, 0: not (sampler.py run_sample: cliprange_reward)"),
    "whiten": (False, True, "the advantages whitened per mini-batch over every entry of the (b, max_new_tokens) "
                            "response tensor, its padding's zeros included (losses.py 53, utils.py whiten)"),
    "w_single": (True, False, "the single-step term weighted by w_t, as Eq. 7 (losses.py 98-108: the official "
                              "single-step term has no w_t)"),
}

# -----------------------------------------------------------------------------
# The model: GPT-2 (Radford et al. 2019) with the parameter names of Hugging Face's GPT2LMHeadModel. The fields
# after `bias` in GPTConfig turn the same code into OPT, Llama, Mistral, Qwen2 or Qwen3; a first reading can take
# their defaults (GPT-2) and skip every `if` on them (their RMSNorm and rotary positions are below main()).


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.n_kv_head = config.kv_heads  # grouped-query attention: fewer key/value heads than query heads
        self.head_dim = config.head_size
        q, kv = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.sizes = [q, kv, kv]
        self.c_attn = nn.Linear(config.n_embd, q + 2 * kv, bias=config.bias or config.qkv_bias)  # q, k, v projections
        self.c_proj = nn.Linear(q, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        if config.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.head_dim, config.norm_eps), RMSNorm(self.head_dim, config.norm_eps)

    def forward(self, x, mask, kv, rope):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.sizes, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k, v = (t.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2) for t in (k, v))  # (B, H_kv, T, hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        if kv is not None:  # KV cache: write this step's keys and values, attend over everything so far
            k_cache, v_cache, start = kv  # (B, H_kv, T_max, hd) each
            if torch.is_tensor(start):  # a static cache (the fast decode): write at the slot, attend over all of it
                k_cache.index_copy_(2, start, k.to(k_cache.dtype))  # (the slots not written yet are masked;
                v_cache.index_copy_(2, start, v.to(v_cache.dtype))  # under autocast the cache is bf16)
                k, v = k_cache, v_cache
            else:
                k_cache[:, :, start:start + T], v_cache[:, :, start:start + T] = k, v
                k, v = k_cache[:, :, :start + T], v_cache[:, :, :start + T]  # (B, H_kv, S, hd), S = start + T
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # (B, T, H * hd): heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.kind, n_inner = config.mlp, config.n_inner or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, 2 * n_inner if self.kind == "swiglu" else n_inner, bias=config.bias)
        self.c_proj = nn.Linear(n_inner, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.kind == "swiglu":  # gate and up projections side by side in c_fc
            gate, up = h.chunk(2, -1)
            h = F.silu(gate) * up
        else:
            h = F.relu(h) if self.kind == "relu" else F.gelu(h, approximate="tanh")  # GPT-2's gelu
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, mask, kv, rope):
        x = x + self.attn(self.ln_1(x), mask, kv, rope)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        learned = config.pos == "learned"  # a table of position embeddings (rotary positions have no weights)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding
            **({"wpe": nn.Embedding(config.block_size + config.pos_offset, config.n_embd)} if learned else {}),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=norm(config, config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
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
        return sum(p.numel() for p in self.parameters())  # wte counted once when lm_head shares it

    def head_weight(self):
        """lm_head's rows for the tokenizer's tokens: (V, C). Embedding rows past them (a checkpoint's padding,
        e.g. Qwen2.5-0.5B's 151,936 rows for 151,665 tokens) are never predicted, so logits have V columns."""
        return self.lm_head.weight[:self.config.n_vocab or self.config.vocab_size]

    def forward(self, idx, targets=None, valid=None, cache=None, last_only=False, hidden=False, at=None):
        """idx (B, T) token ids. Returns (out, loss); the ways it is called:
            model(x, targets=y)        training: out = logits (N, V) at the N targets of y (-100: no target),
                                       loss = their mean cross-entropy
            model(idx)                 out = logits (B, T, V), loss None; right padding only, plain causal attention
            model(idx, valid=valid)    rows left-padded: valid (B, T) is False on the padding, which is never
                                       attended to, and positions count real tokens only
            model(idx, cache=cache)    idx goes after what the KV cache (new_cache) holds: prefill, then decode
            last_only=True             out = logits of the last position only, (B, 1, V)
            hidden=True                out = the final hidden states (B, T, C) instead of logits (for losses that
                                       apply head_weight() themselves, a chunk at a time)
            at=keep                    out only at the N positions where keep (B, T) is True: (N, V) or (N, C)"""
        B, T = idx.shape
        static = cache is not None and "slot" in cache  # the fast decode (fast_decode): the slot is a tensor
        start = cache["slot"] if static else 0 if cache is None else cache["len"]  # slots already in the cache
        if not static and start + T > self.config.block_size:  # (a position never exceeds its slot)
            raise InputError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        if cache is None and valid is None:  # training: right padding only, plain causal attention
            pos, mask = torch.arange(T, device=idx.device), None
        elif static:  # one token per row at the slot; every slot of the cache is a key, the empty ones masked
            cache["valid"].index_fill_(1, start, True)
            pos = cache["valid"].long().sum(1, keepdim=True) - 1  # (B, 1) position among real tokens
            mask = cache["valid"][:, None, None, :]  # (B, 1, 1, T_max)
        else:
            if cache is not None:
                cache["valid"][:, start:start + T] = True if valid is None else valid
                valid = cache["valid"][:, :start + T]  # (B, S) over every slot so far
            pos = (valid.long().cumsum(1) - 1).clamp(min=0)[:, start:]  # (B, T) position among real tokens
            q_slot = torch.arange(start, start + T, device=idx.device)[:, None]  # (T, 1)
            k_slot = torch.arange(start + T, device=idx.device)[None, :]         # (1, S)
            mask = (k_slot <= q_slot) & valid[:, None, :]  # (B, T, S) causal, and never a padding key
            mask = (mask | (k_slot == q_slot))[:, None]    # (B, 1, T, S): a padding query sees itself, so no NaN
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.pos == "learned":
            x = x + self.transformer.wpe(pos + self.config.pos_offset)
        else:  # rotary: q and k turned by angles of their positions in every block; (B, 1, T, hd) or (T, hd)
            rope = tuple(a if a.dim() == 2 else a[:, None] for a in rope_angles(self.config, pos, x.dtype))
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, None if cache is None else (cache["k"][i], cache["v"][i], start), rope)
        if static:
            cache["slot"].add_(1)
        elif cache is not None:
            cache["len"] += T
        x = self.transformer.ln_f(x)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        keep = targets != -100 if targets is not None else at  # (B, T): a loss needs logits only at its N tokens
        if keep is not None:
            x = x[keep]  # (N, C)
        if hidden:
            return x, None
        logits = F.linear(x, self.head_weight())  # (N, V), or (B, T, V)
        return logits, None if targets is None else F.cross_entropy(logits.float(), targets[keep])

# -----------------------------------------------------------------------------
# Generation with a KV cache. prefill() and decode() are separate so that two models (student q and teacher p)
# can be stepped in lockstep and their next-token distributions combined before sampling, as MiniLLM's
# teacher-mixed sampling needs: p_mix = alpha * p + (1 - alpha) * q at every step.


def new_cache(model, batch_size, max_len, device):
    """Per-layer keys and values (n_layer, B, H_kv, max_len, hd), which slots hold real tokens, and the fill level."""
    shape, dtype = cache_layout(model, batch_size, max_len, device)
    return {"k": torch.zeros(shape, dtype=dtype, device=device), "v": torch.zeros(shape, dtype=dtype, device=device),
            "valid": torch.zeros(batch_size, max_len, dtype=torch.bool, device=device), "len": 0}


def prefill(model, idx, valid, max_new_tokens, fast=False):
    """Runs the prompts through the model once; returns (cache, next-token logits (B, V)). fast: the model's static
    cache (fast_decode, below main())."""
    B, max_len = idx.size(0), idx.size(1) + max_new_tokens
    cache = static_cache(model, B, max_len, idx.device) if fast else new_cache(model, B, max_len, idx.device)
    logits, _ = model(idx, valid=valid, cache=cache, last_only=True)
    if fast:  # from here on the slot to write is a tensor
        cache["slot"] = STATIC_CACHES[model]["slot"].fill_(cache["len"])
    return cache, logits[:, -1].float()


def decode(model, cache, token):
    """Appends one token per row (B,) to the cache; returns the next-token logits (B, V)."""
    logits, _ = model(token[:, None], cache=cache, last_only=True)
    return logits[:, -1].float()

def sample(probs, generator=None, u=None):
    """One token per row of probs (B, V) -> (B, 1): the first whose cumulative probability passes a uniform draw
    (the distribution of torch.multinomial, 30x faster on a CPU). Never a token of probability 0. u: the draws
    (B, 1), if made by the caller."""
    cdf = probs.cumsum(-1)  # (B, V)
    if u is None:
        u = torch.rand(probs.size(0), 1, generator=generator, device=probs.device, dtype=cdf.dtype)  # in [0, 1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # u * total < total: an index below V


# -----------------------------------------------------------------------------
# Teacher-mixed rollouts (Algorithm 1, step 2): responses sampled from
#     p_mix(y_t | y_<t, x) = alpha * p(y_t | y_<t, x) + (1 - alpha) * q(y_t | y_<t, x)                    (Eq. 4)
# with the student q and the teacher p stepped in lockstep, each with its own KV cache. alpha = 0 is pure student
# sampling; T = 1, no top-k, no top-p, as the paper samples.


@torch.no_grad()
def rollout(student, teacher, prompts, max_new_tokens, eos_id, alpha, generator=None, fast=False, compact=True):
    """Samples one response per prompt from p_mix. Returns a dict of (B, n) tensors, n <= max_new_tokens:
    tokens (padded with eos_id after each row's EOS), mask (True on response tokens, EOS included, False after),
    logq_old = log q_old(y_t) (the student at rollout time), logp = log p(y_t), log_pmix = log p_mix(y_t); and
    prompt_idx, prompt_valid: the left-padded prompts (B, Tp). teacher None (alpha 0): pure student samples, logp =
    log q_old (on-policy distillation scores them later). fast: fast_decode. compact: rows that ended leave the
    caches once they are half of them (the same samples: the draws are made for every row)."""
    device = next(student.parameters()).device
    if fast and teacher is student:  # (each model has one static cache)
        raise InputError("rollout(fast=True) needs a teacher other than the student")
    idx, valid = left_pad(prompts, eos_id, device)
    s_cache, s_logits = prefill(student, idx, valid, max_new_tokens, fast)
    t_cache, t_logits = prefill(teacher, idx, valid, max_new_tokens, fast) if teacher is not None else (None, None)
    step = fast_decode if fast else decode
    B = idx.size(0)
    compact = compact and not fast and not is_sharded(teacher)  # (a static cache keeps its shape, and a sharded
    rows = torch.arange(B, device=device)  # the rows the caches hold    # teacher steps every process's rows together)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    steps = []
    for t in range(max_new_tokens):
        if is_sharded(teacher) and done.all():  # the other processes' rows are not done, and it steps with them
            token = picked = torch.full((B, 1), eos_id, device=device)
        else:
            log_q = F.log_softmax(s_logits, -1)             # (b, V): the b rows in the caches
            log_p = log_q if teacher is None else F.log_softmax(t_logits, -1)  # (b, V)
            p_mix = alpha * log_p.exp() + (1 - alpha) * log_q.exp()  # Eq. 4
            picked = sample(p_mix, u=torch.rand(B, 1, generator=generator, device=device)[rows])  # (b, 1)
            token = torch.full((B, 1), eos_id, device=device).index_copy_(0, rows, picked)  # (B, 1)
            live, at = ~done, lambda x: torch.zeros(B, device=device).index_copy_(0, rows, x.gather(1, picked)[:, 0])
            steps.append((torch.where(live, token[:, 0], eos_id), live, at(log_q), at(log_p), at(p_mix).log()))
            done |= token[:, 0] == eos_id
        if t == max_new_tokens - 1:
            break
        if not fast or t % 8 == 7:  # (fast: every 8 steps)
            finished = done.all().float()
            if is_sharded(teacher):  # every process runs each forward of a sharded teacher together
                dist.all_reduce(finished, op=dist.ReduceOp.MIN)
            if finished:
                break
        if compact and 2 * int((~done).sum()) <= rows.numel():  # half the rows have ended: drop them
            keep = (~done[rows]).nonzero()[:, 0]
            rows, picked = rows[keep], picked[keep]
            s_cache, t_cache = (c and {**c, "k": c["k"][:, keep], "v": c["v"][:, keep], "valid": c["valid"][keep]}
                                for c in (s_cache, t_cache))
        s_logits = step(student, s_cache, picked[:, 0])
        t_logits = step(teacher, t_cache, picked[:, 0]) if teacher is not None else None
    tokens, mask, logq_old, logp, log_pmix = (torch.stack(x, 1) for x in zip(*steps))  # (B, n) each
    zero = torch.zeros((), device=device)
    return {"prompt_idx": idx, "prompt_valid": valid, "tokens": tokens, "mask": mask,
            # nothing after EOS or in padding may reach a reward, a return, an advantage or a loss:
            "logq_old": torch.where(mask, logq_old, zero), "logp": torch.where(mask, logp, zero),
            "log_pmix": torch.where(mask, log_pmix, zero)}


def response_logits(model, batch, hidden=False, at=None):
    """Logits (B, n, V) that predict each response token (hidden: the final hidden states, C wide, instead; at, a
    (B, n) mask: at its N tokens only, (N, V)): one forward over prompt + response."""
    idx = torch.cat([batch["prompt_idx"], batch["tokens"]], 1)  # (B, Tp + n)
    valid = torch.cat([batch["prompt_valid"], torch.ones_like(batch["mask"])], 1)
    prompt = torch.zeros_like(batch["prompt_valid"][:, 1:])  # (B, Tp - 1): position i predicts token i + 1, so the
    at = None if at is None else torch.cat([prompt, at], 1)  # last prompt position predicts the first response token
    out, _ = model(idx[:, :-1], valid=valid[:, :-1], hidden=hidden, at=at)
    return out if at is not None else out[:, prompt.size(1):]  # (N, V) or (N, C); else (B, n, V) or (B, n, C)

# -----------------------------------------------------------------------------
# Scoring a round of rollouts, once, with q_old (the student that sampled them): rewards r_t (Eq. 2), the long-term
# return R^Norm_{t+1} (Eq. 6) and the importance weights w_t (Eq. 5)


def returns(r, mask, length_norm=True, gamma=1.0, include_t=False):
    """Long-term return R_{t+1} = sum over the steps t' > t of gamma^(t' - t - 1) r_t': Eq. 2's return R_t from the
    step after t on, since the single-step term takes r_t in expectation (Eq. 3); the paper has no discount, gamma =
    1 (the official code: 0.95, and R_t, step t included).
    length_norm (Eq. 6): R^Norm_{t+1} = that sum divided by the number of valid steps t' = t+1 .. T of the response
    (T - t terms, the number actually summed; 0 at the last step). Without it: the plain sum.
    include_t: R_t = r_t + gamma R_{t+1} instead (the plain policy gradient of Eq. 2, for the ablation without the
    single-step term; normalized by the T - t + 1 steps t .. T)."""
    r = r * mask
    after = torch.zeros_like(r)  # (B, n): after[:, t] = R_{t+1}
    acc = torch.zeros_like(r[:, 0])
    for t in range(r.size(1) - 1, -1, -1):
        after[:, t] = acc
        acc = r[:, t] + gamma * acc  # Eq. 2: R_t = r_t + gamma R_{t+1}
    count = mask.flip(1).cumsum(1).flip(1) - mask.long()  # (B, n): valid steps after t
    if include_t:
        after, count = r + gamma * after, count + mask.long()
    if not length_norm:
        return after * mask
    return torch.where(count > 0, after / count.clamp(min=1), 0.0) * mask  # Eq. 6: R^Norm_{t+1} = R_{t+1} / (T - t)


def score_round(batch, args):
    """Adds to a round of rollouts (rollout()'s dict) the rewards r, advantages A and importance weights w, (B, n)
    each. --recipe paper: Eq. 2, 5, 6 as the paper writes them; official: the rewards scaled and clipped, the return
    R_t including step t and discounted (RECIPES). The official whitening is per mini-batch: minillm_loss."""
    mask = batch["mask"]
    r = (batch["logp"] - batch["logq_old"]) / args.reward_scaling      # Eq. 2: r_t = log p(y_t) - log q_old(y_t)
    if args.reward_clip:                                               # (official: r_t / 0.5, clipped to +-100)
        r = r.clamp(-args.reward_clip, args.reward_clip)
    include_t = args.include_t or not args.single_step  # official, and the ablation without the single-step term
    batch["r"] = r
    batch["A"] = returns(r, mask, args.length_norm, args.gamma, include_t)  # Eq. 6: A_t = R^Norm_{t+1} (or R_t)
    batch["w"] = torch.exp(batch["logq_old"] - batch["log_pmix"])          # Eq. 5: w_t = q_old(y_t) / p_mix(y_t)
    return batch


# -----------------------------------------------------------------------------
# The loss: Eq. 7 per response token, the long-term term clipped as in PPO (Algorithm 1)


def minillm_terms(logq, kl, logq_old, advantage, w_single, w_long, clip_eps=0.2):
    """Per-token loss terms (B, n) whose gradient is Eq. 7's estimate of grad KL[q_theta || p]:
    single-step: w_t * KL(q_theta(.|y_<t) || p(.|y_<t)), the exact expectation over y_t (Eq. 3-4);
    long-term: PPO-clipped policy gradient, rho_t = q_theta(y_t) / q_old(y_t) * w_t = q_theta / p_mix,
               max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)) with A_t = R^Norm_{t+1} (no clipping: eps None).
    w_single and w_long are the importance weights q/p_mix (Eq. 5): in training both are the per-step ratio
    w_t = q_old(y_t) / p_mix(y_t); the estimator test passes exact sequence-level weights instead."""
    rho = torch.exp(logq - logq_old) * w_long  # rho_t = q_theta(y_t) / p_mix(y_t)
    long_term = -advantage * rho              # Eq. 7, long-term: gradient -w_t R^Norm_{t+1} grad log q_theta(y_t)
    if clip_eps is not None:                  # PPO (Algorithm 1): the pessimistic of the plain and the clipped ratio
        long_term = torch.max(long_term, -advantage * rho.clamp(1 - clip_eps, 1 + clip_eps))
    return w_single * kl, long_term           # Eq. 3 (Eq. 7's single-step term): w_t KL(q_theta(.|y_<t) || p(.|y_<t))


def reverse_kl_tokens(student, teacher, batch, args, ctx):
    """Per response token (b, n): KL(q_theta(.|y_<t) || p(.|y_<t)) over the vocabulary (Eq. 3) and log q_theta(y_t),
    from one forward of each model over prompt + response. lm_head and the KL run at the N response tokens only, not
    on the padding after EOS that fills the rest of the (b, n) grid (77% of it in the built-in task's rounds)."""
    mask = batch["mask"]
    targets = batch["tokens"][mask]  # (N,)
    with ctx:  # the (N, V) logits of each model (--chunk: the final hidden states (N, C))
        out_q = response_logits(student, batch, hidden=bool(args.chunk), at=mask)
        with torch.no_grad(), timed("teacher"):
            out_p = response_logits(teacher, batch, hidden=bool(args.chunk), at=mask)
        if args.chunk:  # the (N, V) logits never whole: lm_head and the kernel applied --chunk rows at a time
            head = getattr(student, "module", student).head_weight()  # (under DistributedDataParallel: .module)
            kl, logq, _ = kernels.reverse_kl_chunked(out_q, head, out_p, teacher.head_weight(), targets, args.chunk)
    if not args.chunk:
        kl, logq, _ = kernels.reverse_kl(out_q, out_p, targets)  # the fused kernel, in one pass
    zero = torch.zeros(mask.shape, dtype=kl.dtype, device=mask.device)
    return zero.masked_scatter(mask, kl), zero.masked_scatter(mask, logq)  # back to (b, n)


def minillm_loss(student, teacher, batch, args, ctx):
    """Eq. 7 on a mini-batch of scored rollouts: the single-step term plus the PPO-clipped long-term term, each a
    mean over the mini-batch's response tokens (the mask: nothing after EOS). Returns (loss, {name: value} for the
    log): the terms, and PPO's diagnostics of how far q_theta has moved from the q_old that sampled the round."""
    mask = batch["mask"]
    kl, logq = reverse_kl_tokens(student, teacher, batch, args, ctx)  # (b, n) each
    A = whiten(batch["A"], mask, args.max_new_tokens) if args.whiten else batch["A"]  # (official: per mini-batch)
    w_single = batch["w"] if args.w_single else 1.0  # (official: no w_t on the single-step term)
    single, long_term = minillm_terms(logq, kl, batch["logq_old"], A, w_single, batch["w"], args.clip_eps)
    n = mask.sum().clamp(min=1)
    mean = lambda x: (x * mask).sum() / n  # over the mini-batch's response tokens
    loss_single, loss_long = mean(single), mean(long_term)
    log_ratio = (logq.detach() - batch["logq_old"]) * mask  # log q_theta(y_t) / q_old(y_t)
    rho = log_ratio.exp() * batch["w"]  # q_theta(y_t) / p_mix(y_t), the ratio the clip acts on (w_t at q_old)
    stats = {"reward": mean(batch["r"]), "single": loss_single.detach(), "long": loss_long.detach(),
             "adv": mean(A),  # the mean advantage
             "kl_old": mean(log_ratio.exp() - 1 - log_ratio),  # approximate KL(q_old || q_theta) on these tokens (k3)
             # the share of tokens whose long-term gradient the clip takes away (rho_t past 1 +- eps on A_t's side)
             "clip": mean((-A * rho.clamp(1 - args.clip_eps, 1 + args.clip_eps) > -A * rho).float()),
             "ent": mean(-logq.detach()),  # -log q_theta(y_t): the student's entropy, estimated on its samples
             "w": mean(batch["w"]), "len": mask.sum(1).float().mean()}
    # Eq. 7: grad L = E_{y ~ p_mix} sum_t [ w_t grad KL_t (single-step) - w_t R^Norm_{t+1} grad log q_theta(y_t)
    # (long-term, clipped) ]: the gradient of this sum (ablations: --no_single_step, --no_long_term, one term alone)
    return (loss_single if args.single_step else 0) + (loss_long if args.long_term else 0), stats

# -----------------------------------------------------------------------------
# The baselines' losses and L_PT. KD: (1 - kd_ratio) CE + kd_ratio KL[p || q] per token of the ground-truth
# responses; SeqKD: the same on responses the teacher sampled; on-policy distillation: a token-level divergence on
# fresh student samples; L_PT (Algorithm 1): cross-entropy on pretraining text


def forward_kl(logits_q, logits_p):
    """Forward KL[p || q] = sum_v p_v (log p_v - log q_v) at each position: (..., V) logits -> (...). Its gradient
    is that of the soft cross-entropy -sum_v p_v log q_v that the official code uses; its value is a divergence
    (0 when q = p)."""
    log_q = F.log_softmax(logits_q.float(), -1)
    log_p = F.log_softmax(logits_p.float(), -1)
    return torch.where(log_p > -math.inf, log_p.exp() * (log_p - log_q), 0.0).sum(-1)  # p_v = 0 adds nothing


def token_loss(student, teacher, x, y, kd_ratio, ctx):
    """Teacher-forced loss on the targets y (-100: no loss). Without a teacher (or kd_ratio 0): cross-entropy
    (sft, and L_PT). With one: (1 - kd_ratio) CE + kd_ratio KL[p || q] (kd, seqkd, and L_PT with --kd_ratio).
    Returns (loss, {name: detached value} for the log)."""
    with ctx:
        logits, ce = student(x, y)  # (N, V): the logits at the N targets, and their mean cross-entropy
    if teacher is None or kd_ratio == 0:
        return ce, {"ce": ce.detach()}
    with torch.no_grad(), ctx, timed("teacher"):
        logits_p = teacher(x, y)[0]  # (N, V)
    fkl = forward_kl(logits, logits_p).mean()
    return (1 - kd_ratio) * ce + kd_ratio * fkl, {"ce": ce.detach(), "fkl": fkl.detach()}


def onpolicy_loss(student, teacher, batch, args, ctx):
    """On-policy distillation (GKD with lmbda = 1, the "on-policy distillation" recipes): the token-level divergence
    to the teacher on a fresh batch of pure student samples, averaged over the response tokens. --divergence rkl
    (the default, through the kernel) is MiniLLM's single-step term alone (Eq. 3, with w_t = 1 on the student's own
    samples); fkl and jsd (--beta) the alternatives. No reward, return, importance weight, teacher mixing or PPO
    reuse. Returns (loss, {name: value} for the log)."""
    mask = batch["mask"]
    if args.divergence == "rkl":
        div, logq = reverse_kl_tokens(student, teacher, batch, args, ctx)  # (b, n) each
    else:
        with ctx:
            logits_q = response_logits(student, batch)  # (b, n, V)
            with torch.no_grad(), timed("teacher"):
                logits_p = response_logits(teacher, batch)
        div = generalized_jsd(logits_q, logits_p, 0.0 if args.divergence == "fkl" else args.beta)
        logq = F.log_softmax(logits_q.detach().float(), -1).gather(-1, batch["tokens"].unsqueeze(-1)).squeeze(-1)
    n = mask.sum().clamp(min=1)
    loss = (div * mask).sum() / n
    log_ratio = (logq.detach() - batch["logq_old"]) * mask  # log q_theta(y_t) / q_old(y_t): 0 on a fresh round
    return loss, {f"token_{args.divergence}": loss.detach(), "len": mask.sum(1).float().mean(),
                  "kl_old": (log_ratio.exp() - 1 - log_ratio).sum() / n}  # (as minillm_loss's: --target_kl reads it)

# -----------------------------------------------------------------------------
# The rollout buffer: rounds of scored rollouts, served in shuffled mini-batches (Algorithm 1, step 2)


def rollout_batches(student, teacher, prompts, args, device, rank=0, world=1, state=None, ctx=nullcontext()):
    """Endless mini-batches for MiniLLM (and on-policy distillation). Each round rolls out one response from p_mix
    for each of args.rollout_size training prompts with the student of now (q_old), scores the round once, and yields
    ppo_epochs passes over it in shuffled mini-batches of args.batch_size; under torchrun each process makes 1/world
    of both. `state` (kept up to date; saved in a checkpoint, so that a resumed run goes on exactly here): the round,
    its mini-batches to come, the random generators, and the responses rolled out. ctx: the training's autocast.
    The drift guard (--target_kl): the training loop appends each mini-batch's kl_old (how far q_theta has moved from
    the q_old that sampled the round) to state["kl_old"]; at the end of a pass, if their mean passes 1.5 x target_kl,
    the round's remaining passes are skipped (PPO's early stop on target KL), and state["passes"] collects how many
    passes each round used."""
    seed, size, batch_size = args.seed + rank, args.rollout_size // world, max(1, args.batch_size // world)
    per_pass, target_kl = -(-size // batch_size), guarded(args)  # (mini-batches in one pass over a round)
    rng, gen = random.Random(seed), torch.Generator(device=device).manual_seed(seed)  # prompts, sampling
    shuffle = torch.Generator().manual_seed(seed)  # mini-batch order
    state = {} if state is None else state
    if state:  # a resumed run
        rng.setstate(state["rng"])
        gen.set_state(state["gen"])
        shuffle.set_state(state["shuffle"])
        state["round"] = {k: v.to(device) for k, v in state["round"].items()}
    while True:
        kl_old = state.get("kl_old")
        if target_kl and kl_old and state["minibatches"] and len(kl_old) % per_pass == 0 and \
                sum(kl_old) / len(kl_old) > 1.5 * target_kl:  # a pass has ended, and the student has drifted
            state["minibatches"] = []
        if not state.get("minibatches"):  # a new round
            if target_kl and kl_old:
                state["passes"] = state.get("passes", []) + [len(kl_old) / per_pass]
            with evaluating(student), timed("rollout"), ctx:  # q_old without dropout noise
                batch = rollout(student, teacher, rng.sample(prompts, size), args.max_new_tokens, args.eos_id,
                                args.alpha, gen, args.fast_decode)
            PHASES["rollout tokens"] = PHASES.get("rollout tokens", 0) + int(batch["mask"].sum())
            orders = [torch.randperm(size, generator=shuffle) for _ in range(args.ppo_epochs)]
            state.update(round=score_round(batch, args), samples=state.get("samples", 0) + size,
                         minibatches=[o[i:i + batch_size] for o in orders for i in range(0, size, batch_size)],
                         rng=rng.getstate(), gen=gen.get_state(), shuffle=shuffle.get_state())
            if target_kl:
                state["kl_old"] = []
        rows = state["minibatches"].pop(0).to(device)
        batch = {k: v[rows] for k, v in state["round"].items()}
        n = int(batch["mask"].sum(1).max())  # its longest response: the round's columns after it are padding alone
        yield {k: v if k.startswith("prompt") else v[:, :n] for k, v in batch.items()}


def guarded(args):
    """The drift guard's target, where it can act: on rounds that are reused (0: no guard)."""
    return args.target_kl if args.ppo_epochs > 1 else 0.0

# -----------------------------------------------------------------------------
# Validation (validate, below main(): the loss, the reverse KL to the teacher, the task score) chooses best.pt


def selection_score(metrics, method):
    """best.pt is the checkpoint with the highest score. sft: -validation loss (Algorithm 1, step 1). The
    distillation methods as the paper selects them, by validation Rouge-L (on the built-in task: validity)."""
    if method == "sft":
        return -metrics["loss"]
    return metrics["valid"] if "valid" in metrics else metrics["rougeL"]

# -----------------------------------------------------------------------------
# The optimizer and the learning-rate schedule


def make_optimizer(model, args):
    """AdamW (0.9, 0.95), weight decay on matrices only (nanoGPT)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))


def get_lr(step, args, elapsed=0.0):
    """Linear warm-up to args.lr, then cosine decay to args.min_lr at the end of the run: args.max_steps, or
    args.max_minutes of training (elapsed seconds) if that comes first, so the schedule ends when the run ends."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps))
    if args.max_minutes:
        progress = max(progress, min(1.0, elapsed / (60 * args.max_minutes)))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


# -----------------------------------------------------------------------------
# Training: one loop for the five methods. They share the data, optimizer, schedule, logging, validation and
# checkpoints, and differ only in the loss of a step, so that the comparison between them is fair:
#   sft       cross-entropy on the ground-truth responses (Algorithm 1, step 1: the student's initialization)
#   kd, seqkd (1 - kd_ratio) CE + kd_ratio KL[p || q] per token of the ground-truth / the teacher's responses
#   onpolicy  a token-level divergence to the teacher on fresh student samples
#   minillm   Eq. 7 on mini-batches of scored rollouts from p_mix, plus lm_coef * L_PT (Algorithm 1, step 2)


def train(args):
    """Runs --method sft | kd | seqkd | minillm in args.out (see run folders, below main); returns the path of
    best.pt. Under torchrun every process trains its share of each batch and DistributedDataParallel averages the
    gradients; process 0 validates, logs and writes the checkpoints."""
    device = pick_device(args.device)
    rank, world = distributed(device)
    torch.manual_seed(args.seed)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    defaults = set_method_defaults(args)
    best_path = os.path.join(args.out, "best.pt")
    resume_path, ckpt, notes = open_run(args, world)
    notes = defaults + notes
    if resume_path == os.path.join(args.out, "last.pt"):
        if rank == 0:
            print(f"{args.out} has finished ({ckpt['step']} steps): reusing {best_path}")
        return best_path
    # the models and the data, every input checked before anything is written (a data file's own errors first)
    rows = read_rows(args) if os.path.exists(args.data) else None
    student, teacher, tokenizer = load_models(args, device)
    start = ckpt["step"] if ckpt else 0
    task = load_data(args, student, teacher, tokenizer, start, rows)  # (and args.eos_id, the tokenizer's EOS)
    log = start_log(args, rank, resume_path, notes + task["notes"])
    if args.method == "seqkd":  # the training responses are the teacher's
        seqkd_data(teacher, task, args, log, rank, world)
    rollout_state = ckpt["state"]["ranks"][rank]["rollouts"] if ckpt else {}  # (minillm; kept up to date)
    if args.method in ("minillm", "onpolicy"):  # rounds of scored rollouts, in mini-batches
        onpolicy = args.method == "onpolicy"  # (pure student samples, no teacher in the rollout; its rounds: see
        rollouts = argparse.Namespace(**{**vars(args), "alpha": 0.0}) if onpolicy else args  # set_method_defaults)
        batches = rollout_batches(student, None if onpolicy else teacher, task["prompts"], rollouts, device, rank,
                                  world, rollout_state, ctx)
    else:  # (epoch, x, y): shuffled, length-bucketed batches of the instruction data
        batches = data.batches(task["train_pairs"], args.batch_size, args.seed, skip=start)
    log_data(args, task, log)
    optimizer = make_optimizer(student, args)
    wrapped = wrap_student(student, teacher, args, world, device, log)  # what the losses call: compiled, DDP
    progress = {"best": -math.inf, "best_step": 0, "tokens": 0, "bad_steps": 0, "validated": True, "elapsed": 0.0}
    metrics, log_gen = {}, torch.Generator(device=device).manual_seed(args.seed + 1)  # (the logged rkl's samples)
    interval = {}  # the sums of the loss and its stats since the last log line
    if ckpt:  # --resume: the run as it was when the checkpoint was written
        metrics = resume_run(ckpt, resume_path, student, optimizer, progress, log_gen, rank, world, device)
    t_start = time.time() - progress["elapsed"]
    PHASES.clear()
    TRAINING["loop"] = True  # (a stop signal now saves a checkpoint first)
    for step in range(start, args.max_steps + 1):
        # validate (every --eval_interval steps and at the end) and keep the best checkpoint in best.pt
        elapsed = time.time() - t_start
        last = step == args.max_steps or (args.max_minutes and elapsed > args.max_minutes * 60)
        validates = rank == 0 or args.shard_teacher  # (a sharded teacher runs on every process or on none)
        due = validates and (step % args.eval_interval == 0 or last) and not (  # (a resumed run validated this
            ckpt and step == start and ckpt["state"].get("validated", True))    # step before, unless cut short)
        new = validate(student, teacher, task["val"], args, ctx) if due else None  # None: cut short by a SIGTERM
        progress["validated"] = not due or new is not None
        last = last and progress["validated"]  # (a SIGTERM in the last validation: a checkpoint; --resume ends it)
        if new is not None:
            metrics = new
            if not all(map(math.isfinite, metrics.values())):
                raise FloatingPointError(f"step {step}: validation {metrics}; stopping (lower --lr?)")
            if selection_score(metrics, args.method) > progress["best"]:
                progress["best"], progress["best_step"] = selection_score(metrics, args.method), step
                if rank == 0:
                    save_checkpoint(best_path, student, None, step, args, tokenizer, metrics)
            log(*validation_line(step, metrics, progress["best_step"], elapsed))  # (log.txt and curves.jsonl)
            if args.patience and step - progress["best_step"] >= args.patience * args.eval_interval:
                log(f"no better validation score in {args.patience} evaluations: stopping (--patience)")
                last = True
        # stop, or write the checkpoint that --resume goes on from (and after a SIGTERM, stop there)
        last, sigterm = agree_to_stop(last, rank, world, device)
        save_due = step % (args.save_interval or args.eval_interval) == 0 and step > start or sigterm
        if last or save_due:  # what a resumed run needs, from every process
            state = run_state(progress, t_start, device, log_gen, rollout_state, world)
        if save_due and not last:
            save_step(args, student, optimizer, step, tokenizer, metrics, state, rank, sigterm, log)
        if last:
            break
        # the learning rate of this step: linear warm-up, then cosine decay
        lr = get_lr(step, args, time.time() - t_start)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # the method's loss on one batch
        t_step = clock()  # (the log splits the steps' time into rollout, teacher and student)
        if args.method in ("minillm", "onpolicy"):  # Eq. 7 on a mini-batch of the round's scored rollouts (onpolicy:
            batch = next(batches)                   # the divergence on fresh student samples)
            loss, stats = (minillm_loss if args.method == "minillm" else onpolicy_loss)(wrapped, teacher, batch, args,
                                                                                        ctx)
            progress["tokens"] += batch["prompt_idx"].numel() + batch["tokens"].numel()
            if guarded(args):  # the drift guard's measure, the same on every process (rollout_batches)
                rollout_state["kl_old"].append(mean_over_processes(stats["kl_old"], world))
        else:  # teacher-forced on the responses: CE (sft), (1 - kd_ratio) CE + kd_ratio KL[p || q] (kd, seqkd)
            epoch, x, y = next(batches)
            x, y, weight = my_rows(x, y, rank, world, device)  # (torchrun: this process's rows, weighted)
            loss, stats = token_loss(wrapped, teacher, x, y, args.kd_ratio, ctx)
            loss, stats["epoch"] = loss * weight, epoch
            progress["tokens"] += x.numel()
        # L_PT: the language-modelling loss on the pretraining text, weighted by lm_coef (Algorithm 1)
        if task["pt_batches"] is not None:
            x, y = (t.to(device) for t in next(task["pt_batches"]))
            loss_pt, _ = token_loss(student if world > 1 else wrapped,  # (torchrun: see my_rows)
                                    teacher if args.method == "minillm" else None, x, y, args.kd_ratio, ctx)
            loss, stats["L_PT"] = loss + args.lm_coef * loss_pt, loss_pt.detach()
        # backward, clip the gradient norm, and skip a step whose loss or gradient is not finite
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip if args.grad_clip > 0 else math.inf)
        if not torch.isfinite(norm):  # (the same on every process)
            skip_step(step, loss, stats, progress, optimizer, args, log)  # stops after --max_bad_steps in a row
            continue
        progress["bad_steps"] = 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        PHASES["step"] = PHASES.get("step", 0.0) + clock() - t_step
        # log: the loss terms and diagnostics averaged over the steps since the last line, the reverse KL to the
        # teacher (Eq. 1) on 16 validation prompts, speed, time left
        for k, v in {"loss": loss.detach(), **stats}.items():
            interval[k] = v if isinstance(v, int) else interval.get(k, 0) + v.detach()  # (an epoch: the last)
        interval["steps"] = interval.get("steps", 0) + 1
        if step % args.log_interval == 0 and validates:
            n = interval.pop("steps")
            stats = {k: v if isinstance(v, int) else v / n for k, v in interval.items()}
            if teacher is not None:
                stats = {"rkl": reverse_kl_k3(student, teacher, task["val"]["prompts"][:16], args, log_gen)[0],
                         **stats}
            if rollout_state.get("passes"):  # --target_kl: the passes the rounds since the last line used, on average
                passes = rollout_state.pop("passes")
                stats["passes"] = sum(passes) / len(passes)
            log(*step_line(step, stats.pop("loss"), stats, lr, progress["tokens"] * world, time.time() - t_start,
                           args))
            interval.clear()
    TRAINING["loop"] = False
    samples = rollout_state.get("samples", 0) * world + task.get("teacher_samples", 0)  # responses sampled
    finish_run(args, student, optimizer, step, tokenizer, metrics, state, progress, t_start, samples, rank, world, log)
    return best_path

# -----------------------------------------------------------------------------
# Algorithm 1 end to end: the built-in pipeline, and the paper's comparison. Each stage's settings where they differ
# between stages; any other flag applies to every stage, and a typed flag wins where it applies (PIPELINE_FLAGS).
# Peak learning rates: for the student, 1e-2 beat 3e-3 and 3e-2 (validation loss after 15,000 steps). The teacher
# trains 4,000 steps (--teacher_steps): far above every student, in two thirds of 6,000's time (docs/performance.md).
# The distillation stages run L_PT off: the built-in student never learned the plain-text stream, and teaching it costs
# the 0.033M student its task at every weight (docs/results.md); the paper's "without L_PT" row.
DISTILL = dict(max_steps=600, lr=1e-3, min_lr=1e-4, lm_coef=0.0, eval_interval=100, log_interval=50)
# Each distillation stage's own settings, chosen on validation by `python eval.py --sweep` (the same grid for every
# method, this budget, the test set never looked at; docs/results.md): the rollout methods' best in mini-batches of
# 32, since their best in 64 (35.2% and 34.8% against 33.8% and 33.2%, one seed) costs twice as much a step, and the
# first run is to stay under 10 minutes on slower machines. On the built-in task only; a typed flag still wins.
CHOSEN = {"kd": dict(lr=3e-4),
          "on-policy": dict(lr=1e-3, rollout_size=64, ppo_epochs=1, batch_size=32),
          "minillm": dict(lr=3e-3, rollout_size=64, ppo_epochs=1, batch_size=32)}
PAPER = dict(ppo_epochs=4, batch_size=64, rollout_size=256)  # MiniLLM's settings in the paper, to say where ours differ
PIPELINE_FLAGS = {  # typed flag -> the stages it applies to (other flags apply to every stage)
    "teacher_steps": ("teacher",), "student_steps": ("student-sft",), "model": ("student-sft",),
    **{k: ("kd", "on-policy", "minillm") for k in DISTILL}}


def pipeline_stages(args):
    """[(stage, settings)] of `python minillm.py`: the stages to train (a given --teacher / --init skips its stage),
    each with the pipeline's settings, a typed flag replacing the pipeline's value where it applies."""
    teacher = args.teacher or os.path.join(args.out, "teacher", "best.pt")
    student = args.init or os.path.join(args.out, "student-sft", "best.pt")
    typed = {k: getattr(args, k) for k in args.typed}
    distill = {**DISTILL, **{k: v for k, v in typed.items() if k in DISTILL}, "teacher": teacher, "init": student}
    chosen = {name: {k: v for k, v in c.items() if k not in typed and args.data == "builtin"}  # (the built-in task's)
              for name, c in CHOSEN.items()}
    stages = [("teacher", dict(method="sft", model="teacher", init=None, max_steps=args.teacher_steps, lr=2e-3,
                               min_lr=2e-4, lm_coef=0.0, eval_interval=500, log_interval=250)),
              ("student-sft", dict(method="sft", model=args.model, init=None, max_steps=args.student_steps, lr=1e-2,
                                   min_lr=1e-3, lm_coef=0.0, eval_interval=500, log_interval=250)),
              ("kd", {"method": "kd", **distill, **chosen["kd"]}),  # (on-policy: its rounds, as if typed)
              ("on-policy", {"method": "onpolicy", **distill, **chosen["on-policy"],
                             "typed": sorted(set(args.typed) | set(chosen["on-policy"]))}),
              ("minillm", {"method": "minillm", **distill, **chosen["minillm"]})]
    return [(name, s) for name, s in stages if not (name == "teacher" and args.teacher or
                                                     name == "student-sft" and args.init)]


def pipeline(args):
    """`python minillm.py [--teacher CKPT] [--init CKPT] [--data ...]`: Algorithm 1 end to end, and the paper's
    comparison. Trains the teacher and the SFT student unless given (or reuses them from an earlier run in args.out;
    on other data than the built-in task both must be given), distills the student with KD, on-policy distillation
    and MiniLLM on the same budget, and prints a table of the five."""
    t_all, times = time.time(), {}
    tokenizer = check_pipeline(args)
    stages = pipeline_stages(args)
    for number, (name, settings) in enumerate(stages, 1):
        folder = os.path.join(args.out, name)
        finished, t0 = os.path.isfile(os.path.join(folder, "last.pt")), time.time()
        print(f"[{stage_progress(number, stages, times)}] {name}: " + " ".join(
            f"--{k} {v}" for k, v in settings.items() if v is not None and k != "typed") + f" --out {folder}")
        if name == "minillm":
            print(paper_difference(args, settings))
        if name == "kd":  # the first distillation stage: is the teacher ahead of the student it is to teach?
            teacher_ahead(args, settings)
        # --resume: a finished stage is reused, an interrupted one goes on from its last checkpoint
        train(argparse.Namespace(**{**vars(args), **settings, "out": folder, "resume": True}))
        if not finished:
            times[name] = time.time() - t0
            print(f"{name}: trained in {times[name]:.0f}s")
    t_table = time.time()
    print_comparison(args, tokenizer, dict(stages))
    times["table"] = time.time() - t_table
    print(f"built-in pipeline: {time.time() - t_all:.0f}s (" + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()) +
          ("" if len(times) > 1 else "; every stage reused") + ")")

# -----------------------------------------------------------------------------
# main


def main(argv=None):
    """With --method, one training run; without, the pipeline (Algorithm 1 and the comparison). Bad input stops
    with one `error:` line (exit 1); a SIGTERM or a Ctrl-C (SIGINT) leaves a checkpoint where one is due and exits
    143 or 130 with one line, and --resume goes on from it."""
    args = get_args(argv)
    try:
        if args.method:
            train(args)
        else:
            pipeline(args)
    except (data.DataError, InputError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    except Stopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(128 + (STOP_SIGNALS or [signal.SIGTERM])[0])

# =============================================================================
# Plumbing. A first reading can stop here: what follows is called by the method above and teaches nothing about it
# (errors and signals, checkpoints, Hugging Face import/export, run folders and resume, the run's inputs, devices
# and processes, the pipeline's checks and table, the command line), and the pieces the method calls but a first
# reading skips: the other families' RMSNorm and rotary positions, the fast decode, generation for evaluation.
# =============================================================================


# -----------------------------------------------------------------------------
# Pieces of the method a first reading can skip: the official recipe's whitening (minillm_loss), the generalized JSD
# of on-policy distillation (onpolicy_loss), and the validation numbers (validate, task_score)


def whiten(A, mask, width):
    """The official code's whitening of a mini-batch's advantages (losses.py 53, utils.py whiten): (A - mean) / std
    over every entry of its (b, width) response tensor, padded to width = max_new_tokens with zeros that count (so
    short responses keep part of their mean), with the population variance of its distributed statistics (over every
    process's rows under torchrun). Entries outside the mask stay 0 (the loss masks them anyway)."""
    A = A * mask
    entries = A.size(0) * width
    stats = torch.stack([A.sum(), torch.tensor(float(entries), device=A.device)])  # sum, count
    if dist.is_initialized():
        dist.all_reduce(stats)
    mean = stats[0] / stats[1]
    sq = ((A - mean) ** 2 * mask).sum() + (entries - mask.sum()) * mean ** 2  # (each zero: (0 - mean)^2)
    if dist.is_initialized():
        dist.all_reduce(sq)
    return (A - mean) * torch.rsqrt(sq / stats[1] + 1e-8) * mask


def generalized_jsd(logits_q, logits_p, beta):
    """The generalized Jensen-Shannon divergence at each position, (..., V) logits -> (...), as TRL's GKD defines it:
    beta KL(p || m) + (1 - beta) KL(q || m) with m = beta p + (1 - beta) q; at beta 0 the forward KL[p || q] and at
    beta 1 the reverse KL[q || p] (the ends TRL takes as those two KLs)."""
    if beta == 0:
        return forward_kl(logits_q, logits_p)
    if beta == 1:
        return forward_kl(logits_p, logits_q)  # KL[q || p]: the roles swapped
    log_q, log_p = F.log_softmax(logits_q.float(), -1), F.log_softmax(logits_p.float(), -1)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), 0)  # log m
    kl_to_m = lambda log_a: torch.where(log_a > -math.inf, log_a.exp() * (log_a - log_m), 0.0).sum(-1)
    return beta * kl_to_m(log_p) + (1 - beta) * kl_to_m(log_q)


def validate(student, teacher, val, args, ctx):
    """The validation numbers: loss (CE on the ground-truth responses), pt_loss (CE on held-out pretraining text, the
    built-in task's), and with a teacher rkl (KL[q || p], k3 on pure student samples of 64 validation prompts, fixed
    seed) and, on the built-in task, valid (the fraction of valid responses sampled at T = 1 for the validation
    prompts, fixed seed), elsewhere rougeL (Rouge-L of responses sampled at T = 1, fixed seed, for the first 256
    validation prompts). None if a SIGTERM cut it short (not with a sharded teacher, whose forwards every process
    must run to the end together)."""
    device = next(student.parameters()).device
    sigterm = not args.shard_teacher
    try:
        metrics = {"loss": validation_loss(student, val["pairs"], 64, device, ctx, sigterm=sigterm)}
        if "pt" in val:  # the loss on held-out pretraining text, which L_PT is there to keep
            with torch.no_grad(), evaluating(student), ctx:
                metrics["pt_loss"] = student(*(t.to(device) for t in val["pt"]))[1].item()  # (its mean CE)
        if teacher is not None:
            metrics["rkl"], _ = reverse_kl_k3(student, teacher, val["prompts"][:64], args,
                                              torch.Generator(device).manual_seed(0))
            metrics.update(task_score(student, val, args, sigterm))
    except Stopped:
        return None
    return metrics


def task_score(model, val, args, sigterm=False):
    """{name: value} of the score that chooses a distilled best.pt: on the built-in task the validity of responses
    sampled at T = 1 to the validation prompts (fixed seed); elsewhere the paper's, Rouge-L of responses sampled at
    T = 1 to the first 256 validation prompts."""
    if args.data == "builtin":
        return {"valid": validity(model, val["enc"], val["rows"], greedy=False, seed=0,
                                  max_new_tokens=args.max_new_tokens, sigterm=sigterm)["all"]}
    prompts, references = zip(*val["rouge"])
    responses = respond(model, val["enc"], prompts, seed=0, max_new_tokens=args.max_new_tokens, sigterm=sigterm)
    return {"rougeL": sum(map(data.rouge_l, responses, ([r] for r in references))) / len(responses)}


# -----------------------------------------------------------------------------
# The other families' pieces (the model above calls them where a config field asks): RMSNorm and rotary positions


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Llama, Mistral, Qwen), in fp32 as their reference code computes it."""
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def norm(config, dim):
    return RMSNorm(dim, config.norm_eps) if config.norm == "rmsnorm" else nn.LayerNorm(dim, config.norm_eps,
                                                                                          bias=config.bias)


def rope_angles(config, pos, dtype):
    """Rotary positions (Su et al. 2021): cos and sin (..., T, head_dim) of pos * theta^(-2i/d) for i < d/2, each
    half repeated (the Hugging Face layout). Llama-3 slows the long wavelengths by `factor`, smoothly between two
    cut-offs."""
    d = config.head_size
    freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, device=pos.device).float() / d)  # (d/2,)
    if config.rope_scaling:
        factor, low, high, old_len = config.rope_scaling
        smooth = ((old_len * freq / (2 * math.pi) - low) / (high - low)).clamp(0, 1)  # 0: long wavelength, 1: short
        freq = (1 - smooth) * freq / factor + smooth * freq
    angles = pos.float()[..., None] * freq  # (..., T, d/2)
    angles = torch.cat([angles, angles], -1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x, cos, sin):
    """x (B, H, T, d) rotated by its positions' angles: pairs (x_i, x_{i + d/2}) turn like points in a plane."""
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin

# -----------------------------------------------------------------------------
# The fast decode (fast=True; --fast_decode), as gpt-fast does it: the same step on static shapes. The cache is made
# once per model at a size rounded up to 64 slots and kept for the next rounds, the slot to write is a tensor, and
# attention runs over the whole cache with the slots not written yet masked; so every step is the same computation
# on the same shapes and the same memory, which torch.compile captures once (with CUDA graphs on a GPU) and replays.
# The loops ask whether every row has ended every 8 steps instead of every step (each question waits for the GPU).
DECODE_BACKEND = "inductor"  # torch.compile's backend for it


def fast_decode(model, cache, token):
    if token.is_cuda:  # each call its own replay of the model's graph, not one step of a long recorded sequence
        torch.compiler.cudagraph_mark_step_begin()
    logits = compiled_decode(token.device.type, DECODE_BACKEND)(model, cache, token)
    return logits.clone()  # (a CUDA graph's output lives in memory that its next replay writes)


@functools.lru_cache(maxsize=None)
def compiled_decode(device_type, backend):
    mode = "reduce-overhead" if device_type == "cuda" and backend == "inductor" else None  # CUDA graphs
    return torch.compile(decode, backend=backend, mode=mode, dynamic=False)


def cache_layout(model, batch_size, max_len, device):
    """The shape (n_layer, B, H_kv, max_len, hd) and dtype of a model's keys and values."""
    c = model.config
    dtype = next(model.parameters()).dtype
    if torch.is_autocast_enabled(device.type):  # (rollouts on a GPU: bf16 autocast, the cache in bf16 too)
        dtype = torch.get_autocast_dtype(device.type)
    return (c.n_layer, batch_size, c.kv_heads, max_len, c.head_size), dtype


STATIC_CACHES = weakref.WeakKeyDictionary()  # model -> the static cache of its fast decode (gone with the model)


def static_cache(model, batch_size, max_len, device):
    """prefill's cache for the fast decode: the model's static cache (STATIC_CACHES), made once per shape at a size
    rounded up to 64 slots and reused round after round, so that its tensors keep the addresses CUDA graphs are
    recorded against; the keys and values left from the last round are masked until written again."""
    max_len = -(-max_len // 64) * 64
    kept = STATIC_CACHES.get(model)
    if kept is None or kept["k"].device != device or \
            (kept["k"].shape, kept["k"].dtype) != cache_layout(model, batch_size, max_len, device):
        kept = STATIC_CACHES[model] = {**new_cache(model, batch_size, max_len, device),
                                       "slot": torch.zeros(1, dtype=torch.long, device=device)}
        for t in (kept["k"], kept["v"], kept["valid"], kept["slot"]):
            torch._dynamo.mark_static_address(t)
    kept["valid"].zero_()
    return {"k": kept["k"], "v": kept["v"], "valid": kept["valid"], "len": 0}


# -----------------------------------------------------------------------------
# Generation for evaluation (the rollouts above sample on their own): left padding (the rollouts' too), generate()
# with temperature, top-k and top-p, responses as text, and validation's measures


def left_pad(prompts, pad_id, device):
    """List of token lists -> idx (B, T) left-padded, valid (B, T) bool, so that every row ends at column T-1."""
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        idx[i, T - len(p):], valid[i, T - len(p):] = torch.tensor(p), True
    return idx.to(device), valid.to(device)


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
             generator=None, use_cache=True, pad_id=None, fast=False):
    """Batched generation for prompts (list of token lists) of different lengths.
    Returns (B, n) new tokens, n <= max_new_tokens: each row stops at its first EOS and is padded after it
    (pad_id, default eos_id). eos_id None never stops (benchmarks). use_cache=False recomputes the whole prefix
    every step (the reference the KV cache is tested against); fast: fast_decode."""
    pad_id = (eos_id if eos_id is not None else 0) if pad_id is None else pad_id
    device = next(model.parameters()).device
    idx, valid = left_pad(prompts, pad_id, device)
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if idx.size(1) + max_new_tokens > model.config.block_size:
        raise InputError(f"prompt ({idx.size(1)} tokens) + max_new_tokens ({max_new_tokens}) exceeds block_size "
                         f"{model.config.block_size}")
    if use_cache:
        cache, logits = prefill(model, idx, valid, max_new_tokens, fast)
    else:
        logits = model(idx, valid=valid, last_only=True)[0][:, -1].float()
    B = idx.size(0)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        probs = next_token_probs(logits, temperature, top_k, top_p)  # (B, V)
        token = probs.argmax(-1) if greedy else sample(probs, generator)[:, 0]  # (B,)
        out[:, t] = torch.where(done, pad_id, token)
        if eos_id is not None:
            done |= token == eos_id
        if t == max_new_tokens - 1 or ((not fast or t % 8 == 7) and done.all()):  # (fast: every 8 steps)
            break
        if use_cache:
            logits = (fast_decode if fast else decode)(model, cache, token)
        else:
            idx, valid = torch.cat([idx, token[:, None]], 1), torch.cat([valid, valid.new_ones(B, 1)], 1)
            logits = model(idx, valid=valid, last_only=True)[0][:, -1].float()
    return out[:, :t + 1]


@torch.no_grad()
def respond(model, enc, prompts, greedy=False, seed=0, max_new_tokens=96, batch_size=128, sigterm=False,
            progress=None):
    """One text response per prompt (token lists), cut at EOS: sampled at T = 1 (top-p 1) as the paper evaluates,
    from a generator seeded with `seed`, or greedy. Batches of batch_size; after each, progress(responses so far)
    if given, and with sigterm a SIGTERM stops it (raises Stopped)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    out = []
    with evaluating(model):
        for i in range(0, len(prompts), batch_size):
            check_sigterm(sigterm)
            batch = prompts[i:i + batch_size]
            room = min(max_new_tokens, model.config.block_size - max(map(len, batch)))
            for toks in generate(model, batch, room, enc.eot_token, greedy=greedy, generator=gen).tolist():
                out.append(enc.decode(toks[:toks.index(enc.eot_token)] if enc.eot_token in toks else toks))
            if progress:
                progress(len(out))
    return out


@torch.no_grad()
def reverse_kl_k3(student, teacher, prompts, args, generator):
    """Eq. 1's KL[q || p] per response, estimated on pure student samples with k3 = p/q - 1 - log(p/q) per token.
    Returns (mean over the prompts, mean response length)."""
    with evaluating(student):
        b = rollout(student, teacher, prompts, args.max_new_tokens, args.eos_id, 0.0, generator)
    log_ratio = (b["logp"] - b["logq_old"]) * b["mask"]
    k3 = (log_ratio.exp() - 1 - log_ratio) * b["mask"]
    return k3.sum(1).mean().item(), b["mask"].sum(1).float().mean().item()


@torch.no_grad()
def validation_loss(model, pairs, batch_size, device, ctx, chunk=8192, sigterm=False):
    """Token-weighted mean cross-entropy over the response tokens of every validation example. lm_head is applied
    to the response tokens only, `chunk` at a time: with a 50,257-token vocabulary the (batch, length, V) logits
    of a whole batch would take gigabytes. sigterm: a SIGTERM stops it between batches (raises Stopped)."""
    total, count = 0.0, 0
    with evaluating(model):
        for i in range(0, len(pairs), batch_size):
            check_sigterm(sigterm)
            x, y = data.collate(pairs[i:i + batch_size], pad_id=0)
            x, y = x.to(device), y.to(device)
            with ctx:
                h, _ = model(x, hidden=True)
                h, y = h[y != -100], y[y != -100]  # (n, C), (n,): the response tokens
                for j in range(0, len(y), chunk):
                    logits = F.linear(h[j:j + chunk], model.head_weight()).float()
                    total += F.cross_entropy(logits, y[j:j + chunk], reduction="sum").item()
            count += len(y)
    return total / max(count, 1)


def validity(model, enc, rows, greedy=True, seed=0, batch_size=128, max_new_tokens=96, sigterm=False):
    """The built-in task: the fraction of valid responses (data.is_valid) per family and 'all'; sampled as the paper
    evaluates (T = 1, top-p 1) unless greedy. sigterm: a SIGTERM stops it between batches (raises Stopped)."""
    rows = sorted(rows, key=lambda r: r["category"])  # one family a batch: its responses end at about the same step
    _, prompts = data.encode_prompts(rows, enc, "builtin")
    hits = {}
    for r, text in zip(rows, respond(model, enc, prompts, greedy, seed, max_new_tokens, batch_size, sigterm)):
        hits.setdefault(r["category"], []).append(data.is_valid(r, text))
    scores = {f: sum(h) / len(h) for f, h in hits.items()}
    scores["all"] = sum(sum(h) for h in hits.values()) / len(rows)
    return scores

# -----------------------------------------------------------------------------
# Errors, stop signals, and where the time goes


class InputError(Exception):
    """A checkpoint, device or length that cannot be used. The message is one line naming the problem."""


class Stopped(Exception):
    """A SIGTERM (what a scheduler sends before it preempts a job) or a Ctrl-C (SIGINT) stopped the run: in
    train()'s loop after a checkpoint, elsewhere at once."""


STOP_SIGNALS = []  # the stop signals received (on_stop_signal appends them); train()'s loop then saves and stops
TRAINING = {"loop": False}  # whether train()'s loop runs: outside it, a stop signal stops at once


def on_stop_signal(signum, frame):
    """SIGTERM and SIGINT: inside train()'s loop, stop after the next checkpoint (a second Ctrl-C: at once);
    elsewhere (loading, the pipeline's table) at once, with nothing more to save."""
    name = signal.Signals(signum).name
    if (STOP_SIGNALS and signum == signal.SIGINT) or not TRAINING["loop"]:
        STOP_SIGNALS.append(signum)
        raise Stopped(f"{name} {'again' if len(STOP_SIGNALS) > 1 else 'outside a training loop'}: stopped at once, "
                      "nothing more saved")
    STOP_SIGNALS.append(signum)
    if signum == signal.SIGINT:
        print(f"{name}: stopping after a checkpoint at the next step (Ctrl-C again: at once)", file=sys.stderr)


def stop_name():
    """The first stop signal's name: SIGTERM or SIGINT."""
    return signal.Signals(STOP_SIGNALS[0]).name


def check_sigterm(on):
    """In a long validation loop: after a stop signal (when `on`), stop (raise Stopped)."""
    if on and STOP_SIGNALS:
        raise Stopped(f"{stop_name()} during a validation")


@contextmanager
def evaluating(model):
    """model.eval() inside the block (no dropout noise), then the mode the model was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


PHASES = {}  # where the time goes, since the last log line: seconds by phase, and the tokens rolled out


def clock():
    """time.perf_counter() once the GPU has done the work queued so far (a synchronisation; none on a CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


@contextmanager
def timed(phase):
    """Adds the block's seconds to PHASES[phase]."""
    t0 = clock()
    try:
        yield
    finally:
        PHASES[phase] = PHASES.get(phase, 0.0) + clock() - t0

# -----------------------------------------------------------------------------
# Checkpoints: one file, written atomically, loaded without executing pickled code (weights_only=True)


def save_checkpoint(path, model, optimizer, step, args, tokenizer, metrics, state=None):
    """metrics: the validation numbers of this checkpoint ({name: float}); state: what a resumed run needs beyond
    the weights and the optimizer (run_state)."""
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None,
            "config": asdict(model.config), "step": step, "args": vars(args) if args else {},
            "tokenizer": tokenizer, "metrics": metrics, "state": state}
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: a crash leaves the previous checkpoint whole
    folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    os.fsync(folder)  # and the rename itself reaches the disk
    os.close(folder)


def read_checkpoint(path, device="cpu"):
    """The dict in one of our checkpoint files. torch.load(weights_only=True) unpickles tensors, numbers, strings
    and containers only: a file that carries any other object (code to run) is refused, like a damaged one."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such checkpoint file")
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
        if magic != b"PK" and magic[:1] != b"\x80":  # torch.save writes a zip archive (a pickle before torch 1.6)
            raise InputError(f"{path}: not a checkpoint: not a file torch.save wrote (a minillm .pt file, or a "
                             "Hugging Face model folder)")
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except InputError:
        raise
    except OSError as e:  # unreadable: permissions, a disk error
        raise InputError(f"{path}: cannot read it ({e.strerror or e})") from None
    except Exception as e:  # pickled objects weights_only refuses; a truncated or damaged file; not a torch file
        found = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        if found:
            raise InputError(f"{path}: refused: it holds pickled objects that are not tensors ({found[0]}); "
                             "nothing in it was run") from None
        first = (str(e).split(". ")[0].splitlines() or [type(e).__name__])[0]
        raise InputError(f"{path}: not a loadable checkpoint, truncated or damaged ({first[:150]})") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "tokenizer"} <= set(ckpt):
        raise InputError(f"{path}: not a minillm checkpoint (expected keys model, config, tokenizer)")
    return ckpt


def load_checkpoint(path, device="cpu", dtype=torch.float32):
    """Returns (model, checkpoint dict): one of our checkpoint files, or a Hugging Face model folder or hub name
    (from_pretrained, its weights in dtype). Loading cannot run code."""
    if os.path.isdir(path) or (not os.path.exists(path) and not path.endswith(".pt")):
        return from_pretrained(path, device, dtype)
    ckpt = read_checkpoint(path, device)
    model = GPT(GPTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device), ckpt


# Hugging Face checkpoints: GPT-2, OPT, Llama, Mistral, Qwen2 and Qwen3 folders (or hub names) in and out. Our
# parameter names are GPT-2's; the other families' q, k, v (and SwiGLU's gate, up) are concatenated into c_attn
# (c_fc) on the way in and split on the way out.

HF_LAYERS = {  # our module in block i -> the Hugging Face module(s) it is made of (several: concatenated)
    "llama": {"ln_1": "input_layernorm", "attn.c_attn": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
              "attn.c_proj": "self_attn.o_proj", "attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm",
              "ln_2": "post_attention_layernorm", "mlp.c_fc": ["mlp.gate_proj", "mlp.up_proj"],
              "mlp.c_proj": "mlp.down_proj"},
    "opt": {"ln_1": "self_attn_layer_norm", "attn.c_attn": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            "attn.c_proj": "self_attn.out_proj", "ln_2": "final_layer_norm", "mlp.c_fc": "fc1", "mlp.c_proj": "fc2"},
}
HF_TOP = {  # family -> (prefix of the blocks, {our top-level module: theirs})
    "llama": ("model.layers.", {"wte": "model.embed_tokens", "ln_f": "model.norm"}),
    "opt": ("model.decoder.layers.", {"wte": "model.decoder.embed_tokens", "wpe": "model.decoder.embed_positions",
                                      "ln_f": "model.decoder.final_layer_norm"}),
}
HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # GPT-2's Conv1D


def hf_sources(name, c):
    """Our parameter name -> the Hugging Face names of the tensors that, concatenated along dim 0, make it."""
    if c.model_type == "gpt2" or name == "lm_head.weight":
        return [name]
    family = "opt" if c.model_type == "opt" else "llama"
    blocks, top = HF_TOP[family]
    parts = name.split(".")  # transformer.h.3.attn.c_attn.weight, transformer.wte.weight
    if parts[1] != "h":
        return [f"{top[parts[1]]}.{parts[-1]}"]
    theirs = HF_LAYERS[family][".".join(parts[3:-1])]
    return [f"{blocks}{parts[2]}.{m}.{parts[-1]}" for m in (theirs if isinstance(theirs, list) else [theirs])]


def config_from_hf(hf, where):
    """GPTConfig from a config.json dict. What this model would not compute exactly as transformers does is refused
    with one line naming the field."""
    def refuse(field, why):
        raise InputError(f"{where}: config.json {field} = {hf.get(field)!r}: {why}")
    t = hf.get("model_type")
    if t not in ("gpt2", "opt", "llama", "mistral", "qwen2", "qwen3"):
        refuse("model_type", "not a family this model covers (gpt2, opt, llama, mistral, qwen2, qwen3)")
    if hf.get("is_causal") is False or hf.get("is_encoder_decoder"):
        refuse("is_causal" if hf.get("is_causal") is False else "is_encoder_decoder", "not a causal decoder")
    if t == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            refuse("activation_function", "GPT-2 here uses the tanh gelu")
        for field in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(field):
                refuse(field, "not supported")
        return GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                         n_head=hf["n_head"], n_embd=hf["n_embd"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                         n_inner=hf.get("n_inner") or 0, tie_embeddings=hf.get("tie_word_embeddings", True))
    common = lambda: dict(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_embd=hf["hidden_size"],
                          n_head=hf["num_attention_heads"], model_type=t, bias=False)  # (read after the checks)
    if t == "opt":
        if not hf.get("do_layer_norm_before", True):
            refuse("do_layer_norm_before", "post-norm OPT (opt-350m) is not supported")
        if hf.get("word_embed_proj_dim", hf.get("hidden_size")) != hf.get("hidden_size"):
            refuse("word_embed_proj_dim", "OPT's projections in and out of the embedding (opt-350m) are not supported")
        for field, ok in (("_remove_final_layer_norm", False), ("layer_norm_elementwise_affine", True),
                          ("activation_function", "relu")):
            if hf.get(field, ok) != ok:
                refuse(field, f"only {ok!r} is supported")
        return GPTConfig(**{**common(), "bias": hf.get("enable_bias", True)}, block_size=hf["max_position_embeddings"],
                         pos_offset=2, mlp="relu", n_inner=hf["ffn_dim"],
                         tie_embeddings=hf.get("tie_word_embeddings", True))
    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "the SwiGLU MLP here uses silu")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field) and t != "qwen2":
            refuse(field, "biases on o_proj or the MLP are not supported")
    rope = hf.get("rope_parameters") or {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 1e4)}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        refuse("rope_scaling", f"rope type {kind!r}: only the default and llama3 are supported")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        refuse("partial_rotary_factor", "only full rotary embeddings are supported")
    scaling = () if kind == "default" else (rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
                                            rope["original_max_position_embeddings"])
    block = hf["max_position_embeddings"]
    window = hf.get("sliding_window") if (t == "mistral" or hf.get("use_sliding_window")) else None
    if window:  # sequences no longer than the window: sliding and full attention agree (longer ones are refused)
        block = min(block, window)
    return GPTConfig(**common(), block_size=block, norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), pos="rope",
                     rope_theta=rope.get("rope_theta", 1e4), rope_scaling=scaling, mlp="swiglu",
                     n_inner=hf["intermediate_size"], n_kv_head=hf.get("num_key_value_heads") or 0,
                     head_dim=hf.get("head_dim") or 0, qkv_bias=t == "qwen2", qk_norm=t == "qwen3",
                     tie_embeddings=hf.get("tie_word_embeddings", False))


def read_hf_weights(folder):
    """{name: tensor} from model.safetensors, sharded safetensors (model.safetensors.index.json), or the older
    pytorch_model.bin (also sharded), the .bin files read with weights_only (no code runs)."""
    from safetensors.torch import load_file
    for single, index, load in (("model.safetensors", "model.safetensors.index.json", load_file),
                                ("pytorch_model.bin", "pytorch_model.bin.index.json",
                                 lambda f: torch.load(f, map_location="cpu", weights_only=True))):
        files = [single] if os.path.isfile(os.path.join(folder, single)) else []
        if not files and os.path.isfile(os.path.join(folder, index)):
            with open(os.path.join(folder, index)) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        if files:
            try:
                return {k: v for f in files for k, v in load(os.path.join(folder, f)).items()}
            except Exception as e:
                raise InputError(f"{folder}: cannot read its weights ({type(e).__name__}: {str(e)[:150]})") from None
    raise InputError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def from_pretrained(name_or_path, device="cpu", dtype=torch.float32):
    """A Hugging Face GPT-2, OPT, Llama, Mistral, Qwen2 or Qwen3 model as (GPT in dtype, checkpoint dict with its
    tokenizer): a local folder with config.json and the weights, or a hub name such as Qwen/Qwen2.5-0.5B (fetched
    through huggingface_hub; needs the network). The tokenizer: the tiktoken name our export recorded in config.json
    (minillm_tokenizer), else tokenizer.json (or vocab.json + merges.txt) in the folder; a GPT-2 folder without one
    has tiktoken's gpt2 if its vocabulary is GPT-2's (50,257 rows); otherwise None (the weights load, a run
    refuses)."""
    folder = name_or_path
    if not os.path.isdir(folder):
        try:
            from huggingface_hub import snapshot_download
            folder = snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "merges.txt"])
            if not any(f.endswith(".safetensors") for f in os.listdir(folder)):  # an older repository: .bin only
                folder = snapshot_download(name_or_path, allow_patterns=["*.json", "*.bin", "merges.txt"])
        except Exception as e:
            raise InputError(f"{name_or_path}: no such checkpoint file or model folder, and not a reachable hub model "
                             f"({type(e).__name__})") from None
    try:
        with open(os.path.join(folder, "config.json")) as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{folder}: no readable config.json: not a Hugging Face model folder ({e})") from None
    try:
        config = config_from_hf(hf, folder)
    except KeyError as e:
        raise InputError(f"{folder}: config.json has no {e.args[0]!r}, which a {hf.get('model_type')} model needs") from None
    # the tokenizer: the name of the tiktoken one it was trained with, where save_pretrained recorded it (builtin,
    # gpt2); else tokenizer.json; else GPT-2's only for GPT-2's 50,257-row vocabulary; else none (a run refuses)
    tokenizer = hf.get("minillm_tokenizer") or data.hf_tokenizer(folder) or (
        "gpt2" if config.model_type == "gpt2" and config.vocab_size == 50257 else None)
    if isinstance(tokenizer, dict) or tokenizer in ("builtin", "builtin-bytes"):  # (not gpt2: it may need a download)
        config.n_vocab = data.get_encoding(tokenizer).n_vocab
        if config.n_vocab > config.vocab_size:
            raise InputError(f"{folder}: its tokenizer has {config.n_vocab} tokens, more than the {config.vocab_size} "
                             "rows of the embedding")
    weights = read_hf_weights(folder)
    if config.model_type == "gpt2":
        weights = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v  # GPT2Model: no
                   for k, v in weights.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # prefix
    else:
        weights = {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}
        if not any(k.startswith("model.") for k in weights):  # saved from the bare model (LlamaModel, OPTModel)
            weights = {("model." + k if not k.startswith("lm_head.") else k): v for k, v in weights.items()}
    with torch.device("meta"):  # no memory and no random init for weights about to be replaced
        model = GPT(config)
    state = {}
    for name in model.state_dict():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        sources = hf_sources(name, config)
        missing = [s for s in sources if s not in weights]
        if missing:
            raise InputError(f"{folder}: weights do not match its config.json: no {missing[0]}")
        t = torch.cat([weights.pop(s) for s in sources]).to(dtype)  # (pop: a tensor is held once, not twice)
        state[name] = t.t().contiguous() if config.model_type == "gpt2" and name.endswith(HF_TRANSPOSED) else t
    unused = sorted(set(weights) - ({"lm_head.weight"} if config.tie_embeddings else set()))
    if unused:
        raise InputError(f"{folder}: weights this model has no place for, e.g. {unused[0]}")
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise InputError(f"{folder}: weights do not match its config.json ({str(e).splitlines()[-1][:150]})") from None
    if config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    return model.to(device), {"config": asdict(config), "tokenizer": tokenizer, "step": 0, "metrics": {}, "args": {}}


def save_pretrained(model, folder, eos_id, tokenizer=None, trained_on=None):
    """config.json, model.safetensors and the tokenizer (tokenizer.json + tokenizer_config.json: a Hugging Face one
    as it came, a tiktoken one converted), which transformers' AutoModelForCausalLM and AutoTokenizer load unchanged.
    A tiktoken tokenizer's name (builtin, gpt2) is recorded in config.json too: from_pretrained reads it back as
    exactly that tokenizer; and trained_on, the --data of the run (eval.py evaluates on it)."""
    from safetensors.torch import save_file
    c, eos = model.config, eos_id
    bos = (data.bos_ids(data.get_encoding(tokenizer)) or [eos])[0] if isinstance(tokenizer, dict) else eos
    head_dim = c.head_size
    if c.model_type == "gpt2":
        if not c.bias:
            raise InputError("save_pretrained: GPT-2 has biases; this model was made with bias=False")
        config = {"architectures": ["GPT2LMHeadModel"], "n_positions": c.block_size, "n_embd": c.n_embd,
                  "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": c.n_inner or None,
                  "activation_function": "gelu_new", "layer_norm_epsilon": c.norm_eps, "resid_pdrop": 0.0,
                  "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    elif c.model_type == "opt":
        config = {"architectures": ["OPTForCausalLM"], "hidden_size": c.n_embd, "num_hidden_layers": c.n_layer,
                  "num_attention_heads": c.n_head, "ffn_dim": c.n_inner, "max_position_embeddings": c.block_size,
                  "word_embed_proj_dim": c.n_embd, "do_layer_norm_before": True, "enable_bias": c.bias,
                  "activation_function": "relu", "dropout": 0.0}
    else:
        config = {"architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2":
                  "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[c.model_type]], "hidden_size": c.n_embd,
                  "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads":
                  c.kv_heads, "head_dim": head_dim, "intermediate_size": c.n_inner,
                  "max_position_embeddings": c.block_size, "rms_norm_eps": c.norm_eps, "hidden_act": "silu",
                  "rope_theta": c.rope_theta, "rope_scaling": None if not c.rope_scaling else dict(
                      rope_type="llama3", factor=c.rope_scaling[0], low_freq_factor=c.rope_scaling[1],
                      high_freq_factor=c.rope_scaling[2], original_max_position_embeddings=c.rope_scaling[3]),
                  "attention_bias": False, "sliding_window": None, "use_sliding_window": False}
    config.update(model_type=c.model_type, vocab_size=c.vocab_size, bos_token_id=bos, eos_token_id=eos,
                  tie_word_embeddings=c.tie_embeddings, initializer_range=0.02)
    if isinstance(tokenizer, str):
        config["minillm_tokenizer"] = tokenizer
    if trained_on is not None:
        config["minillm_data"] = trained_on
    state = {}
    for name, v in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_embeddings:
            continue
        sources = hf_sources(name, c)
        v = v.t() if c.model_type == "gpt2" and name.endswith(HF_TRANSPOSED) else v
        sizes = [v.size(0) // len(sources)] * len(sources)
        if name.endswith("c_attn.weight") or name.endswith("c_attn.bias"):
            sizes = [c.n_head * head_dim] + [c.kv_heads * head_dim] * 2 if len(sources) == 3 else sizes
        for s, part in zip(sources, v.split(sizes)):
            state[s] = part.detach().cpu().contiguous()
    os.makedirs(folder, exist_ok=True)
    save_file(state, os.path.join(folder, "model.safetensors.tmp"), metadata={"format": "pt"})
    os.replace(os.path.join(folder, "model.safetensors.tmp"), os.path.join(folder, "model.safetensors"))  # atomic
    with open(os.path.join(folder, "config.json.tmp"), "w") as f:
        json.dump(config, f, indent=2)
    os.replace(os.path.join(folder, "config.json.tmp"), os.path.join(folder, "config.json"))
    if tokenizer is not None:
        data.write_hf_tokenizer(tokenizer, folder)

# -----------------------------------------------------------------------------
# Run folders. A run writes into --out:
#   step-000500.pt ...  every --save_interval steps, the last --keep of them kept: the weights, the optimizer, the
#                       step and run_state, all that a resumed run needs to go on exactly as if never stopped
#   last.pt             the same at the end; it marks the run finished
#   best.pt             the weights with the best validation score; hf/ the same for transformers
#   log.txt, teacher_responses_N.jsonl (seqkd)
# Two runs never share a folder: one that holds a run is refused unless --resume (go on with it, if it was made
# with the same settings) or --overwrite (replace it).
STEP_FILE = re.compile(r"step-\d+\.pt")
RUN_FILES = re.compile(STEP_FILE.pattern + r"|last\.pt|best\.pt|log\.txt|curves\.jsonl|hf|teacher_responses_\d+\.jsonl")
NOT_SETTINGS = {"out", "resume", "overwrite", "device", "compile", "max_minutes", "log_interval", "save_interval",
                "keep", "eos_id", "teacher_steps", "student_steps", "typed", "chunk", "fast_decode"}  # a resume may
# change these (--chunk and --fast_decode change how, not what: --chunk is also set by load_models, after this check)


def open_run(args, world):
    """find_resume(args), and under torchrun every process has read the folder before process 0 changes it. A folder
    that exists is held first (hold_folder), so that a second run on it stops at once."""
    if int(os.environ.get("RANK", "0")) == 0 and os.path.isdir(args.out):
        hold_folder(args.out)
    resume_path, ckpt, notes = find_resume(args)
    if resume_path == os.path.join(args.out, "last.pt"):  # a finished run, reused: nothing to hold it for
        let_go(args.out)
    if world > 1:
        dist.barrier()
    return resume_path, ckpt, notes


def find_resume(args):
    """Decides what becomes of the run in args.out, reading only (nothing is written before the inputs are checked).
    Returns (path, checkpoint) to resume from, or (None, None) for a new run, and the lines to log."""
    files = sorted(f for f in os.listdir(args.out) if RUN_FILES.fullmatch(f)) if os.path.isdir(args.out) else []
    if not files or args.overwrite:
        return None, None, []
    if not any(STEP_FILE.fullmatch(f) or f == "last.pt" for f in files) and not steps_logged(args.out):
        return None, None, [f"{args.out}: its run stopped before its first step: starting again"]  # (nothing lost)
    if not args.resume:
        raise InputError(f"{args.out}: holds a run already ({', '.join(files[:4])}): --resume continues it, "
                         "--overwrite replaces it")
    steps = sorted((f for f in files if STEP_FILE.fullmatch(f)), reverse=True)  # newest first
    candidates, warnings = ["last.pt"] * ("last.pt" in files) + steps + ["best.pt"] * ("best.pt" in files), []
    for name in candidates:
        path = os.path.join(args.out, name)
        try:
            ckpt = read_checkpoint(path)
        except InputError as e:  # truncated by a crash, or damaged since: the one before it
            warnings.append(f"warning: {e}; falling back to the checkpoint before it")
            continue
        made = {**vars(get_args([])), **ckpt["args"]}  # (a flag newer than the run: it ran with the default)
        for k in sorted((set(made) | set(vars(args))) - NOT_SETTINGS):
            if made.get(k) != vars(args).get(k):
                raise InputError(f"{args.out}: holds a run made with --{k} {made.get(k)}, not "
                                 f"{vars(args).get(k)}: --overwrite replaces it")
        if name == "best.pt":  # stopped before its first step-N.pt
            break
        return path, ckpt, warnings + [f"resuming from {path} (step {ckpt['step']})"]
    else:
        if candidates:
            raise InputError(f"{args.out}: no loadable checkpoint to resume from ({', '.join(candidates)})")
    return None, None, warnings + [f"{args.out}: nothing to resume from yet: the run starts again"]


def steps_logged(folder):
    """Whether the run in folder logged a training step ("step N | loss ...")."""
    path = os.path.join(folder, "log.txt")
    return os.path.isfile(path) and any(line.startswith("step") and "| loss" in line for line in open(path))


HELD = {}  # run folder -> the open lock file that holds it for this process


def hold_folder(folder):
    """One process at a time in a run folder: an exclusive flock on folder/.lock, held until the process ends (or
    let_go), which the kernel drops when the process dies, even by SIGKILL, so a stale lock never blocks. A second
    process stops at once with one line naming the folder and the holder. (Where fcntl is missing: not held.)"""
    key = os.path.realpath(folder)
    try:
        import fcntl  # (POSIX)
    except ImportError:
        return
    if key in HELD:
        return
    os.makedirs(folder, exist_ok=True)
    f = open(os.path.join(folder, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise InputError(f"{folder}: in use by {holder}: one run at a time in a folder (wait for it to end, stop "
                         "it, or give another --out)") from None
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()} on {platform.node()} ({' '.join(sys.argv[:3])} ..., since "
            f"{time.strftime('%H:%M:%S')})")
    f.flush()
    HELD[key] = f


def let_go(folder):
    """Releases a run folder this process holds (the end of a run inside a longer process: eval.py's sweeps)."""
    f = HELD.pop(os.path.realpath(folder), None)
    if f is not None:
        f.close()


def clear_run(folder, keep_cache):
    """Removes the files of the run in `folder` (for --overwrite, or a --resume that starts again)."""
    for f in os.listdir(folder) if os.path.isdir(folder) else []:
        if RUN_FILES.fullmatch(f) and not (keep_cache and f.startswith("teacher_responses_")):
            shutil.rmtree(os.path.join(folder, f)) if f == "hf" else os.remove(os.path.join(folder, f))


def run_summary(folder):
    """(steps run, step of best.pt, seconds, responses sampled) of a finished run, from its log.txt ("done: N steps
    in Xs; best.pt is step B; S responses sampled"); None for a folder without one (a checkpoint that was given, not
    trained here)."""
    path = os.path.join(folder, "log.txt")
    done = [line for line in open(path) if line.startswith("done:")] if os.path.isfile(path) else []
    if not done:
        return None
    m = re.match(r"done: (\d+) steps in (\d+)s; best.pt is step (\d+)(?:; (\d+) responses sampled)?", done[-1])
    return int(m[1]), int(m[3]), float(m[2]), int(m[4] or 0)


def run_state(progress, t_start, device, log_gen, rollouts, world):
    """What a checkpoint holds beyond the weights and the optimizer: the run's progress and seconds so far, and
    (under "ranks") every process's random state (torch on the CPU and the GPU, Python, numpy, the logged rkl's
    sampler) and MiniLLM rollout round (rollout_batches' state), on the CPU, gathered from every process."""
    np_state = np.random.get_state()
    mine = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "python": random.getstate(), "log_gen": log_gen.get_state(),
            "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
            "rollouts": {**rollouts, "round": {k: v.cpu() for k, v in rollouts["round"].items()}} if rollouts else {}}
    everyone = [mine]
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
    return {**progress, "elapsed": time.time() - t_start, "ranks": everyone}


def restore_rng(mine, device, log_gen):
    torch.set_rng_state(mine["torch"])
    if device.type == "cuda" and mine["cuda"] is not None:
        torch.cuda.set_rng_state(mine["cuda"], device)
    random.setstate(mine["python"])
    np.random.set_state((mine["numpy"][0], mine["numpy"][1].numpy().astype(np.uint32), *mine["numpy"][2:]))
    log_gen.set_state(mine["log_gen"])


def resume_run(ckpt, path, student, optimizer, progress, log_gen, rank, world, device):
    """Puts back what the checkpoint holds: weights, optimizer, progress, random states. Returns its metrics."""
    if len(ckpt["state"]["ranks"]) != world:
        raise InputError(f"{path}: written by {len(ckpt['state']['ranks'])} processes, not {world}")
    student.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    progress.update({k: ckpt["state"][k] for k in ("best", "best_step", "tokens", "bad_steps", "elapsed")})
    restore_rng(ckpt["state"]["ranks"][rank], device, log_gen)
    return ckpt["metrics"]


def save_step(args, student, optimizer, step, tokenizer, metrics, state, rank, sigterm, log):
    """Writes step-N.pt (process 0), keeps the last --keep of them, and after a SIGTERM stops the run there."""
    if rank == 0:
        save_checkpoint(os.path.join(args.out, f"step-{step:06d}.pt"), student, optimizer, step, args, tokenizer,
                        metrics, state)
        for old in sorted(f for f in os.listdir(args.out) if STEP_FILE.fullmatch(f))[:-args.keep]:
            os.remove(os.path.join(args.out, old))  # the last --keep are kept
    if sigterm:
        log(f"step {step}: {stop_name()}: stopped after writing step-{step:06d}.pt; --resume goes on from it")
        raise Stopped(f"{stop_name()} at step {step}: {args.out}/step-{step:06d}.pt written; --resume goes on from "
                      "it")


def finish_run(args, student, optimizer, step, tokenizer, metrics, state, progress, t_start, samples, rank, world,
               log):
    """The end of a run: hf/ (best.pt for transformers), the done line, last.pt (the run is finished)."""
    best_path = os.path.join(args.out, "best.pt")
    if rank == 0:
        seconds = time.time() - t_start
        save_pretrained(load_checkpoint(best_path)[0], os.path.join(args.out, "hf"), args.eos_id, tokenizer,
                        args.data)
        log(f"done: {step} steps in {seconds:.0f}s; best.pt is step {progress['best_step']}; {samples} responses "
            f"sampled -> {best_path} (and {args.out}/hf)")
        save_checkpoint(os.path.join(args.out, "last.pt"), student, optimizer, step, args, tokenizer, metrics, state)
        let_go(args.out)
    if world > 1:
        dist.barrier()  # the checkpoints exist before any process returns
        dist.destroy_process_group()


def skip_step(step, loss, stats, progress, optimizer, args, log):
    """A NaN or inf in a loss or a gradient: the step is skipped, and --max_bad_steps of them in a row stop the run."""
    progress["bad_steps"] += 1
    terms = [k for k, v in {"loss": loss.detach(), **stats}.items() if not math.isfinite(float(v))]
    terms = terms or ["gradient"]  # a finite loss whose gradient overflowed
    log(f"step {step}: non-finite {', '.join(terms)}; optimizer step skipped ({progress['bad_steps']} in a row)")
    optimizer.zero_grad(set_to_none=True)
    if progress["bad_steps"] >= args.max_bad_steps:
        raise FloatingPointError(f"step {step}: {progress['bad_steps']} steps in a row with a non-finite "
                                 f"{', '.join(terms)}; stopping (lower --lr?)")


def validation_line(step, metrics, best_step, elapsed):
    """(log line, curves record) of a validation: each metric, the step of best.pt, the seconds so far."""
    line = (f"step {step:5d} | " + " | ".join(f"val {k} {v:.4f}" for k, v in metrics.items()) +
            f" | best: step {best_step} | {elapsed:6.1f}s")
    return line, {"step": step, **{f"val {k}": float(v) for k, v in metrics.items()}, "best_step": best_step,
                  "seconds": round(elapsed, 1)}


def step_line(step, loss, stats, lr, tokens, elapsed, args):
    """(log line, curves record) at a step: loss and its terms (means over the steps since the last line),
    learning rate, tokens/s, time left; the record also has the seconds so far."""
    eta = elapsed / (step + 1) * (args.max_steps - step - 1)
    if args.max_minutes:
        eta = min(eta, args.max_minutes * 60 - elapsed)
    times = {k: PHASES.pop(k, 0.0) for k in ("step", "rollout", "rollout tokens", "teacher")}
    split = (f" | rollout {times['rollout']:.1f}s ({times['rollout tokens'] / times['rollout']:.0f} tok/s)"
             if times["rollout"] else "") + (f" | teacher {times['teacher']:.1f}s" if times["teacher"] else "")
    split += f" | student {times['step'] - times['rollout'] - times['teacher']:.1f}s" if split else ""
    line = (f"step {step:5d} | loss {float(loss):.4f} | " +
            " | ".join(f"{k} {v}" if isinstance(v, int) else f"{k} {float(v):.4f}" for k, v in stats.items()) +
            f" | lr {lr:.2e} | {tokens / elapsed:6.0f} tok/s{split} | ETA {eta:5.0f}s")
    split = {"rollout_s": times["rollout"], "rollout_tokens": times["rollout tokens"], "teacher_s": times["teacher"],
             "student_s": times["step"] - times["rollout"] - times["teacher"]} if times["rollout"] or times["teacher"] \
        else {}  # (the seconds since the last line, as the line splits them)
    return line, {"step": step, "loss": float(loss), **{k: v if isinstance(v, int) else float(v)
                                                        for k, v in stats.items()},
                  "lr": lr, "tok/s": round(tokens / elapsed), **{k: round(v, 2) for k, v in split.items()},
                  "seconds": round(elapsed, 1), "eta": round(eta)}


def logger(folder):
    """Returns log(line, record=None): prints the line and appends it to folder/log.txt, and a record (the same
    fields, for plots and other tools: eval.py --curves) as one JSON line to folder/curves.jsonl."""
    def log(line, record=None):
        print(line, flush=True)
        with open(os.path.join(folder, "log.txt"), "a") as f:
            f.write(line + "\n")
        if record is not None:
            with open(os.path.join(folder, "curves.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
    return log


def start_log(args, rank, resume_path, lines):
    """Makes the run folder (process 0; the files of a run that is replaced are removed) and returns log(line);
    logs the command, the settings and `lines`."""
    if rank == 0:
        if resume_path is None:
            clear_run(args.out, keep_cache=not args.overwrite)  # --overwrite, or a --resume that starts again
        hold_folder(args.out)  # (made here if new)
        # the command and every setting in the log file; on the screen, what differs from the defaults
        with open(os.path.join(args.out, "log.txt"), "a") as f:
            f.write(f"# {' '.join(sys.argv)}\n# settings: {vars(args)}\n")
        print(settings_block(args, os.path.join(args.out, "log.txt")), flush=True)
    log = logger(args.out) if rank == 0 else (lambda line, record=None: None)
    for line in lines:
        log(line)
    return log


def settings_block(args, where):
    """The settings that differ from the defaults, a line per group of flags (arg_parser's groups)."""
    ap, lines = arg_parser(), [f"settings (those not at their defaults; all of them in {where}):"]
    defaults = vars(get_args([]))
    for group in ap._action_groups[2:]:  # (after argparse's own two)
        flags = [a for a in group._group_actions if a.dest in vars(args) and vars(args)[a.dest] != defaults[a.dest]]
        flags = {a.dest: a for a in flags}.values()  # (--whiten and --no_whiten: one setting)
        if flags:
            text = " ".join(f"--{a.dest} {vars(args)[a.dest]}" for a in flags)
            lines.append(f"  {group.title + ':':<14}{text}")
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# The run's inputs: the method's defaults, the models, the data


def set_method_defaults(args):
    """The flags whose default depends on the method (None: not typed), and the warm-up on the run's length.
    Returns the lines to log about them."""
    notes = []
    if args.warmup_steps >= args.max_steps:
        if "warmup_steps" in args.typed:
            raise InputError(f"--warmup_steps {args.warmup_steps}: must be below --max_steps {args.max_steps} (else "
                             "the learning rate never reaches --lr)")
        notes.append(f"--warmup_steps {args.warmup_steps} (the default) is not shorter than --max_steps "
                     f"{args.max_steps}: warming up over {args.max_steps // 10} steps, a tenth of the run")
        args.warmup_steps = args.max_steps // 10
    if args.kd_ratio is None:  # kd / seqkd: the paper's 0.5; L_PT of minillm: the paper's pure LM loss, or the
        official = args.method == "minillm" and args.recipe == "official"  # official 0.5 LM + 0.5 soft cross-
        args.kd_ratio = 0.5 if args.method in ("kd", "seqkd") or official else 0.0  # entropy (losses.py pt_loss)
    if args.lm_coef is None:  # L_PT belongs to MiniLLM; --lm_coef adds it to the other methods too
        args.lm_coef = 1.0 if args.method == "minillm" else 0.0
    if args.pt_data is None and args.data == "builtin":
        args.pt_data = "builtin"
    typed = getattr(args, "typed", ())
    if args.method == "minillm" and args.lm_coef and args.pt_data == "builtin" and "lm_coef" not in typed:
        notes.append(f"--lm_coef {args.lm_coef:g} (the paper's L_PT) on the built-in text, which the built-in student "
                     "never learned: it costs validity there at every weight (docs/results.md); the pipeline runs "
                     "--lm_coef 0")
    if args.method == "onpolicy":  # on-policy distillation: fresh samples every step, unless rounds are typed
        args.rollout_size = args.rollout_size if "rollout_size" in typed else args.batch_size
        args.ppo_epochs = args.ppo_epochs if "ppo_epochs" in typed else 1
    if args.method in ("minillm", "onpolicy") and guarded(args) and "target_kl" not in typed:
        notes.append(f"the drift guard is on (--target_kl {args.target_kl:g}, not in the paper): a round's remaining "
                     f"passes are skipped once the mean kl_old passes 1.5x it; --target_kl 0 turns it off")
    return notes


def load_models(args, device):
    """The model to train (--init, or a fresh --model) and, for kd, seqkd and minillm, the teacher (--teacher),
    with the name of their shared tokenizer. Every mismatch stops here, before any training."""
    missing = [flag for flag, needed in (("--teacher CKPT", args.method != "sft" and not args.teacher),
                                         ("--init STUDENT_CKPT (the SFT student it starts from)",
                                          args.method in ("minillm", "onpolicy") and not args.init)) if needed]
    if missing:  # (every one at once)
        raise InputError(f"--method {args.method} needs " + " and ".join(missing))
    if args.method == "onpolicy" and args.divergence != "rkl" and args.chunk:
        raise InputError(f"--chunk computes the reverse KL a chunk at a time: not --divergence {args.divergence}")
    if not (args.single_step or args.long_term):
        raise InputError("--no_single_step with --no_long_term leaves MiniLLM no loss")
    tokenizer = args.tokenizer if args.tokenizer != "auto" else "builtin" if args.data == "builtin" else "gpt2"
    teacher = student = None
    for role, path in (("teacher", args.teacher if args.method != "sft" else None), ("student", args.init)):
        if path:
            bf16 = role == "teacher" and device.type == "cuda"  # (a Hugging Face teacher is read in bf16 at once)
            try:
                model, ckpt = load_checkpoint(path, device, torch.bfloat16 if bf16 else torch.float32)
            except InputError as e:  # (the flag that named the file)
                raise InputError(f"--{'teacher' if role == 'teacher' else 'init'} {e}") from None
            name = ckpt["tokenizer"] and data.tokenizer_name(ckpt["tokenizer"])
            if ckpt["tokenizer"] is None:
                raise InputError(f"{path}: no tokenizer.json (or vocab.json + merges.txt) beside the weights: "
                                 "nothing to tokenize the data with")
            if args.tokenizer != "auto" and not data.same_tokenizer(ckpt["tokenizer"], args.tokenizer):  # (by content)
                raise InputError(f"{path}: its tokenizer is {name}; this run tokenizes with {args.tokenizer} " + (
                    "(--tokenizer)" if "tokenizer" in args.typed else "(the built-in task's: give --data for yours)"))
            if role == "student" and teacher is not None and not data.same_tokenizer(ckpt["tokenizer"], tokenizer):
                raise InputError(f"{path}: its tokenizer ({name}) differs from the teacher's "
                                 f"({data.tokenizer_name(tokenizer)}, {args.teacher}), compared token by token: "
                                 "distillation compares their distributions over one vocabulary")
            tokenizer = ckpt["tokenizer"]
            teacher, student = (model.eval(), student) if role == "teacher" else (teacher, model)
    n_vocab = data.get_encoding(tokenizer).n_vocab
    if student is None:
        student = GPT(MODEL_SIZES[args.model](vocab_size=n_vocab, dropout=args.dropout)).to(device)
    for model, path in ((student, args.init), (teacher, args.teacher)):
        if model is not None and model.config.vocab_size < n_vocab:
            raise InputError(f"{path or '--model ' + args.model}: {model.config.vocab_size} embedding rows, fewer "
                             f"than the {n_vocab} tokens of its tokenizer {data.tokenizer_name(tokenizer)}")
        if model is not None:  # rows past the tokenizer's tokens (padding, sizes differing within a family) are
            model.config.n_vocab = n_vocab  # never predicted: both models' logits have the tokenizer's n_vocab
    if teacher is not None and device.type == "cuda":
        teacher.to(torch.bfloat16)  # it only runs forward: bf16 weights halve its memory (the official code: fp16)
    if ("chunk" not in args.typed and n_vocab > 65536 and not args.shard_teacher
            and (args.method == "minillm" or (args.method == "onpolicy" and args.divergence == "rkl"))):
        args.chunk = 4096  # a large vocabulary: (b, n, V) logits would not fit whole (typed --chunk 0 keeps them)
    if args.shard_teacher:  # FSDP: each process keeps 1/world of every teacher weight and gathers a block's
        if int(os.environ.get("WORLD_SIZE", "1")) < 2 or teacher is None:  # weights just for its forward
            raise InputError("--shard_teacher needs a teacher and torchrun with 2 or more processes")
        if args.method == "seqkd" or args.chunk:
            raise InputError("--shard_teacher works with kd and minillm, without --chunk")
        from torch.distributed.fsdp import fully_shard  # (imported when used: the import takes a second)
        for block in teacher.transformer.h:
            fully_shard(block)
        fully_shard(teacher)
    return student, teacher, tokenizer


def read_rows(args):
    """({split: rows}, skipped) of --data (the built-in task made in memory: nothing is written)."""
    return data.load_instructions(args.data, args.n_train, args.n_valid, args.n_test, skip_bad=args.skip_bad,
                                  cache_dir=None)


def load_data(args, student, teacher, tokenizer, start, rows=None):
    """The data of a run, checked: a dict of train_pairs ((prompt, response) token lists, prompt + response + EOS
    within the context), prompts (the training prompts that leave room for a response: MiniLLM's), val (what
    validate() needs), pt_batches (L_PT's text, after the `start` batches a resumed run has used; None without
    L_PT), and what seqkd and the log need."""
    if args.pt_data is None and args.lm_coef:  # the built-in text only fits the built-in task
        raise InputError(f"--data {args.data}: L_PT (--lm_coef {args.lm_coef:g}) needs its text: --pt_data "
                         "openwebtext | a .txt/.jsonl file (the built-in text only fits --data builtin), or "
                         "--lm_coef 0 to train without it")
    enc = data.get_encoding(tokenizer)
    args.eos_id = enc.eot_token
    template = "builtin" if args.data == "builtin" else "dolly"
    block = min(student.config.block_size, teacher.config.block_size if teacher else student.config.block_size)
    max_length = min(args.max_length, block)
    if teacher is not None and block - args.max_new_tokens < 1:
        raise InputError(f"--max_new_tokens {args.max_new_tokens} leaves no room for a prompt in block_size {block}")
    splits, skipped = rows or read_rows(args)
    longest = min(args.max_prompt_length, block - args.max_new_tokens)  # a prompt that leaves room to answer
    train_pairs, dropped = data.tokenize(splits["train"], enc, template, max_length, args.max_prompt_length)
    prompts = [p for p, _ in train_pairs if len(p) <= longest]
    need, flag = (args.rollout_size, "--rollout_size") if args.method in ("minillm", "onpolicy") else (
        args.batch_size, "--batch_size")
    if args.method in ("minillm", "onpolicy") and len(prompts) < need:
        raise data.DataError(f"{args.data}: {len(prompts)} usable training prompts, fewer than {flag} {need}")
    if args.method not in ("minillm", "onpolicy") and len(train_pairs) < args.batch_size:
        raise data.DataError(f"{args.data}: {len(train_pairs)} usable training examples, fewer than one batch "
                             f"of {args.batch_size}")
    val_rows, val_prompts = data.encode_prompts(splits["valid"], enc, template, longest)
    val = {"enc": enc, "rows": splits["valid"], "prompts": val_prompts,  # rouge: (prompt, reference), Rouge-L
           "rouge": list(zip(val_prompts, (r["response"] for r in val_rows)))[:256]}
    val["pairs"], dropped_valid = data.tokenize(splits["valid"], enc, template, max_length, args.max_prompt_length)
    if not val["pairs"] or (teacher is not None and not val["prompts"]):
        raise data.DataError(f"{args.data}: no usable validation examples")
    if args.pt_data == "builtin":  # held-out pretraining text (a seed no run trains on), 64 rows: what L_PT protects
        held_out = data.pretrain_batches("builtin", enc, 64, min(args.pt_length, block), seed=2 ** 32)
        val["pt"] = next(held_out)
    pt_batches = None
    if args.lm_coef:  # L_PT: the language-modelling loss on the pretraining stream (Algorithm 1)
        pt_batches = data.pretrain_batches(args.pt_data, enc, args.pt_batch_size, min(args.pt_length, block),
                                           args.seed, skip=start)
        pt_batches = itertools.chain([next(pt_batches)], pt_batches)  # (a bad --pt_data stops here)
    notes = [f"skipped {len(skipped)} bad rows (--skip_bad), first: {skipped[0]}"] if skipped else []
    return {"train_pairs": train_pairs, "prompts": prompts, "val": val, "pt_batches": pt_batches, "notes": notes,
            "enc": enc, "train_rows": splits["train"], "template": template, "max_length": max_length,
            "longest": longest, "dropped": dropped, "dropped_valid": dropped_valid}


def seqkd_data(teacher, task, args, log, rank, world):
    """SeqKD: task's training pairs become the teacher's responses to as many training prompts as one pass of the
    run uses (made by process 0 and cached in the run folder)."""
    n = min(len(task["train_rows"]), args.max_steps * args.batch_size)
    if rank > 0:
        dist.barrier()  # process 0 makes the file; the others then read it
    enc = task["enc"]
    rows = teacher_responses(teacher, task["train_rows"][:n], enc, task["template"], args,
                             os.path.join(args.out, f"teacher_responses_{n}.jsonl"), log)
    if rank == 0 and world > 1:
        dist.barrier()
    task["train_pairs"], task["dropped"] = data.tokenize(rows, enc, task["template"], task["max_length"],
                                                         args.max_prompt_length)
    task["teacher_samples"] = n
    if len(task["train_pairs"]) < args.batch_size:
        raise data.DataError(f"seqkd: the teacher ended {len(task['train_pairs'])} responses with EOS, fewer than "
                             f"one batch of {args.batch_size} (raise --max_new_tokens?)")


@torch.no_grad()
def teacher_responses(teacher, rows, enc, template, args, path, log):
    """SeqKD's training data: one response sampled from the teacher (T = 1, as the paper samples) for each
    training prompt; generated once and cached in the run folder as JSONL in the Dolly schema (readable, and
    reused by a later run in the same folder). Responses that reach max_new_tokens without EOS are dropped."""
    if os.path.isfile(path):
        log(f"reusing the teacher's responses in {path}")
        return data.read_examples(path)
    gen = torch.Generator(device=next(teacher.parameters()).device).manual_seed(args.seed)
    rows, prompts = data.encode_prompts(rows, enc, template, teacher.config.block_size - args.max_new_tokens)
    out, dropped, t0, chunk = [], 0, time.time(), 256
    for i in range(0, len(rows), chunk):
        batch = generate(teacher, prompts[i:i + chunk], args.max_new_tokens, args.eos_id, generator=gen).tolist()
        for r, toks in zip(rows[i:i + chunk], batch):
            response = enc.decode(toks[:toks.index(args.eos_id)]) if args.eos_id in toks else ""
            if response.strip():
                out.append({**r, "response": response})
            else:
                dropped += 1  # no EOS within max_new_tokens, or an empty response
        if (i // chunk) % 20 == 0 or i + chunk >= len(rows):
            done = min(i + chunk, len(rows))
            log(f"seqkd: the teacher answered {done}/{len(rows)} training prompts ({time.time() - t0:.0f}s)")
    data.write_jsonl_splits({os.path.basename(path)[:-len(".jsonl")]: out}, os.path.dirname(path))  # atomic
    log(f"seqkd: {len(out)} teacher responses ({dropped} without EOS or empty, dropped) -> {path}")
    return out


def log_data(args, task, log):
    if args.method in ("minillm", "onpolicy"):
        log(f"data {args.data}: {len(task['prompts'])} train prompts (longer than {task['longest']} tokens dropped) / "
            f"{len(task['val']['pairs'])} valid examples")
    else:
        log(f"data {args.data}: {len(task['train_pairs'])} train / {len(task['val']['pairs'])} valid examples "
            f"({task['dropped']} / {task['dropped_valid']} dropped: prompt over {args.max_prompt_length} tokens)")

# -----------------------------------------------------------------------------
# Devices and processes


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA GPU is available")
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    return torch.device(name)


def distributed(device):
    """(rank, world size): under torchrun (WORLD_SIZE > 1) after joining the process group (NCCL on GPUs, gloo on
    CPUs); (0, 1) in a plain run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if device.type == "cuda":
        torch.cuda.set_device(device)  # this process's GPU, for NCCL's collectives (all_gather_object too)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


def wrap_student(student, teacher, args, world, device, log):
    """What the training losses call: the student, compiled (--compile) and / or in DistributedDataParallel."""
    shape = {k: v for k, v in asdict(student.config).items() if v != getattr(GPTConfig, k) or k in ("n_layer",
             "n_head", "n_embd", "vocab_size", "block_size")}  # (and a family's fields where they differ)
    log(f"{args.method}: model {args.init or args.model}: {student.num_params() / 1e6:.3f}M parameters "
        f"({', '.join(f'{k} {v}' for k, v in shape.items())})"
        + (f"; teacher {args.teacher}: {teacher.num_params() / 1e6:.3f}M" if teacher else "")
        + (f"; --chunk {args.chunk} (a {student.config.n_vocab}-token vocabulary)" if "chunk" not in args.typed
           and args.chunk else ""))
    wrapped = student
    if args.compile:
        log("compiling the model with torch.compile")
        wrapped = torch.compile(student)
    if world > 1:
        log(f"{world} processes ({dist.get_backend()}): each takes 1/{world} of every batch")
        wrapped = DistributedDataParallel(wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    if args.shard_teacher:
        here = sum(p.to_local().numel() for p in teacher.parameters())
        log(f"teacher sharded (FSDP): {here / 1e6:.3f}M of its {teacher.num_params() / 1e6:.3f}M parameters here")
    return wrapped


def is_sharded(model):
    """Whether fully_shard (FSDP, --shard_teacher) has split this model over the processes."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # (not imported: nothing is sharded)
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def my_rows(x, y, rank, world, device):
    """Under torchrun: this process's rows of the global batch, and the weight that makes DDP's average of the
    gradients the gradient of the global mean over response tokens. (L_PT is computed by every process on the same
    text, with the unwrapped student: one DDP forward per backward, and its gradient joins the synced one.)"""
    if world == 1:
        return x.to(device), y.to(device), 1.0
    weight = world * (y[rank::world] != -100).sum() / (y != -100).sum()
    return x[rank::world].to(device), y[rank::world].to(device), weight


def agree_to_stop(last, rank, world, device):
    """(last, sigterm) that every process agrees on: process 0's clock and validation decide for all, and a SIGTERM
    to any process stops all."""
    sigterm = bool(STOP_SIGNALS)
    if world == 1:
        return last, sigterm
    flag = torch.tensor([float(last and rank == 0), float(sigterm)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag[0]), bool(flag[1])


def mean_over_processes(x, world):
    """A scalar tensor's mean over the processes, as a float that every process agrees on."""
    if world > 1:
        x = x.detach().clone()
        dist.all_reduce(x)
        x = x / world
    return float(x)

# -----------------------------------------------------------------------------
# The pipeline's input checks and its table


def check_pipeline(args):
    """Every input of the pipeline, checked before any stage trains (nothing is written): a typed flag that no stage
    would use, and the given --teacher / --init: they open (safely), share the pipeline's tokenizer and fit the
    vocabulary and the lengths. Raises InputError with one line."""
    unused = [k for k, stages in PIPELINE_FLAGS.items() if k in args.typed and not any(
        name in stages for name, _ in pipeline_stages(args))]
    if unused:
        raise InputError(f"--{unused[0]} sizes a stage that --{'teacher' if unused[0] == 'teacher_steps' else 'init'}"
                         " replaces: the pipeline does not train it")
    for name, settings in pipeline_stages(args):  # each stage's flags as its run will read them
        problem = check_args(argparse.Namespace(**{**vars(args), **settings}))
        if problem:
            raise InputError(f"the {name} stage: {problem}")
    builtin = args.data == "builtin"
    if not builtin and not (args.teacher and args.init):
        raise InputError(f"--data {args.data}: the pipeline trains a teacher and an SFT student for the built-in task "
                         "only: give --teacher CKPT and --init STUDENT_CKPT (--method sft trains either on your data)")
    tokenizer = args.tokenizer if args.tokenizer != "auto" or not builtin else "builtin"
    blocks = [] if args.teacher else [MODEL_SIZES["teacher"]().block_size]  # the teacher the pipeline trains
    if args.teacher or args.init:
        check = argparse.Namespace(**{**vars(args), "method": "kd" if args.teacher else "sft", "tokenizer": tokenizer,
                                      "shard_teacher": False})
        student, teacher, tokenizer = load_models(check, torch.device("cpu"))  # opens, compares tokenizers and
        blocks += [m.config.block_size for m in (student, teacher) if m is not None]  # vocabularies
    block = min(blocks)
    if block - args.max_new_tokens < 1:  # and the distillation stages' prompts: as train() counts them
        raise InputError(f"--max_new_tokens {args.max_new_tokens} leaves no room for a prompt in block_size {block}")
    enc = data.get_encoding(tokenizer)
    rows = read_rows(args)[0]
    longest = min(args.max_prompt_length, block - args.max_new_tokens)
    usable = len(data.encode_prompts(rows["train"], enc, "builtin" if builtin else "dolly", longest)[1])
    if usable < args.rollout_size:
        raise InputError(f"{usable} training prompts of --data {args.data} fit in {longest} tokens (block_size "
                         f"{block} - --max_new_tokens {args.max_new_tokens}), fewer than --rollout_size "
                         f"{args.rollout_size}")
    hold_folder(args.out)  # (every input checked: one pipeline at a time in --out)
    return tokenizer


STAGE_COST = {"teacher": (180, 4000), "student-sft": (41, 10000), "kd": (18, 600), "on-policy": (34, 600),
              "minillm": (57, 600), "table": (12, 1)}  # (seconds, steps) of a default run on the 2-core CPU


def stage_progress(k, stages, times):
    """'stage k of n, about M min left' before the k-th stage: STAGE_COST scaled to each stage's steps, and by how
    long the stages trained so far (times: {stage: seconds}) took against their share there (this machine's speed)."""
    plan = {name: STAGE_COST[name][0] * s["max_steps"] / STAGE_COST[name][1] for name, s in stages}
    plan["table"] = STAGE_COST["table"][0]
    done = sum(plan[name] for name in times)
    speed = sum(times.values()) / done if done else 1.0
    left = speed * sum(list(plan.values())[k - 1:]) / 60
    return f"stage {k} of {len(stages)}, about {left:.0f} min left" + ("" if done else " on a 2-core CPU")


def paper_difference(args, settings):
    """The line that says where the pipeline's MiniLLM stage runs otherwise than the paper, and why."""
    ours = {k: settings.get(k, getattr(args, k)) for k in PAPER}
    diff = ", ".join(f"--{k} {ours[k]} (the paper: {v})" for k, v in PAPER.items() if ours[k] != v)
    typed = [f"--{k}" for k in ("lr", *PAPER) if k in args.typed]
    if typed:
        why = f"as typed ({', '.join(typed)})"
    elif args.data != "builtin":
        why = "the pipeline's defaults (CHOSEN is the built-in task's: type --lr, --ppo_epochs, --batch_size for yours)"
    else:
        why = ("chosen on validation (python eval.py --sweep; docs/results.md) among settings that fit this run in 15 "
               "minutes; there one pass over each round scored above the paper's 4 in 22 of 24 paired settings")
    guard = ""
    if ours["ppo_epochs"] > 1:  # rounds that are reused: the drift guard, or its absence
        guard = (f"; with the drift guard --target_kl {args.target_kl:g} (not in the paper: a round's remaining passes "
                 "are skipped once the mean kl_old passes 1.5x it)" if args.target_kl else
                 "; without the drift guard (--target_kl 0)")
    return f"minillm: {diff or 'as the paper'}, lr {settings.get('lr', args.lr):g}: {why}{guard}"


def teacher_ahead(args, settings):
    """Distillation presumes a teacher better than the student on the task. Before the first distillation stage,
    the score that chooses its best.pt (task_score) on the validation set, for the teacher and the SFT student, printed;
    where the teacher is not ahead, one line says what that means, and the pipeline goes on. Returns both scores."""
    run = argparse.Namespace(**{**vars(args), **settings})
    set_method_defaults(run)
    device = pick_device(args.device)
    student, teacher, tokenizer = load_models(run, device)
    val = load_data(run, student, teacher, tokenizer, 0)["val"]
    with evaluating(student), evaluating(teacher):
        (name, ours), (_, theirs) = task_score(student, val, run).popitem(), task_score(teacher, val, run).popitem()
    print(f"validation {name} (what chooses each distilled best.pt): teacher {theirs:.4f}, SFT student {ours:.4f}")
    if theirs <= ours:
        print(f"the teacher is not ahead of the SFT student on validation {name}: distillation can only pull the "
              "student toward the teacher, so expect no gain; each stage keeps its step 0 (the SFT student) unless a "
              "later checkpoint scores higher")
    return theirs, ours


def print_comparison(args, tokenizer, stages, seeds=(0, 1, 2), draws=4):
    """The pipeline's table: teacher, SFT, KD, on-policy distillation and MiniLLM, each with its training steps and
    minutes, validation loss, reverse KL to the teacher (k3 per response on its own samples of the validation
    prompts), and on the test prompts, greedy and sampled at T = 1 as the paper evaluates (mean over `seeds`, and ±
    their std): validity by family on the built-in task, Rouge-L on other data. Each seed samples every test prompt
    `draws` times: with one draw the spread over seeds is the luck of 500 coin flips (about 2 points at 30% valid),
    as large as the gaps the table is read for; with 4 it is about half that (docs/performance.md). (Other data:
    one draw, as a real model's responses cost more and Rouge-L is not a coin flip.)"""
    device = pick_device(args.device)
    enc = data.get_encoding(tokenizer)
    args.eos_id = enc.eot_token
    builtin = args.data == "builtin"
    template, draws = ("builtin", draws) if builtin else ("dolly", 1)
    splits = read_rows(args)[0]
    val_pairs, _ = data.tokenize(splits["valid"], enc, template, args.max_length, args.max_prompt_length)
    _, val_prompts = data.encode_prompts(splits["valid"], enc, template, args.max_prompt_length)
    test_rows, test_prompts = data.encode_prompts(splits["test"], enc, template, args.max_prompt_length)
    distill = stages["minillm"]
    teacher, _ = load_checkpoint(distill["teacher"], device)
    columns = data.FAMILIES if builtin else []
    setting = lambda st: ", ".join(f"{k} {st.get(k, getattr(args, k)):g}" for k in ("lr", "batch_size") +
                                   (("rollout_size", "ppo_epochs") if st["method"] != "kd" else ()))
    print(f"\nKD, on-policy and MiniLLM: {distill['max_steps']} steps each from the SFT student (KD: "
          f"{setting(stages['kd'])}; on-policy: {setting(stages['on-policy'])}; MiniLLM: {setting(distill)}); "
          f"best.pt by validation {'validity' if builtin else 'Rouge-L'}.\nval loss, val rkl: {len(val_pairs)} "
          f"validation examples; {'validity' if builtin else 'Rouge-L'} on the {len(test_rows)} test prompts, greedy "
          f"and sampled at T = 1 (mean of seeds {', '.join(map(str, seeds))}, each {draws} "
          f"draw{'s' if draws > 1 else ''} per prompt; all: ± their std)")
    print(f"{'model':<9}{'decoding':>8}{'steps':>6}{'min':>5}{'val loss':>9}{'val rkl':>8}" +
          "".join(f"{f:>8}" for f in columns) + f"{'all' if builtin else 'Rouge-L':>13}")
    for label, path in (("teacher", distill["teacher"]), ("sft", distill["init"]),
                        *((name, os.path.join(args.out, name, "best.pt")) for name in ("kd", "on-policy", "minillm"))):
        model, ckpt = load_checkpoint(path, device)
        summary = run_summary(os.path.dirname(path))
        steps, minutes = (f"{summary[0]}", f"{summary[2] / 60:.1f}") if summary else ("-", "-")
        loss = validation_loss(model, val_pairs, 64, device, nullcontext())
        rkl = 0.0 if label == "teacher" else reverse_kl_k3(model, teacher, val_prompts, args,
                                                           torch.Generator(device).manual_seed(0))[0]

        def score(greedy, seed=0):  # {family: validity, "all": ...} or {"all": Rouge-L}, as fractions
            rows, prompts = (test_rows, test_prompts) if greedy else (test_rows * draws, test_prompts * draws)
            if builtin:
                return validity(model, enc, rows, greedy, seed, max_new_tokens=args.max_new_tokens)
            responses = respond(model, enc, prompts, greedy, seed, args.max_new_tokens)
            return {"all": sum(data.rouge_l(y, [r["response"]]) for y, r in zip(responses, rows)) /
                    (100 * len(rows))}  # (rouge_l is in points)
        greedy, sampled = score(True), [score(False, s) for s in seeds]
        mean = {f: sum(x[f] for x in sampled) / len(seeds) for f in greedy}
        spread = 100 * std([x["all"] for x in sampled])
        unit = "%" if builtin else ""
        for decoding, v, total in (("greedy", greedy, f"{100 * greedy['all']:.1f}{unit}"),
                                   ("sampled", mean, f"{100 * mean['all']:.1f}{unit} ± {spread:.1f}")):
            print(f"{label:<9}{decoding:>8}{steps:>6}{minutes:>5}{loss:9.3f}{rkl:8.2f}" +
                  "".join(f"{100 * v[f]:7.1f}%" for f in columns) + f"{total:>13}")
    import eval as evaluation  # (it imports this file: imported once the table is done)
    print(f"the stages' curves (validity, reverse KL, loss against step and minutes): "
          f"{evaluation.draw_curves([args.out], os.path.join(args.out, 'curves.png'))}")


def std(xs):
    """Sample standard deviation (0 for one value)."""
    m = sum(xs) / len(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0

# -----------------------------------------------------------------------------
# The command line


class ArgumentParser(argparse.ArgumentParser):
    """argparse as the command line needs it: --help shows every flag's default, and a mistake is one line (no usage
    block), a mistyped flag with the closest one (exit 2, argparse's code)."""
    class Formatter(argparse.HelpFormatter):
        def _get_help_string(self, action):  # "(default: X)" where the text does not already say it
            text = action.help or ""
            if action.nargs == 0 or "default" in text or action.default == argparse.SUPPRESS:
                return text  # (a switch: off unless typed, or its text names its default)
            return text + (" (default: none)" if action.default is None else " (default: %(default)s)")

    def __init__(self, **kwargs):
        super().__init__(formatter_class=self.Formatter, **kwargs)

    def error(self, message):
        typo = re.match(r"unrecognized arguments: (-\S+)", message)
        if typo:
            flag, flags = typo[1].split("=")[0], [o for a in self._actions for o in a.option_strings]
            close = sorted((f for f in flags if flag.startswith(f + "_")), key=len)[-1:] or difflib.get_close_matches(
                flag, flags, n=1)  # (--lr_rate: --lr, the flag it starts with; --teachr: --teacher, the nearest)
            message = f"unrecognized argument {flag}" + (f": did you mean {close[0]}?" if close else "")
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def arg_parser():
    """The command line's flags, in groups (--help shows them so, and so does the run's settings block)."""
    ap = ArgumentParser(description="MiniLLM distillation (see the docstring of minillm.py)", epilog=(
        "Without --method: the pipeline (teacher, SFT student, then KD, on-policy distillation and MiniLLM on the "
        "same budget, and their table; on other --data, give the teacher and the SFT student). A flag applies to "
        "every stage it means something for; those marked 'pipeline:' set the stage they name, and a typed flag "
        "always wins over the pipeline's own setting."))
    # what to run
    g = ap.add_argument_group("what to run")
    g.add_argument("--method", choices=["sft", "kd", "seqkd", "onpolicy", "minillm"],
                   help="sft: fine-tuning on ground truth; kd, seqkd, onpolicy: the baselines; minillm: reverse-KL "
                        "distillation (none: the pipeline, Algorithm 1 and the comparison; it trains the teacher and "
                        "the SFT student where not given, on the built-in task only)")
    g.add_argument("--teacher", help="kd, seqkd, onpolicy, minillm: the teacher checkpoint (a file of ours, a Hugging "
                                      "Face folder or hub name; pipeline: skips training one)")
    g.add_argument("--model", default="student", choices=sorted(MODEL_SIZES),
                    help="size to train from scratch (pipeline: the SFT student's)")
    g.add_argument("--init", help="start from this checkpoint instead of a fresh --model (onpolicy, minillm: the SFT "
                                   "student; pipeline: skips training one)")
    g.add_argument("--out", default="out", help="run folder: log.txt, curves.jsonl, best.pt, last.pt, step-N.pt "
                                                 "(default: out/METHOD, out/on-policy for onpolicy; the pipeline: out, "
                                                 "a folder per stage in it)")
    g.add_argument("--resume", action="store_true",
                    help="go on with the run in --out from its newest checkpoint (a new run if it has none)")
    g.add_argument("--overwrite", action="store_true", help="replace the run that --out holds")
    # data
    g = ap.add_argument_group("data")
    g.add_argument("--data", default="builtin", help="builtin | dolly | a .jsonl/.json file | a folder")
    g.add_argument("--n_train", type=int, default=100000, help="built-in task: training examples")
    g.add_argument("--n_valid", type=int, default=500, help="built-in task: validation examples (or PATH split)")
    g.add_argument("--n_test", type=int, default=500, help="built-in task: test examples (or PATH split)")
    g.add_argument("--max_length", type=int, default=512, help="prompt + response tokens (the paper: 512)")
    g.add_argument("--max_prompt_length", type=int, default=256, help="longer prompts are dropped (paper: 256)")
    g.add_argument("--tokenizer", default="auto", help="auto | builtin | gpt2; auto: the checkpoints' own, and for a "
                   "fresh model builtin with --data builtin, else gpt2")
    g.add_argument("--skip_bad", action="store_true", help="skip and count malformed data rows instead of stopping")
    g.add_argument("--pt_data", help="L_PT text: builtin | openwebtext | a .txt/.jsonl (default: builtin with "
                                      "--data builtin; other data must name it, or turn L_PT off with --lm_coef 0)")
    g.add_argument("--pt_batch_size", type=int, default=4, help="rows of pretraining text per L_PT batch")
    g.add_argument("--pt_length", type=int, default=64, help="tokens per L_PT row [paper: 512]")
    # MiniLLM (MINILLM_OPTIONS)
    g = ap.add_argument_group("MiniLLM")  # (MINILLM_OPTIONS, RECIPES)
    for name, (paper, default, meaning) in MINILLM_OPTIONS.items():
        pipeline = f"; pipeline: the distillation stages': {DISTILL[name]:g}" if name in DISTILL else ""
        if isinstance(paper, bool):  # on by default: --no_NAME turns it off; off by default: --NAME turns it on
            g.add_argument(f"--no_{name}" if default else f"--{name}", dest=name, default=default,
                            action="store_false" if default else "store_true",
                            help=f"{meaning} [paper: {'on' if paper else 'off'}]")
        else:
            here = "" if default is None else f" (default {default})"
            g.add_argument(f"--{name}", type=type(paper), default=default,
                            help=f"{meaning}{here} [paper: {paper}]{pipeline}")
    g.add_argument("--recipe", choices=["paper", "official"], default="paper",
                    help="minillm: the loss as the paper writes it (Eq. 7), or the official code's: the switches below "
                         "(RECIPES), which a typed one overrides")
    for name, (paper, official, meaning) in RECIPES.items():  # default None: set by --recipe (below)
        if isinstance(paper, bool):
            on = lambda x: "on" if x else "off"
            g.add_argument(f"--{name}", action="store_true", default=None,
                            help=f"{meaning} [paper: {on(paper)}; official: {on(official)}]; --no_{name}: off")
            g.add_argument(f"--no_{name}", dest=name, action="store_false", default=None, help=argparse.SUPPRESS)
        else:
            g.add_argument(f"--{name}", type=float, default=None, help=f"{meaning} [paper: {paper:g}; official: "
                                                                          f"{official:g}] (default: --recipe's)")
    g.add_argument("--divergence", choices=["rkl", "fkl", "jsd"], default="rkl",
                    help="onpolicy: the token-level divergence on the student's samples: reverse KL (through the "
                         "kernel), forward KL, or the generalized JSD with --beta")
    g.add_argument("--beta", type=float, default=0.5, help="--divergence jsd: 0 is the forward KL, 1 the reverse KL")
    g.add_argument("--shard_teacher", action="store_true",
                    help="torchrun: each process keeps 1/N of the teacher's weights (FSDP) instead of all of them")
    g.add_argument("--chunk", type=int, default=0,
                    help="minillm: compute the logits and the single-step term this many tokens at a time (0: all)")
    # optimization
    g = ap.add_argument_group("optimization")
    g.add_argument("--max_steps", type=int, default=2000,
                    help=f"training steps (pipeline: each distillation stage's: {DISTILL['max_steps']})")
    g.add_argument("--max_minutes", type=float, default=0, help="also stop after this much wall-clock time (0: off)")
    g.add_argument("--patience", type=int, default=0,
                    help="also stop after this many evaluations without a better validation score (0: off)")
    g.add_argument("--batch_size", type=int, default=32, help="examples per step (minillm, onpolicy in rounds: "
                                                               "responses per mini-batch of a round)")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (pipeline: the distillation stages' "
                                                           "instead of their CHOSEN; the SFT stages use their own)")
    g.add_argument("--min_lr", type=float, default=1e-4,
                    help="learning rate at the end of the cosine decay (pipeline: as --lr)")
    g.add_argument("--warmup_steps", type=int, default=100, help="steps of linear warm-up to --lr")
    g.add_argument("--weight_decay", type=float, default=0.01, help="AdamW's, on the weight matrices")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout of a model trained from scratch")
    g.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm (0: off)")
    g.add_argument("--max_bad_steps", type=int, default=10,
                    help="stop after this many optimizer steps in a row skipped for a non-finite loss or gradient")
    # the built-in pipeline (no --method): its stages' own settings are DISTILL and pipeline_stages(); any flag
    # applies to every stage it means something for, and --max_steps, --lr, --min_lr, --lm_coef, --eval_interval and
    # --log_interval, when typed, set the distillation stages (the SFT stages keep the pipeline's)
    g = ap.add_argument_group("the built-in pipeline (no --method)")
    g.add_argument("--teacher_steps", type=int, default=4000, help="pipeline: the teacher's SFT steps")
    g.add_argument("--student_steps", type=int, default=10000, help="pipeline: the student's SFT steps")
    # bookkeeping
    g = ap.add_argument_group("bookkeeping")
    g.add_argument("--eval_interval", type=int, default=500,
                    help=f"steps between validations (pipeline: the distillation stages': {DISTILL['eval_interval']})")
    g.add_argument("--log_interval", type=int, default=250,
                   help=f"steps between log lines (pipeline: the distillation stages': {DISTILL['log_interval']})")
    g.add_argument("--save_interval", type=int,
                    help="steps between the checkpoints that --resume goes on from (default: --eval_interval)")
    g.add_argument("--keep", type=int, default=2, help="how many of those checkpoints to keep")
    g.add_argument("--seed", type=int, default=1337, help="of the data order, the sampling and a fresh model")
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu) | cpu | cuda | mps")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (off by default)")
    g.add_argument("--fast_decode", action="store_true",
                    help="rollouts decode on a static cache, the step compiled (CUDA graphs on a GPU; see "
                         "fast_decode); off by default: on a CPU it is slower (README)")
    return ap


def get_args(argv=None):
    """The flags of argv (default: sys.argv), the recipe's switches set, and args.typed: the flags that were typed.
    A value out of its range stops here with one `error:` line (check_args)."""
    ap = arg_parser()
    args = ap.parse_args(argv)
    for name, values in RECIPES.items():  # the recipe's value of each switch not typed
        if getattr(args, name) is None:
            setattr(args, name, values[args.recipe == "official"])
    for action in ap._actions:  # parsed again without defaults: the flags that were typed, which the pipeline
        action.default = argparse.SUPPRESS  # never replaces with its own settings
    args.typed = sorted(vars(ap.parse_args(argv)))
    if args.method and "out" not in args.typed:  # one run: its own folder, the pipeline's name for its stage
        args.out = os.path.join("out", {"onpolicy": "on-policy"}.get(args.method, args.method))
    problem = check_args(args)
    if problem:
        sys.exit(f"error: {problem}")  # (as every input error: one line, exit 1)
    return args


def span(low, high=math.inf, low_open=False, high_open=False):
    """(test, words) of a flag's allowed values: finite, from low to high (an open end excluded)."""
    def ok(v):
        return math.isfinite(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if high == math.inf:
        return ok, f"above {low:g}" if low_open else f"at least {low:g}"
    return ok, f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


FLAG_RANGES = {  # every numeric flag's allowed values, checked where the flags are read (check_args)
    **{k: span(1) for k in ("n_train", "n_valid", "n_test", "max_prompt_length", "pt_batch_size", "pt_length",
                            "rollout_size", "ppo_epochs", "max_new_tokens", "max_steps", "batch_size",
                            "max_bad_steps", "teacher_steps", "student_steps", "eval_interval", "log_interval",
                            "save_interval", "keep")},
    **{k: span(0) for k in ("lm_coef", "reward_clip", "chunk", "max_minutes", "patience", "min_lr", "warmup_steps",
                            "weight_decay", "grad_clip")},
    **{k: span(0, 1) for k in ("alpha", "kd_ratio", "beta")},
    "max_length": span(2), "lr": span(0, low_open=True), "clip_eps": span(0, low_open=True),
    "reward_scaling": span(0, low_open=True), "gamma": span(0, 1, low_open=True),
    "dropout": span(0, 1, high_open=True), "seed": span(0, 2 ** 32 - 1),
}


def check_args(args):
    """The first problem with the flags' values, as one line naming the flag, its value and what is allowed; None if
    there is none. Only what the flags alone tell: the files they name are checked when the run opens them."""
    for name, (ok, words) in FLAG_RANGES.items():
        value = getattr(args, name)
        if value is not None and not ok(value):
            return f"--{name} {value}: must be {words}"
    if args.max_prompt_length >= args.max_length:
        return f"--max_prompt_length {args.max_prompt_length}: must be below --max_length {args.max_length}"
    rounds = args.method == "minillm" or args.method == "onpolicy" and "rollout_size" in args.typed
    if rounds and args.batch_size > args.rollout_size:
        return (f"--batch_size {args.batch_size}: a mini-batch is part of a round: at most --rollout_size "
                f"{args.rollout_size}")
    if args.method and args.min_lr > args.lr:  # (the pipeline's stages: pipeline_stages checks each)
        return (f"--min_lr {args.min_lr:g} is above --lr {args.lr:g}: the schedule decays from --lr to --min_lr "
                "(give --min_lr at or below --lr)")
    if args.method and "warmup_steps" in args.typed and args.warmup_steps >= args.max_steps:
        return (f"--warmup_steps {args.warmup_steps}: must be below --max_steps {args.max_steps} (else the learning "
                "rate never reaches --lr)")
    if args.data not in ("builtin", "dolly") and not os.path.exists(args.data):
        return f"--data {args.data}: no such file or folder (builtin, dolly, a .jsonl/.json file or a folder)"
    if args.pt_data not in (None, "builtin", "openwebtext") and not os.path.exists(args.pt_data):
        return f"--pt_data {args.pt_data}: no such file (builtin, openwebtext, a .txt or .jsonl file)"
    return None


if __name__ == "__main__":
    for s in (signal.SIGTERM, signal.SIGINT):  # a graceful stop: see train()
        signal.signal(s, on_stop_signal)
    main()
