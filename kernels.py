"""
Fused log-softmax / reverse-KL: the per-token quantities of MiniLLM's objective in one pass over the logits.

    python kernels.py                                  # benchmark (kernel figures need a GPU)
    python kernels.py --memory 256                     # peak memory of the chunked path (0: whole logits)
    python kernels.py --sweep                          # a GPU: block size and warps per row, timed
    python -m pytest test_minillm.py -q -k kernel      # correctness, on the CPU under TRITON_INTERPRET=1

For every response token MiniLLM needs (Gu et al., ICLR 2024, section 2.2):
- the single-step term (Eq. 3-4): the exact reverse KL over the vocabulary, KL(q || p) = sum_v q_v (log q_v - log p_v),
  with q = softmax(student logits / T), p = softmax(teacher logits / T);
- the rewards and the policy-gradient term (Eq. 2, 7): log q(y_t) and log p(y_t) of the sampled token.
Done naively that is several passes over two (N, V) tensors and (N, V) fp32 temporaries. Here: the PyTorch
reference (the specification), then the Triton kernels (forward and gradient), their launchers, the
autograd.Function, and `reverse_kl`, which dispatches to the kernel on CUDA or under TRITON_INTERPRET=1 and to the
reference otherwise.

Masked vocabulary (-inf logits from top-k/top-p masks or a padded vocabulary): as in the official code
(minillm/losses.py), an entry that is -inf in the student *or* the teacher is dropped from the KL sum (the union of
the two masks); its q_v still counts in the student's normalization. 0 * (-inf) is taken as 0, a row with every
entry masked gives KL = 0 and a zero gradient, never NaN. log q(y) and log p(y) are the true log-probabilities
(-inf if y itself is masked). Rows whose target is ignore_index give zeros and a zero gradient.
"""
import os
import time

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference serves
    triton = None

USE_TRITON = None  # None: the kernel on CUDA tensors or under TRITON_INTERPRET=1; True / False force a path (tests)


def check_inputs(student_logits, teacher_logits, targets):
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"student vocabulary {student_logits.shape[-1]} != teacher vocabulary "
                         f"{teacher_logits.shape[-1]}; if one is only padded (e.g. 50304 vs 50257), slice it: "
                         f"teacher_logits[..., :{min(student_logits.shape[-1], teacher_logits.shape[-1])}]")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    if targets is not None and targets.shape != student_logits.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must match the logits' leading shape "
                         f"{tuple(student_logits.shape[:-1])}")

# -----------------------------------------------------------------------------
# Reference (the specification)


def reverse_kl_ref(student_logits, teacher_logits, targets=None, temperature=1.0, ignore_index=-100):
    """KL(q || p) per row (..., V) -> (...); with targets also (log q(y), log p(y)). Gradient to the student only."""
    check_inputs(student_logits, teacher_logits, targets)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # fp32 math for bf16/fp16; float64 stays
    s = student_logits.to(dtype) / temperature
    t = teacher_logits.detach().to(dtype) / temperature
    masked = torch.isinf(s) | torch.isinf(t)  # the union of both masks leaves the KL sum
    # a row masked everywhere has no distribution: give it finite logits, its terms are all dropped below
    s = s.masked_fill(torch.isinf(s).all(-1, keepdim=True), 0.0)
    t = t.masked_fill(torch.isinf(t).all(-1, keepdim=True), 0.0)
    log_q, log_p = F.log_softmax(s, -1), F.log_softmax(t, -1)
    log_ratio = (log_q - log_p).masked_fill(masked, 0.0)  # masked before the product: no 0 * inf, even in backward
    kl = (log_q.exp() * log_ratio).sum(-1)  # Eq. 3-4: sum_v q_v (log q_v - log p_v)
    if targets is None:
        return kl
    ignore = targets == ignore_index
    y = targets.masked_fill(ignore, 0).unsqueeze(-1)
    lq_y = log_q.gather(-1, y).squeeze(-1).masked_fill(ignore, 0.0)
    lp_y = log_p.gather(-1, y).squeeze(-1).masked_fill(ignore, 0.0)
    return kl.masked_fill(ignore, 0.0), lq_y, lp_y

# -----------------------------------------------------------------------------
# Triton kernels: one program per row, a loop over V in blocks with the online max / sum (arXiv 1805.02867)
#
# Forward. With s = z/T (student) and t = teacher/T, m the running max and d = sum exp(s - m):
#   log q_v = s_v - lse_s,   log p_v = t_v - lse_t,   lse = m + log d
#   KL = sum_F q_v (log q_v - log p_v) = A / d_s - (lse_s - lse_t) * Q_F,
#   A = sum_F exp(s_v - m_s) (s_v - t_v),  Q_F = sum_F q_v,   F = entries finite in both.
# A, d_s and Q_F * d_s are rescaled by exp(m_old - m_new) whenever the running max grows, so one pass suffices.
# The kernels work in base 2: the hardware's exponential is exp2, and exp(x) = exp2(x log2 e), so the logits are
# read once as s * log2(e) / T (one multiply that the division by T needed anyway) and every exp is a bare exp2;
# base-2 sums, maxima and log-sum-exps turn into natural logs by one factor ln 2 per row.
#
# Gradient w.r.t. the student logits z, for upstream gradients g_kl (of KL) and g_lq (of log q(y)):
#   dKL/ds_j     = sum_{v in F} [dq_v/ds_j (log q_v - log p_v) + q_v dlog q_v/ds_j]
#                = 1[j in F] q_j (log q_j - log p_j + 1) - q_j (KL + Q_F)
#                  (= q_j (log q_j - log p_j - KL) when nothing is masked, Q_F = 1)
#   dlog q_y/ds_j = 1[j = y] - q_j
#   dL/dz_j      = [g_kl dKL/ds_j + g_lq (1[j = y] - q_j)] / T          (log p(y) has no student gradient)
#
# Bytes, for N rows of V logits of b bytes each: the forward reads both tensors once (2 N V b) and writes 6 N
# floats; the backward reads both once more (2 N V b) and writes the gradient once (N V b): 5 N V b in all. The
# floor is 3 N V b (read each input once, write the gradient once) and needs the upstream gradients during the
# forward pass; autograd supplies them only afterwards, and the gradient is a mix of two vectors (one per output)
# whose weights g_kl, g_lq are unknown until then, so storing partial gradients in the forward would move more
# bytes, not fewer. Two passes, no (N, V) temporaries.

if triton is not None:
    @triton.jit
    def _reverse_kl_fwd(S, T, Y, KL, LQ, LP, LSE_S, LSE_T, QF, stride_s, stride_t, V, scale, ignore_index,
                        HAS_TARGET: tl.constexpr, BLOCK: tl.constexpr):
        # scale = log2(e) / T: s and t below are the logits / T in base-2 units (exp(x) = exp2(x log2 e))
        row = tl.program_id(0).to(tl.int64)
        s_row, t_row = S + row * stride_s, T + row * stride_t
        m_s, d_s, a, qf = -float("inf"), 0.0, 0.0, 0.0  # student running max, sum, A (base 2), Q_F * d_s
        m_t, d_t = -float("inf"), 0.0                   # teacher running max, sum
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < V
            s = tl.load(s_row + cols, mask=inside, other=-float("inf")).to(tl.float32) * scale
            t = tl.load(t_row + cols, mask=inside, other=-float("inf")).to(tl.float32) * scale
            finite = (s != -float("inf")) & (t != -float("inf"))  # F
            m_new = tl.maximum(m_s, tl.max(s, 0))
            m_use = tl.where(m_new == -float("inf"), 0.0, m_new)  # an all-masked prefix: avoid -inf - -inf
            rescale = tl.exp2(m_s - m_use)  # the running sums were taken against the old max: rescale them
            e = tl.exp2(s - m_use)  # 0 where s = -inf
            d_s = d_s * rescale + tl.sum(e, 0)
            diff = tl.where(finite, s, 0.0) - tl.where(finite, t, 0.0)  # s - t on F, 0 elsewhere: no inf - inf
            a = a * rescale + tl.sum(e * diff, 0)  # and no 0 * (-inf)
            qf = qf * rescale + tl.sum(tl.where(finite, e, 0.0), 0)
            m_s = m_new
            mt_new = tl.maximum(m_t, tl.max(t, 0))
            mt_use = tl.where(mt_new == -float("inf"), 0.0, mt_new)
            d_t = d_t * tl.exp2(m_t - mt_use) + tl.sum(tl.exp2(t - mt_use), 0)
            m_t = mt_new
        ds_safe, dt_safe = tl.where(d_s > 0, d_s, 1.0), tl.where(d_t > 0, d_t, 1.0)  # d = 0: a fully masked row
        lse_s = tl.where(d_s > 0, m_s + tl.log2(ds_safe), 0.0)  # base-2 lse; 0 for a fully masked row, so that
        lse_t = tl.where(d_t > 0, m_t + tl.log2(dt_safe), 0.0)  # q_j = exp2(-inf - 0) = 0
        q_f = qf / ds_safe
        ln2 = 0.6931471805599453
        kl = tl.where(q_f > 0, (a / ds_safe - (lse_s - lse_t) * q_f) * ln2, 0.0)
        if HAS_TARGET:
            y = tl.load(Y + row)
            keep = y != ignore_index
            y_safe = tl.where(keep, y, 0).to(tl.int64)
            s_y = tl.load(s_row + y_safe).to(tl.float32) * scale
            t_y = tl.load(t_row + y_safe).to(tl.float32) * scale
            tl.store(LQ + row, tl.where(keep, (s_y - lse_s) * ln2, 0.0))
            tl.store(LP + row, tl.where(keep, (t_y - lse_t) * ln2, 0.0))
            kl = tl.where(keep, kl, 0.0)
        tl.store(KL + row, kl)
        tl.store(LSE_S + row, lse_s)  # (base 2, for the backward)
        tl.store(LSE_T + row, lse_t)
        tl.store(QF + row, q_f)

    @triton.jit
    def _reverse_kl_bwd(S, T, Y, G, KL, LSE_S, LSE_T, QF, G_KL, G_LQ, stride_s, stride_t, stride_g, V, scale,
                        inv_temp, ignore_index, HAS_TARGET: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        s_row, t_row, g_row = S + row * stride_s, T + row * stride_t, G + row * stride_g
        lse_s, lse_t = tl.load(LSE_S + row), tl.load(LSE_T + row)
        kl, q_f = tl.load(KL + row), tl.load(QF + row)
        g_kl = tl.load(G_KL + row)
        g_lq = 0.0
        ln2 = 0.6931471805599453  # (log_ratio below: on F, in natural units)
        y = -1
        if HAS_TARGET:
            y_raw = tl.load(Y + row)
            keep = y_raw != ignore_index
            g_kl = tl.where(keep, g_kl, 0.0)  # an ignored row: zero gradient
            g_lq = tl.where(keep, tl.load(G_LQ + row), 0.0)
            y = tl.where(keep, y_raw, -1).to(tl.int64)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < V
            s = tl.load(s_row + cols, mask=inside, other=-float("inf")).to(tl.float32) * scale  # (base 2, as in
            t = tl.load(t_row + cols, mask=inside, other=-float("inf")).to(tl.float32) * scale  # the forward)
            finite = (s != -float("inf")) & (t != -float("inf"))
            q = tl.exp2(s - lse_s)
            log_ratio = (tl.where(finite, s - lse_s, 0.0) - tl.where(finite, t - lse_t, 0.0)) * ln2  # log q - log p
            dkl = tl.where(finite, q * (log_ratio + 1.0), 0.0) - q * (kl + q_f)
            dlq = tl.where(cols == y, 1.0, 0.0) - q
            grad = (g_kl * dkl + g_lq * dlq) * inv_temp
            tl.store(g_row + cols, grad.to(G.dtype.element_ty), mask=inside)

# -----------------------------------------------------------------------------
# Launchers


LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)


# How a row is read: BLOCK logits per step of the loop over V, by num_warps warps (32 threads each), for each dtype
# of the logits. `python kernels.py --sweep` times the alternatives on a GPU.
LAUNCH = {torch.float32: (4096, 4), torch.bfloat16: (4096, 4), torch.float16: (4096, 4)}  # dtype: (BLOCK, warps)


def _launch_config(s):
    block, warps = LAUNCH.get(s.dtype, (4096, 4))
    return {"BLOCK": min(block, triton.next_power_of_2(s.size(1))), "num_warps": warps}


def _launch_fwd(s, t, y, temperature, ignore_index):
    N, V = s.shape
    out = [torch.empty(N, device=s.device, dtype=torch.float32) for _ in range(6)]  # kl, lq, lp, lse_s, lse_t, q_f
    has_target = y is not None
    _reverse_kl_fwd[(N,)](s, t, y if has_target else s, *out, s.stride(0), t.stride(0), V, LOG2E / temperature,
                          ignore_index, HAS_TARGET=has_target, **_launch_config(s))
    return out


def _launch_bwd(s, t, y, saved, g_kl, g_lq, temperature, ignore_index):
    N, V = s.shape
    kl, lse_s, lse_t, q_f = saved
    grad = torch.empty_like(s)  # the input dtype
    has_target = y is not None
    _reverse_kl_bwd[(N,)](s, t, y if has_target else s, grad, kl, lse_s, lse_t, q_f, g_kl, g_lq,
                          s.stride(0), t.stride(0), grad.stride(0), V, LOG2E / temperature, 1.0 / temperature,
                          ignore_index, HAS_TARGET=has_target, **_launch_config(s))
    return grad

# -----------------------------------------------------------------------------
# autograd.Function


class ReverseKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, y, temperature, ignore_index):
        kl, lq, lp, lse_s, lse_t, q_f = _launch_fwd(s, t, y, temperature, ignore_index)
        ctx.save_for_backward(s, t, y, kl, lse_s, lse_t, q_f)
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        ctx.mark_non_differentiable(lp)
        return kl, lq, lp

    @staticmethod
    def backward(ctx, g_kl, g_lq, g_lp):
        s, t, y, kl, lse_s, lse_t, q_f = ctx.saved_tensors
        zeros = torch.zeros_like(kl)
        g_kl = zeros if g_kl is None else g_kl.float().contiguous()
        g_lq = zeros if g_lq is None else g_lq.float().contiguous()
        grad = _launch_bwd(s, t, y, (kl, lse_s, lse_t, q_f), g_kl, g_lq, ctx.temperature, ctx.ignore_index)
        return grad, None, None, None, None

# -----------------------------------------------------------------------------
# Public function


def use_kernel(x):
    if USE_TRITON is not None:
        return USE_TRITON
    return triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def reverse_kl(student_logits, teacher_logits, targets=None, temperature=1.0, ignore_index=-100):
    """Same contract as reverse_kl_ref; the fused kernel where it can run, the reference elsewhere."""
    if not use_kernel(student_logits):
        return reverse_kl_ref(student_logits, teacher_logits, targets, temperature, ignore_index)
    check_inputs(student_logits, teacher_logits, targets)
    lead, V = student_logits.shape[:-1], student_logits.shape[-1]
    s = student_logits.reshape(-1, V).contiguous()  # (N, V), unit stride along V
    t = teacher_logits.detach().reshape(-1, V).contiguous()
    y = None if targets is None else targets.reshape(-1).contiguous()
    kl, lq, lp = ReverseKL.apply(s, t, y, float(temperature), ignore_index)
    if targets is None:
        return kl.view(lead)
    return kl.view(lead), lq.view(lead), lp.view(lead)

def reverse_kl_chunked(student_hidden, student_head, teacher_hidden, teacher_head, targets, chunk=1024,
                       ignore_index=-100):
    """reverse_kl from the final hidden states (..., C) and the lm_head weights (V, C) of the two models, `chunk`
    rows at a time, so that the (N, V) logits never exist whole (the fused-linear idea): each chunk's logits are
    made, reduced by reverse_kl to three numbers per row, and freed; the backward makes them again, chunk by chunk
    (activation checkpointing). The teacher side carries no gradient. A teacher vocabulary padded past the student's
    is sliced. Returns (kl, log q(y), log p(y)) shaped like targets."""
    from torch.utils.checkpoint import checkpoint
    V = student_head.size(0)
    h_q, h_p, y = student_hidden.flatten(0, -2), teacher_hidden.detach().flatten(0, -2), targets.reshape(-1)

    def rows(h_q_c, h_p_c, y_c):
        return reverse_kl(h_q_c @ student_head.t(), (h_p_c @ teacher_head.detach().t())[:, :V], y_c,
                          ignore_index=ignore_index)
    outs = [checkpoint(rows, h_q[i:i + chunk], h_p[i:i + chunk], y[i:i + chunk], use_reentrant=False)
            for i in range(0, len(y), chunk)]
    return tuple(torch.cat(o).view(targets.shape) for o in zip(*outs))

# -----------------------------------------------------------------------------
# The name `kernels`, shared with Hugging Face
#
# Hugging Face publishes a package of its own named `kernels`, which transformers (5.25 and later) imports with
# `from kernels import CUDAProperties, ...`. From this folder, and in any process that imported minillm, that name
# is this file, which has none of those names. So that transformers still works beside minillm, a name this file
# does not define is looked up in Hugging Face's package, found on sys.path past this folder and loaded once; this
# file keeps the name. Where that package is not installed, a missing name is the usual AttributeError.

_hub = None  # Hugging Face's `kernels` package, once something asked this module for a name it does not define


def __getattr__(name):  # (PEP 562: Python calls this only for a name the module does not define)
    if name.startswith("__"):  # (dunder probes such as __path__ never load the other package)
        raise AttributeError(name)
    hub = _hugging_face_kernels()
    if hub is None:
        raise AttributeError(f"module {__name__!r} ({__file__}) has no attribute {name!r}")
    return getattr(hub, name)


def _hugging_face_kernels():
    global _hub
    if _hub is None:
        import importlib.machinery
        import importlib.util
        import sys
        here = os.path.dirname(os.path.realpath(__file__))
        spec = importlib.machinery.PathFinder.find_spec(
            "kernels", [p for p in sys.path if os.path.realpath(p or os.curdir) != here])
        if spec is None or spec.submodule_search_locations is None:
            return None  # not installed (or only another lone kernels.py)
        hub, ours = importlib.util.module_from_spec(spec), sys.modules.get("kernels")
        sys.modules["kernels"] = hub  # while it loads: its own modules import it by that name
        try:
            spec.loader.exec_module(hub)
        except Exception as e:
            for loaded in [m for m in sys.modules if m.startswith("kernels.")]:
                del sys.modules[loaded]
            raise ImportError(
                f"{__file__} (minillm's Triton kernel) answers to the name `kernels` here, and Hugging Face's "
                f"`kernels` package, which transformers asked for, failed to load beside it "
                f"({type(e).__name__}: {e}); fix: `pip uninstall kernels` (transformers then runs without Hub "
                f"kernels), or use transformers in a process that does not import minillm, started outside "
                f"{here}") from None
        finally:
            if ours is None:
                sys.modules.pop("kernels", None)
            else:
                sys.modules["kernels"] = ours
        _hub = hub
    return _hub

# -----------------------------------------------------------------------------
# Benchmark


def benchmark():
    if not torch.cuda.is_available():
        print("no GPU: the kernel figures need one (python kernels.py on a CUDA machine). The reference on the CPU:")
        for N, V in ((256, 50257),):
            s, t = torch.randn(N, V, requires_grad=True), torch.randn(N, V)
            y = torch.randint(0, V, (N,))
            t0 = time.time()
            kl, lq, _ = reverse_kl_ref(s, t, y)
            (kl.sum() + lq.sum()).backward()
            print(f"  reference, N={N} V={V} fp32, forward+backward: {1000 * (time.time() - t0):.0f} ms")
        return
    from triton.testing import do_bench
    copy_gbs = copy_bandwidth()
    ref_compiled = torch.compile(reverse_kl_ref)
    print(f"{'V':>7} {'dtype':>5} {'pass':>8} {'impl':>8} {'ms':>8} {'GB/s':>7} {'% copy':>7} {'peak MiB':>9} "
          f"{'x eager':>8} {'x compile':>9}")
    N = 8192
    for V in (32000, 50257, 128256):
        for dtype in (torch.bfloat16, torch.float32):
            s = torch.randn(N, V, device="cuda", dtype=dtype, requires_grad=True)
            t = torch.randn(N, V, device="cuda", dtype=dtype)
            y = torch.randint(0, V, (N,), device="cuda")
            b = s.element_size()
            impls = {"eager": lambda: reverse_kl_ref(s, t, y), "compile": lambda: ref_compiled(s, t, y),
                     "kernel": lambda: reverse_kl(s, t, y)}
            for pass_name, bytes_moved in (("fwd", 2 * N * V * b), ("fwd+bwd", 3 * N * V * b)):  # minimum bytes
                times = {}
                for name, fn in impls.items():
                    def run():
                        kl, lq, _ = fn()
                        if pass_name == "fwd+bwd":
                            (kl.sum() + lq.sum()).backward()
                            s.grad = None
                    run()  # warm-up (compilation) outside the peak-memory window
                    torch.cuda.reset_peak_memory_stats()
                    ms = times[name] = do_bench(run)
                    peak = torch.cuda.max_memory_allocated() / 2 ** 20
                    gbs = bytes_moved / ms / 1e6
                    print(f"{V:>7} {str(dtype)[6:]:>5} {pass_name:>8} {name:>8} {ms:8.3f} {gbs:7.0f} "
                          f"{100 * gbs / copy_gbs:6.0f}% {peak:9.0f} {times['eager'] / ms:8.2f} "
                          f"{times.get('compile', ms) / ms:9.2f}")


def copy_bandwidth():
    """GB/s of a device-to-device copy of 256 MiB (read + write): the floor the kernels are measured against."""
    from triton.testing import do_bench
    copy = torch.empty(2 ** 28, device="cuda", dtype=torch.uint8)
    gbs = 2 * copy.numel() / do_bench(lambda: copy.clone()) / 1e6
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {gbs:.0f} GB/s")
    return gbs


def sweep(N=8192, V=50257, blocks=(2048, 4096, 8192, 16384), warps=(4, 8, 16), device="cuda", timer=None,
          copy_gbs=None):
    """python kernels.py --sweep (a GPU): the kernels' time for each (BLOCK, num_warps) of LAUNCH, per dtype, forward
    and forward + backward, as a share of copy bandwidth (minimum bytes, as in the benchmark); the best of each.
    (timer, copy_gbs: stand-ins for do_bench and the copy, for the test on a CPU.)"""
    from triton.testing import do_bench
    timer, copy_gbs, default = timer or do_bench, copy_gbs or copy_bandwidth(), dict(LAUNCH)
    print(f"N={N} V={V}: % of copy bandwidth (fwd: 2NVb bytes, fwd+bwd: 3NVb)")
    print(f"{'dtype':>8} {'BLOCK':>6} {'warps':>6} {'fwd ms':>8} {'fwd %':>6} {'f+b ms':>8} {'f+b %':>6}")
    for dtype in (torch.bfloat16, torch.float32):
        s = torch.randn(N, V, device=device, dtype=dtype, requires_grad=True)
        t, y = torch.randn(N, V, device=device, dtype=dtype), torch.randint(0, V, (N,), device=device)
        nvb, best = N * V * s.element_size(), None

        def both():
            kl, lq, _ = reverse_kl(s, t, y)
            (kl.sum() + lq.sum()).backward()
            s.grad = None
        try:
            for block in blocks:
                for w in warps:
                    LAUNCH[dtype] = (block, w)
                    fwd, fb = timer(lambda: reverse_kl(s, t, y)), timer(both)
                    pct = (100 * 2 * nvb / fwd / 1e6 / copy_gbs, 100 * 3 * nvb / fb / 1e6 / copy_gbs)
                    if best is None or pct[1] > best[1][1]:
                        best = ((block, w), pct)
                    print(f"{str(dtype)[6:]:>8} {block:>6} {w:>6} {fwd:8.3f} {pct[0]:5.0f}% {fb:8.3f} {pct[1]:5.0f}%")
        finally:
            LAUNCH.update(default)
        print(f"{str(dtype)[6:]}: best (BLOCK, warps) for forward + backward {best[0]}: forward {best[1][0]:.0f}%, "
              f"forward + backward {best[1][1]:.0f}% (LAUNCH: {default[dtype]})")


def memory(chunk, N=2048, C=768, V=50257):
    """Peak memory of the single-step term from hidden states, forward + backward: the whole (N, V) logits
    (chunk 0) against reverse_kl_chunked. CPU: the growth of the process's peak resident memory, so each setting
    runs in a fresh process (python kernels.py --memory CHUNK); CUDA: max_memory_allocated."""
    import resource
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device).manual_seed(0)
    h_q = torch.randn(N, C, device=device, generator=g).requires_grad_()
    w_q = (torch.randn(V, C, device=device, generator=g) * 0.05).requires_grad_()
    h_p, w_p = torch.randn(N, C, device=device, generator=g), torch.randn(V, C, device=device, generator=g) * 0.05
    y = torch.randint(0, V, (N,), device=device, generator=g)
    (h_q.sum() + w_q.sum()).backward()  # the gradient buffers exist before the measurement
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.max_memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.time()
    if chunk:
        kl, lq, _ = reverse_kl_chunked(h_q, w_q, h_p, w_p, y, chunk)
    else:
        kl, lq, _ = reverse_kl(h_q @ w_q.t(), h_p @ w_p.t(), y)
    (kl.sum() + lq.sum()).backward()
    after = torch.cuda.max_memory_allocated() if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"N={N} C={C} V={V} fp32 {device}, {'chunks of ' + str(chunk) if chunk else 'whole logits'}: peak "
          f"+{(after - before) / 2 ** 20:.0f} MiB over the inputs, {time.time() - t0:.2f}s")


if __name__ == "__main__":
    import sys
    if len(sys.argv) > 2 and sys.argv[1] == "--memory":
        memory(int(sys.argv[2]))
    elif sys.argv[1:] == ["--sweep"]:
        sweep()
    else:
        benchmark()
