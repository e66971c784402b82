"""
Evaluation as the paper does it, and the built-in Table 1.

    python eval.py out/student-sft/best.pt out/minillm/best.pt --teacher out/teacher/best.pt
    python eval.py CKPT --data dolly --seeds 10 20 30 --out out/eval
    python eval.py --table1                  # train KD, SeqKD, on-policy, MiniLLM and its ablations (3 training
                                             # seeds each) from the SFT student, then evaluate them all
    python eval.py --sweep                   # every method's small grid chosen on validation, then the test set
    python eval.py --guard                   # the drift guard's target chosen on validation, then the test set
    python eval.py --report                  # the sweep, Table 1 and the guard study from their records (docs/)
    python eval.py --curves out [DIR ...]    # the runs' curves (validity, reverse KL, loss) in one PNG
    python eval.py --bench generate          # generation: KV cache vs recomputing the prefix
    python eval.py --bench minillm [--shapes qwen] [minillm.py flags]  # MiniLLM steps at real scale, per loss path
    python eval.py --bench rollout [minillm.py flags]    # rollouts eager / fast vs transformers; MiniLLM vs KD cost
    python eval.py --bench tokenizers        # the built-in task: byte-level vs word-level tokens
    python eval.py --bench teacher           # the teacher's SFT step: padding, threads, fused AdamW, compile, FLOPs

For each checkpoint: responses sampled at T = 1, top-p 1, up to 256 new tokens, cut at EOS, for every test prompt,
once per seed; the metrics averaged over the seeds (mean and standard deviation):
- Rouge-L (the `rouge-score` package, RougeScorer(['rougeL'], use_stemmer=True)), F-measure x 100, maximum over the
  references: the paper's metric; and Rouge-L by reference length, [0, 5], [6, 10], [11, inf) words;
- Dist-4: distinct 4-grams over all 4-grams of the responses (diversity);
- on the built-in task: validity (data.is_valid), exact match on the single-answer families, validity per family;
- the test-set language-modelling loss (cross-entropy on the reference responses; no sampling);
- with --teacher: the reverse KL of the student to the teacher on its own samples (k3 per token, summed per
  response), and the exposure bias ExAccErr(l) (the paper's; exposure_bias below), a curve per model (PNG);
- calibration, on the built-in yes/no family: expected calibration error of the answer token's probability
  (10 bins), with a reliability diagram (PNG).
Each checkpoint's numbers go to a JSON file beside it (best.pt -> best-eval.json); the table of all of them to
--out (results.json, results.csv, results.md, exposure_bias.png, reliability.png).
"""
import argparse
import csv
import json
import math
import os
import resource
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import data
import kernels
import minillm

HERE = os.path.dirname(os.path.abspath(__file__))  # docs/ holds the records --report reads

BUCKETS = ((0, 5), (6, 10), (11, math.inf))  # reference length in words, as the paper's length analysis

# -----------------------------------------------------------------------------
# Metrics


def dist_n(texts, n=4):
    """Distinct n-grams over all n-grams of the responses (words); 0 when there is no n-gram at all."""
    grams = [tuple(ws[i:i + n]) for ws in (t.split() for t in texts) for i in range(len(ws) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def bucket_of(reference):
    words = len(reference.split())
    return next(f"[{lo},{hi}]" if hi != math.inf else f"[{lo},inf)" for lo, hi in BUCKETS if lo <= words <= hi)


def ece(confidence, correct, n_bins=10):
    """Expected calibration error: sum over equal-width confidence bins of |accuracy - mean confidence| weighted by
    the bin's share of the examples. Returns (ece, [(mean confidence, accuracy, count) per non-empty bin])."""
    conf, corr = torch.as_tensor(confidence, dtype=torch.float64), torch.as_tensor(correct, dtype=torch.float64)
    which = (conf * n_bins).long().clamp(max=n_bins - 1)  # confidence 1.0 falls in the last bin
    total, bins = 0.0, []
    for b in range(n_bins):
        sel = which == b
        if sel.any():
            c, a = conf[sel].mean().item(), corr[sel].mean().item()
            total += sel.sum().item() / len(conf) * abs(a - c)
            bins.append((c, a, int(sel.sum())))
    return total, bins


@torch.no_grad()
def exposure_bias(student, teacher, prompts, eos_id, length, seed):
    """ExAccErr(l) = (R(l) - eps(l)) / eps(l) x 100 for l = 1 .. length (Arora et al. 2022, as the MiniLLM paper
    measures it). R(l) accumulates the per-position KL(p || q) over the first l positions of responses the student
    generated; eps(l) the same along responses the teacher generated (each position averaged over the responses
    still running there). 0 when the student's prefixes cost no more than the teacher's own."""
    curves = []
    for alpha in (0.0, 1.0):  # p_mix with alpha 0: student samples; alpha 1: teacher samples
        b = minillm.rollout(student, teacher, prompts, length, eos_id, alpha, torch.Generator(
            next(student.parameters()).device).manual_seed(seed))
        q_logits = minillm.response_logits(student, b)
        p_logits = minillm.response_logits(teacher, b)[..., :q_logits.size(-1)]
        kl = minillm.forward_kl(q_logits, p_logits)  # (B, n): KL(p || q) at each position of each response
        mask = b["mask"].float()
        per_position = (kl * mask).sum(0) / mask.sum(0).clamp(min=1)
        curves.append(per_position.cumsum(0))
    n = min(len(c) for c in curves)
    R, eps = curves[0][:n], curves[1][:n]
    ex = torch.where(eps > 0, 100 * (R - eps) / eps.clamp(min=1e-12), torch.zeros_like(eps))
    return {"R": R.tolist(), "eps": eps.tolist(), "ExAccErr": ex.tolist()}


@torch.no_grad()
def yesno_calibration(model, enc, rows):
    """For each built-in yes/no prompt: the probability the model gives its answer (Yes or No, renormalized over
    the two), and whether that answer is right. Returns (confidences, correct)."""
    yes, no = enc.encode_ordinary("Yes")[0], enc.encode_ordinary("No")[0]
    device = next(model.parameters()).device
    conf, correct = [], []
    for i in range(0, len(rows), 128):
        chunk = rows[i:i + 128]
        idx, valid = minillm.left_pad(data.encode_prompts(chunk, enc, "builtin")[1], enc.eot_token, device)
        logits, _ = model(idx, valid=valid, last_only=True)
        p = F.softmax(logits[:, -1, [yes, no]].float(), -1)  # (b, 2): P(Yes), P(No) renormalized
        for r, (p_yes, p_no) in zip(chunk, p.tolist()):
            says_yes = p_yes >= p_no
            conf.append(max(p_yes, p_no))
            correct.append(says_yes == r["response"].startswith("Yes"))
    return conf, correct

# -----------------------------------------------------------------------------
# Evaluating one checkpoint


def sample_responses(model, enc, prompts, seed, max_new_tokens, label=""):
    """One response per prompt (token lists), sampled at T = 1 (top-p 1), cut at EOS; a progress line on stderr."""
    t0 = time.time()
    out = minillm.respond(model, enc, prompts, seed=seed, max_new_tokens=max_new_tokens, progress=lambda n: print(
        f"\r  {label} seed {seed}: {n}/{len(prompts)} responses ({time.time() - t0:.0f}s)", end="", file=sys.stderr,
        flush=True))
    print(file=sys.stderr)
    return out


def mean_std(xs):
    return sum(xs) / len(xs), minillm.std(xs)


def evaluate(path, teacher, rows, template, args, device):
    """All metrics of one checkpoint on the test rows: {metric: [mean, std]} plus curves and bins. teacher: None or
    (model, tokenizer name)."""
    model, ckpt = minillm.load_checkpoint(path, device)
    if ckpt["tokenizer"] is None:
        raise minillm.InputError(f"{path}: no tokenizer.json (or vocab.json + merges.txt) beside the weights: nothing "
                                 "to tokenize the test prompts with")
    enc = data.get_encoding(ckpt["tokenizer"])
    if teacher is not None:
        if not data.same_tokenizer(teacher[1], ckpt["tokenizer"]):
            raise minillm.InputError(f"{path}: tokenizer {data.tokenizer_name(ckpt['tokenizer'])} differs from the "
                                     f"teacher's {data.tokenizer_name(teacher[1])}")
        teacher = teacher[0]
    label = run_label(path)
    longest = min(256, model.config.block_size // 2)  # the paper drops prompts over 256 tokens; leave room to answer
    kept, prompts = data.encode_prompts(rows, enc, template, longest)
    if len(kept) < len(rows):
        print(f"{label}: {len(rows) - len(kept)} of {len(rows)} test prompts dropped (longer than {longest} tokens)")
    if not kept:
        raise minillm.InputError(f"{path}: no test prompt fits in {longest} tokens (block_size "
                                 f"{model.config.block_size})")
    rows = kept
    builtin = all(r.get("category") in data.FAMILIES for r in rows)
    per_seed = []
    for seed in args.seeds:
        responses = sample_responses(model, enc, prompts, seed, args.max_new_tokens, label=label)
        rouge = [data.rouge_l(resp, [r["response"]]) for r, resp in zip(rows, responses)]
        m = {"rougeL": sum(rouge) / len(rouge), "dist4": dist_n(responses)}
        for lo, hi in BUCKETS:
            name = f"[{lo},{hi}]" if hi != math.inf else f"[{lo},inf)"
            sel = [x for x, r in zip(rouge, rows) if bucket_of(r["response"]) == name]
            if sel:  # (a band without references is left out: "-" in the table)
                m[f"rougeL {name}"] = sum(sel) / len(sel)
        if builtin:
            ok = [data.is_valid(r, resp) for r, resp in zip(rows, responses)]
            m["valid"] = 100 * sum(ok) / len(ok)
            single = [(r, resp) for r, resp in zip(rows, responses) if r["category"] in data.SINGLE_ANSWER]
            m["exact"] = 100 * sum(resp.strip() == r["response"] for r, resp in single) / max(len(single), 1)
            for f in data.FAMILIES:
                fam = [o for o, r in zip(ok, rows) if r["category"] == f]
                if fam:
                    m[f"valid {f}"] = 100 * sum(fam) / len(fam)
        if teacher is not None:
            run = argparse.Namespace(max_new_tokens=min(args.max_new_tokens, model.config.block_size -
                                                        max(map(len, prompts))), eos_id=enc.eot_token)
            m["rkl"], _ = minillm.reverse_kl_k3(model, teacher, prompts, run, torch.Generator(device).manual_seed(seed))
        per_seed.append(m)
    result = {"checkpoint": path, "label": label, "data": args.data, "seeds": args.seeds, "n": len(rows),
              "max_new_tokens": args.max_new_tokens}
    result.update({k: list(mean_std([m[k] for m in per_seed])) for k in per_seed[0]})
    pairs, _ = data.tokenize(rows, enc, template, min(512, model.config.block_size), 256)
    result["lm_loss"] = [minillm.validation_loss(model, pairs, 64, device, nullcontext()), 0.0]
    if teacher is not None:
        first = prompts[:args.exposure_prompts]
        result["exposure"] = exposure_bias(model, teacher, first, enc.eot_token, min(
            args.exposure_len, model.config.block_size - max(map(len, first))), args.seeds[0])
    yesno = [r for r in rows if r.get("category") == "yesno"]
    if builtin and yesno:
        error, bins = ece(*yesno_calibration(model, enc, yesno))
        result["ece"], result["reliability"] = [error, 0.0], bins
    save_evaluation(path, result)
    return result


def run_label(path):
    """A checkpoint's row label: the run's folder for its best.pt, last.pt or hf/ (out/kd/best.pt, out/kd/hf -> kd),
    else the file's name (other/student.pt -> student)."""
    path = os.path.normpath(path)
    label = os.path.splitext(os.path.basename(path))[0]
    return os.path.basename(os.path.dirname(os.path.abspath(path))) if label in ("best", "last", "hf") else label


def save_evaluation(path, result):
    """The checkpoint's own evaluation file beside it (best.pt -> best-eval.json; an hf/ folder: hf-eval.json beside
    it). One made with other data, prompts, seeds or length is replaced with a line saying so."""
    target = os.path.normpath(path) + "-eval.json" if os.path.isdir(path) else os.path.splitext(path)[0] + "-eval.json"
    setup = ("data", "n", "seeds", "max_new_tokens")
    try:
        with open(target) as f:
            before = json.load(f)
        if any(before.get(k) != result[k] for k in setup):
            print(f"replacing {target}: it held an evaluation with " +
                  ", ".join(f"{k} {before.get(k)}" for k in setup if before.get(k) != result[k]))
    except (OSError, ValueError):
        pass
    with open(target + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(target + ".tmp", target)


def trained_on(path):
    """The --data a checkpoint was trained on, as it records it (a run's checkpoint: its flags; our Hugging Face
    export: config.json's minillm_data), or None."""
    if os.path.isdir(path):
        try:
            with open(os.path.join(path, "config.json")) as f:
                return json.load(f).get("minillm_data")
        except (OSError, ValueError):
            return None
    if not os.path.isfile(path):  # (a hub name: its data is not recorded)
        return None
    return (minillm.read_checkpoint(path).get("args") or {}).get("data")


def checkpoint_data(paths):
    """The --data to evaluate on when none is given: the one every checkpoint was trained on."""
    found = {p: trained_on(p) for p in paths}
    missing = [p for p, d in found.items() if d is None]
    if missing:
        raise minillm.InputError(f"{missing[0]}: records no training data: give --data (builtin, dolly, a "
                                 ".jsonl/.json file or a folder)")
    if len(set(found.values())) > 1:
        raise minillm.InputError("the checkpoints were trained on different data (" + ", ".join(
            f"{p}: {d}" for p, d in found.items()) + "): give --data")
    return found[paths[0]]

# -----------------------------------------------------------------------------
# Reports: the table (stdout, Markdown, CSV, JSON) and the two plots


COLUMNS = ["rougeL", "valid", "exact", "dist4", "rkl", "ece", "lm_loss", "steps", "best_step", "minutes"]
DIGITS = {"dist4": 3, "ece": 3, "lm_loss": 3, "rkl": 2, "steps": 0, "best_step": 0, "samples": 0}  # others: 1


def table(results, columns=None):
    """Markdown table: one row per checkpoint (or per method over training seeds), mean ± std over the seeds (ece and
    lm_loss of one checkpoint involve no sampling)."""
    cols = [c for c in (columns or COLUMNS) if any(c in r for r in results)]
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in results:
        cells = []
        for c in cols:
            if isinstance(r.get(c), str):  # (a cell already written, e.g. "valid per seed")
                cells.append(r[c])
                continue
            digits = DIGITS.get(c, 1)
            m, s = r.get(c, (math.nan, 0.0))
            spread = s or r.get("train_seeds", 1) > 1  # (over training seeds: shown even when 0)
            cells.append("-" if not math.isfinite(m) else f"{m:.{digits}f} ± {s:.{digits}f}" if spread else
                         f"{m:.{digits}f}")
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_reports(results, folder):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    keys = list(dict.fromkeys(k for r in results for k in pairs(r)))
    with open(os.path.join(folder, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model"] + [f"{k} {s}" for k in keys for s in ("mean", "std")])
        for r in results:
            w.writerow([r["label"]] + [x for k in keys for x in r.get(k, ["", ""])])
    buckets = [k for k in keys if k.startswith("rougeL [")]
    families = [k for k in keys if k.startswith("valid ")]
    with open(os.path.join(folder, "results.md"), "w") as f:
        f.write(table(results) + "\n\nRouge-L by reference length (words):\n\n" + table(results, buckets) + "\n")
        if families:
            f.write("\nValidity per family:\n\n" + table(results, families) + "\n")
    plots(results, folder)


def plots(results, folder):
    import matplotlib  # imported here: only the reports need it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if any("exposure" in r for r in results):
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in results:
            if "exposure" in r:
                ax.plot(range(1, len(r["exposure"]["ExAccErr"]) + 1), r["exposure"]["ExAccErr"], label=r["label"])
        ax.set(xlabel="generated length l (tokens)", ylabel="ExAccErr(l) (%)", title="Exposure bias")
        ax.axhline(0, color="gray", lw=0.5)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(folder, "exposure_bias.png"), dpi=120)
        plt.close(fig)
    if any("reliability" in r for r in results):
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.plot([0, 1], [0, 1], color="gray", lw=0.5)
        for r in results:
            if "reliability" in r:
                conf, acc, _ = zip(*r["reliability"])
                ax.plot(conf, acc, "o-", label=f"{r['label']} (ECE {r['ece'][0]:.3f})")
        ax.set(xlabel="confidence", ylabel="accuracy", title="Reliability, built-in yes/no", xlim=(0.45, 1.02))
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(folder, "reliability.png"), dpi=120)
        plt.close(fig)

def run_folders(paths):
    """The run folders that paths name: a folder with a curves.jsonl is one; a folder of them (the pipeline's out/)
    stands for those in it, the pipeline's stages in their order."""
    order = list(minillm.STAGE_COST)  # (the pipeline's stages; other folders after them)
    folders = []
    for path in paths:
        if os.path.isfile(os.path.join(path, "curves.jsonl")):
            folders.append(path)
            continue
        inside = sorted((f for f in (os.listdir(path) if os.path.isdir(path) else [])
                         if os.path.isfile(os.path.join(path, f, "curves.jsonl"))),
                        key=lambda f: (order.index(f) if f in order else len(order), f))
        if not inside:
            raise minillm.InputError(f"{path}: no curves.jsonl in it or in its folders (a run folder of minillm.py, "
                                     "or a folder of them)")
        folders += [os.path.join(path, f) for f in inside]
    return folders


def read_validations(folder):
    """The validation records of a run's curves.jsonl, by step; a step logged twice (a run resumed from before it)
    keeps its last record."""
    val = {}
    for line in open(os.path.join(folder, "curves.jsonl")):
        record = json.loads(line)
        if "val loss" in record:
            val[record["step"]] = record
    return [val[k] for k in sorted(val)]


def draw_curves(paths, out):
    """`python eval.py --curves DIR ...`: one PNG of the runs' curves: validation validity (or Rouge-L), reverse KL to
    the teacher and loss (on the validation responses) against the step (top row) and the training minutes (bottom
    row), a line per run. Returns the PNG's path."""
    import matplotlib  # imported here: only the reports need it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    folders = run_folders(paths)
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    panels = (("val valid", "validation validity (%)", 100), ("val rkl", "reverse KL to the teacher (validation)", 1),
              ("val loss", "validation loss (CE on the responses)", 1))
    for i, folder in enumerate(folders):  # (a run keeps its colour in every panel)
        val = read_validations(folder)
        label = os.path.basename(os.path.normpath(folder))
        for col, (key, title, scale) in enumerate(panels):
            key = key if key != "val valid" or any(key in r for r in val) else "val rougeL"
            points = [(r["step"], r["seconds"] / 60, scale * r[key]) for r in val if key in r]
            for row in range(2):
                if points:
                    axes[row, col].plot([p[row] for p in points], [p[2] for p in points], marker=".", color=f"C{i}",
                                        label=label if (row, col) == (0, 2) else None)
                axes[row, col].set(xlabel=("step", "training minutes")[row], title=title if row == 0 else None)
    for row in range(2):
        axes[row, 2].set_yscale("log")  # (the SFT stages start far above where distillation moves)
    fig.legend(loc="upper center", ncol=len(folders), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

# -----------------------------------------------------------------------------
# Benchmarks (they print tables; the tests run them small)


def bench_generate(device="auto", n_prompts=64, new_tokens=128, repeats=3):
    """--bench generate: the built-in teacher's generation with the KV cache against recomputing the whole prefix at
    every step (random weights: the cost does not depend on them; eos_id None runs every row to the end)."""
    device = minillm.pick_device(device)
    enc = data.get_encoding("builtin")
    torch.manual_seed(0)
    model = minillm.GPT(minillm.MODEL_SIZES["teacher"](vocab_size=enc.n_vocab)).to(device).eval()
    _, prompts = data.encode_prompts(data.make_builtin(0, 0, n_prompts)["test"], enc, "builtin")
    print(f"teacher {model.num_params() / 1e6:.2f}M parameters, {len(prompts)} prompts of "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens, {new_tokens} new tokens each, device {device}")
    times = {}
    for use_cache in (True, False):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.time()
            out = minillm.generate(model, prompts, new_tokens, None, greedy=True, use_cache=use_cache)
            best = min(best, time.time() - t0)
        times[use_cache] = best
        print(f"{'KV cache' if use_cache else 'recompute':<10} {best:7.2f}s  {out.numel() / best:8.0f} tokens/s")
    print(f"speedup {times[False] / times[True]:.1f}x")


QWEN = dict(model_type="qwen2", bias=False, norm="rmsnorm", norm_eps=1e-6, pos="rope", rope_theta=1e6, mlp="swiglu",
            qkv_bias=True, vocab_size=151936, n_vocab=151665, block_size=32768)  # Qwen2.5: 271 padding rows
BENCH_SHAPES = {  # --shapes: (teacher, student) on a GPU; on a CPU, small models with the same vocabulary
    "gpt2": ((minillm.MODEL_SIZES["gpt2-xl"](), minillm.MODEL_SIZES["gpt2"]()),
             (minillm.MODEL_SIZES["teacher"](vocab_size=1623), minillm.MODEL_SIZES["student"](vocab_size=1623))),
    "qwen": ((minillm.GPTConfig(**QWEN, n_layer=28, n_head=12, n_kv_head=2, n_embd=1536, n_inner=8960),  # 1.5B
              minillm.GPTConfig(**QWEN, n_layer=24, n_head=14, n_kv_head=2, n_embd=896, n_inner=4864)),  # 0.5B
             (minillm.GPTConfig(**QWEN, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, n_inner=128),
              minillm.GPTConfig(**QWEN, n_layer=1, n_head=4, n_kv_head=2, n_embd=32, n_inner=64))),
}


def bench_models(args, shapes):
    """The benchmarks' device, autocast context, teacher (bf16 on a GPU, as load_models puts it), student (random
    weights, BENCH_SHAPES) and vocabulary size."""
    device = minillm.pick_device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    teacher_config, student_config = BENCH_SHAPES[shapes][0 if cuda else 1]
    with torch.device(device):
        teacher, student = minillm.GPT(teacher_config).eval(), minillm.GPT(student_config)
    if cuda:
        teacher.to(torch.bfloat16)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    return device, ctx, teacher, student, student_config.n_vocab or student_config.vocab_size


def bench_minillm(args, shapes="gpt2"):
    """--bench minillm: MiniLLM steps on a GPU at real scale, random weights, random 64-token prompts: --shapes
    gpt2 (the paper's: a GPT-2-XL-shaped teacher in bf16, a GPT-2-shaped student) or qwen (Qwen2.5-1.5B and
    Qwen2.5-0.5B shapes, their 151,936-row embeddings and 151,665-token vocabulary); on a CPU, small models with the
    same vocabulary, as a smoke test. Prints rollout tokens/s, then args.max_steps training steps on one round of
    rollouts for each way of computing the single-step term (the kernel with --chunk, the fused kernel on whole
    logits, the PyTorch reference): ms per step and peak memory (GPU: allocated, per variant; CPU: the process's
    peak resident memory so far). args: minillm.py's settings (minillm.get_args)."""
    device, ctx, teacher, student, V = bench_models(args, shapes)
    cuda = device.type == "cuda"
    run = argparse.Namespace(**{**vars(args), "eos_id": V - 1, "chunk": 0})
    prompts = torch.randint(0, V - 1, (run.rollout_size, 64)).tolist()
    print(f"teacher {teacher.num_params() / 1e9:.2f}B, student {student.num_params() / 1e6:.0f}M, V {V}, "
          f"{run.rollout_size} rollouts of up to {run.max_new_tokens} tokens, mini-batches of {run.batch_size}, "
          f"{device}")
    batches = minillm.rollout_batches(student, teacher, prompts, run, device, ctx=ctx)
    t0 = minillm.clock()  # (clock: the time once the GPU has done what is queued)
    buffer = [next(batches)]  # the first next() makes the round of rollouts
    seconds = minillm.clock() - t0
    buffer += [next(batches) for _ in range(run.rollout_size // run.batch_size - 1)]
    print(f"rollout: {run.rollout_size * buffer[0]['tokens'].size(1) / seconds:.0f} tokens/s "
          f"({seconds:.1f}s for the round)")
    optimizer = minillm.make_optimizer(student, args)
    print(f"{'single-step term':<22}{'ms / step':>10}{'peak GiB':>10}")
    for name, use_triton, chunk in ((f"kernel, --chunk {args.chunk or 1024}", None, args.chunk or 1024),
                                    ("fused kernel", None, 0), ("reference", False, 0)):
        kernels.USE_TRITON, run.chunk = use_triton, chunk
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for step in range(args.max_steps):
            t0 = minillm.clock()
            loss, _ = minillm.minillm_loss(student, teacher, buffer[step % len(buffer)], run, ctx)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(minillm.clock() - t0)
        peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                * 1024) / 2 ** 30
        ms = 1000 * sorted(times[1:] or times)[len(times[1:] or times) // 2]  # median after the first (warm-up)
        print(f"{name:<22}{ms:10.1f}{peak:10.2f}")
    kernels.USE_TRITON = None


def bench_rollout(args, shapes="gpt2", repeats=3):
    """--bench rollout: on the same models (BENCH_SHAPES, random weights) and prompts (--rollout_size random 64-token
    prompts, --max_new_tokens each): our two-model rollout (alpha 0.2) eager and fast (fast_decode), the student
    alone with our generate() eager and fast and with transformers' generate() and its static cache (GPT-2 shapes;
    these three in the student's fp32, the rollouts in the training's autocast: bf16 on a GPU); tokens/s, best of
    `repeats` (the fast path's first call, which compiles, timed apart). Then a MiniLLM round (rollouts, then
    --ppo_epochs passes of mini-batches of --batch_size) against KD steps on rows of the same lengths, per training
    row (the round over its ppo_epochs x rollout_size rows) and per response sampled (over rollout_size)."""
    device, ctx, teacher, student, V = bench_models(args, shapes)
    prompts = torch.randint(0, V - 1, (args.rollout_size, 64)).tolist()
    n_new = args.max_new_tokens
    print(f"teacher {teacher.num_params() / 1e6:.1f}M, student {student.num_params() / 1e6:.1f}M parameters, "
          f"{len(prompts)} prompts of 64 tokens, {n_new} new tokens each, {device}")

    def timing(name, run):
        first, best = None, float("inf")
        for i in range(repeats + 1):
            t0 = minillm.clock()  # (clock: the time once the GPU has done what is queued)
            tokens = run()
            seconds = minillm.clock() - t0
            first, best = (seconds, best) if i == 0 else (first, min(best, seconds))
        print(f"{name:<42}{tokens / best:10.0f}{first:14.2f}")
        return best

    print(f"{'':<42}{'tokens/s':>10}{'first call s':>14}")
    from torch._dynamo.utils import counters  # did the fast path compile once per model, and (GPU) keep its graphs?
    counters.clear()
    rollout = {}
    for fast in (False, True):  # (in the training's autocast, as rollout_batches runs them)
        with ctx:
            rollout[fast] = timing(f"rollout, student + teacher, {'fast' if fast else 'eager'}", lambda: int(
                minillm.rollout(student, teacher, prompts, n_new, V - 1, 0.2, fast=fast)["mask"].sum()))
    print(f"{'':<42}(fast: {counters['stats']['unique_graphs']} graphs traced, "
          f"{counters['inductor']['cudagraph_skips']} skipped CUDA graphs; TORCH_LOGS=perf_hints says why)")
    with minillm.evaluating(student):
        for fast in (False, True):
            timing(f"generate, student alone, {'fast' if fast else 'eager'}", lambda: minillm.generate(
                student, prompts, n_new, None, greedy=True, fast=fast).numel())
        if student.config.model_type == "gpt2":
            import tempfile
            import transformers
            with tempfile.TemporaryDirectory() as folder:
                minillm.save_pretrained(student, folder, V - 1)
                hf = transformers.AutoModelForCausalLM.from_pretrained(folder).to(device).eval()
            x = torch.tensor(prompts, device=device)
            with torch.no_grad():
                timing("transformers generate, student, static cache", lambda: hf.generate(
                    x, attention_mask=torch.ones_like(x), max_new_tokens=n_new, min_new_tokens=n_new,
                    do_sample=False, cache_implementation="static", pad_token_id=0)[:, 64:].numel())
    # one MiniLLM training sample against one KD sample: a round (its rollouts, then ppo_epochs passes of mini-batches)
    run = argparse.Namespace(**{**vars(args), "eos_id": V - 1, "fast_decode": rollout[True] < rollout[False]})
    optimizer = minillm.make_optimizer(student, args)

    def train_step(loss):
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    batches = minillm.rollout_batches(student, teacher, prompts, run, device, ctx=ctx)
    t0 = minillm.clock()
    minibatches = [next(batches)]  # (the first next() rolls out the round)
    rollout_s = minillm.clock() - t0
    minibatches += [next(batches) for _ in range(run.ppo_epochs * (run.rollout_size // run.batch_size) - 1)]
    train_step(minillm.minillm_loss(student, teacher, minibatches[0], run, ctx)[0])  # (warm-up: the kernel compiles)
    t0 = minillm.clock()
    for batch in minibatches:
        train_step(minillm.minillm_loss(student, teacher, batch, run, ctx)[0])
    round_s = rollout_s + minillm.clock() - t0
    x = torch.randint(0, V - 1, (run.batch_size, 64 + n_new), device=device)
    y = torch.cat([torch.full_like(x[:, :64], -100), x[:, 64:]], 1).roll(-1, 1)
    times = []
    for _ in range(repeats + 1):
        t0 = minillm.clock()
        train_step(minillm.token_loss(student, teacher, x, y, 0.5, ctx)[0])
        times.append(minillm.clock() - t0)
    kd_row = min(times[1:]) / run.batch_size
    per_response, per_row = round_s / run.rollout_size, round_s / (run.rollout_size * run.ppo_epochs)
    print(f"MiniLLM round: {run.rollout_size} {'fast' if run.fast_decode else 'eager'} rollouts {rollout_s:.2f}s + "
          f"{len(minibatches)} steps of {run.batch_size} rows {round_s - rollout_s:.2f}s; KD {1000 * kd_row:.2f} ms "
          f"per row (a step of {run.batch_size})")
    print(f"MiniLLM per training row (the rollouts amortized over the round's {run.ppo_epochs} epochs) "
          f"{1000 * per_row:.2f} ms: {per_row / kd_row:.1f}x KD; per response sampled {1000 * per_response:.2f} ms: "
          f"{per_response / kd_row:.1f}x KD")


def bench_tokenizers(n=2000, steps=20):
    """--bench tokenizers: the built-in task tokenized byte-level and word-level, the sequence lengths and the
    teacher's training step (batch 32, length-bucketed; the choice in data.py's docstring)."""
    torch.manual_seed(0)
    rows = data.make_builtin(n, 0, 0)["train"]
    print(f"{'encoding':<24}{'vocab':>7}{'mean len':>10}{'max len':>9}{'ms/step':>9}{'examples/s':>12}")
    for name in ("builtin-bytes", "builtin"):
        enc = data.get_encoding(name)
        pairs, _ = data.tokenize(rows, enc, "builtin", 512, 256)
        lens = [len(p) + len(r) for p, r in pairs]
        model = minillm.GPT(minillm.MODEL_SIZES["teacher"](vocab_size=enc.n_vocab, block_size=512))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        it = data.batches(pairs, 32, 0)
        for i in range(3 + steps):  # 3 warm-up steps, then `steps` timed
            if i == 3:
                t0 = time.time()
            _, x, y = next(it)
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        ms = (time.time() - t0) / steps * 1000
        print(f"{name:<24}{enc.n_vocab:>7}{sum(lens) / len(lens):>10.1f}{max(lens):>9}{ms:>9.1f}"
              f"{32 / ms * 1000:>12.0f}")

def bench_teacher(n_train=100000, steps=60, warm=15, configs=("2 threads", "1 thread", "fused AdamW", "batch 64",
                                                               "compile")):
    """--bench teacher: where the default run's largest stage, the teacher's SFT, spends its time: the tokens a step
    computes (padding included) and the targets it predicts; the step's time and tokens/s with two threads, one,
    a fused AdamW, mini-batches of 64 and torch.compile (each: `warm` steps, then `steps` timed; 'first' is the
    seconds of the untimed first steps, compiling included); its FLOPs against this CPU's matrix-multiply rate."""
    enc = data.get_encoding("builtin")
    pairs, _ = data.tokenize(data.make_builtin(n_train, 0, 0)["train"], enc, "builtin", 256, 256)
    it = data.batches(pairs, 32, 1337)
    sample = [next(it)[1:] for _ in range(100)]  # (x, y) of 100 batches
    tokens = sum(x.numel() for x, _ in sample) / 100
    targets = sum(int((y != -100).sum()) for _, y in sample) / 100
    length = sum(x.size(1) for x, _ in sample) / 100
    c = minillm.MODEL_SIZES["teacher"](vocab_size=enc.n_vocab)
    macs = tokens * c.n_layer * (12 * c.n_embd ** 2 + 2 * length * c.n_embd) + targets * c.n_embd * c.vocab_size
    real = sum(len(p) + len(r) - 1 for p, r in pairs) / len(pairs)  # (a row's inputs without padding)
    print(f"a step: {tokens:.0f} tokens computed ({length:.1f} a row, {real:.1f} of them not padding), {targets:.0f} "
          f"targets; {6 * macs / 1e9:.2f} GFLOP (forward and backward)")
    threads = torch.get_num_threads()
    print(f"{'configuration':<16}{'ms/step':>9}{'tokens/s':>10}{'GFLOP/s':>9}{'first s':>9}")
    for name in configs:
        torch.set_num_threads(1 if name == "1 thread" else threads)
        torch.manual_seed(0)
        model = minillm.GPT(c)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), fused=name == "fused AdamW")
        step = torch.compile(model) if name == "compile" else model
        batches, t_first, timed, seen = data.batches(pairs, 64 if name == "batch 64" else 32, 1337), time.time(), 0.0, 0
        for i in range(warm + steps):
            _, x, y = next(batches)
            t0 = time.perf_counter()
            loss = step(x, y)[1]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i == warm - 1:
                t_first = time.time() - t_first
            if i >= warm:
                timed, seen = timed + time.perf_counter() - t0, seen + x.numel()
        flops = 6 * macs * (2 if name == "batch 64" else 1)
        print(f"{name:<16}{1000 * timed / steps:>9.1f}{seen / timed:>10.0f}{flops / (timed / steps) / 1e9:>9.1f}"
              f"{t_first:>9.1f}")
    torch.set_num_threads(threads)
    a = torch.randn(1024, 1024)
    for n_threads in (threads, 1):
        torch.set_num_threads(n_threads)
        a @ a
        t0 = time.perf_counter()
        for _ in range(10):
            a @ a
        rate = 20 * 1024 ** 3 / (time.perf_counter() - t0) / 1e9
        print(f"a 1024 x 1024 matrix multiply, {n_threads} thread(s): {rate:.0f} GFLOP/s")
    torch.set_num_threads(threads)

# -----------------------------------------------------------------------------
# main


def arg_parser():
    ap = minillm.ArgumentParser(description="Evaluate checkpoints as the MiniLLM paper does (see the docstring)")
    ap.add_argument("checkpoints", nargs="*", help="checkpoints to evaluate (one table row each)")
    ap.add_argument("--teacher", help="also the reverse KL to this teacher and the exposure bias")
    ap.add_argument("--data", help="builtin | dolly | a .jsonl/.json file | a folder (its test split); default: the "
                                   "data the checkpoints were trained on (recorded in them)")
    ap.add_argument("--n_test", type=int, default=500, help="built-in task: test prompts")
    ap.add_argument("--seeds", type=int, nargs="+", default=[10, 20, 30], help="one sampling pass per seed")
    ap.add_argument("--max_new_tokens", type=int, default=256, help="longest response (the paper: 256)")
    ap.add_argument("--exposure_prompts", type=int, default=256, help="test prompts for the exposure bias")
    ap.add_argument("--exposure_len", type=int, default=64, help="longest l of ExAccErr(l)")
    ap.add_argument("--out", help="folder for the table and the plots (default out/eval; --table1: out/table1, "
                                  "with a run folder per row)")
    ap.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu) | cpu | cuda | mps")
    ap.add_argument("--table1", action="store_true", help="train and evaluate the built-in Table 1 (README)")
    ap.add_argument("--sweep", action="store_true",
                    help="every row's small grid (eval.SWEEP) chosen on validation, then the chosen and the reference "
                         "settings once per --train_seeds on the test set")
    ap.add_argument("--sweep_seeds", type=int, nargs="+", default=[1337],
                    help="--sweep: the training seeds of every setting of the grid (their mean validation chooses)")
    ap.add_argument("--sweep_record", help="--sweep: an earlier sweep's sweep.json, whose grid runs are not run again")
    ap.add_argument("--guard", action="store_true",
                    help="the drift guard (--target_kl) on the rounds that reuse (eval.GUARD_ROWS): its target chosen "
                         "on validation, then those rows and the sweep's one-pass rows once per --train_seeds on the "
                         "test set")
    ap.add_argument("--curves", nargs="+", metavar="DIR",
                    help="draw the runs' curves (validity or Rouge-L, reverse KL, loss against step and minutes) from "
                         "their curves.jsonl into one PNG, curves.png in --out (default: the first DIR); a folder of "
                         "runs (the pipeline's out/) stands for them")
    ap.add_argument("--report", action="store_true",
                    help="print the sweep, Table 1 and the guard study from their records (docs/sweep.json, "
                         "docs/guard.json), in seconds, with no checkpoint")
    ap.add_argument("--pipeline_out", default="out", help="--table1, --sweep: where `python minillm.py` keeps its "
                                                          "models")
    ap.add_argument("--patience", type=int, default=5, help="--table1: evaluations without improvement to stop")
    ap.add_argument("--train_seeds", type=int, nargs="+", default=[1337, 1338, 1339],
                    help="--table1: one training run of each distillation row per seed")
    ap.add_argument("--rows", nargs="+", help="--table1: only these rows of eval.TABLE1 (default: all), e.g. kd "
                                              "'on-policy rkl' minillm")
    ap.add_argument("--shapes", choices=list(BENCH_SHAPES), default="gpt2",
                    help="--bench minillm / rollout: the teacher and student shapes (gpt2: the paper's; qwen: "
                         "Qwen2.5-1.5B and 0.5B)")
    ap.add_argument("--bench", choices=["generate", "minillm", "rollout", "tokenizers", "teacher"],
                    help="run a benchmark instead (--bench minillm also takes minillm.py's flags: --max_steps, "
                         "--rollout_size, --batch_size, --chunk, ...)")
    return ap


def get_args(argv=None):
    ap = arg_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, rest = ap.parse_known_args(argv)
    if args.bench in ("minillm", "rollout"):  # every other flag is minillm.py's (--device, --max_new_tokens, ...)
        flags = list(argv)
        for name in ("--bench", "--shapes"):  # eval.py's own
            i = next((i for i, a in enumerate(flags) if a.split("=")[0] == name), None)
            if i is not None:
                del flags[i:i + (1 if "=" in flags[i] else 2)]
        args.minillm_flags = flags
    elif rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def main(argv=None):
    args = get_args(argv)
    args.out = args.out or ("out/table1" if args.table1 else "out/sweep" if args.sweep else "out/guard" if args.guard
                            else None if args.curves else "out/eval")
    try:
        if args.bench == "generate":
            return bench_generate(args.device)
        if args.bench == "tokenizers":
            return bench_tokenizers()
        if args.bench == "teacher":
            return bench_teacher()
        if args.bench == "minillm":
            return bench_minillm(minillm.get_args(args.minillm_flags), args.shapes)
        if args.bench == "rollout":
            return bench_rollout(minillm.get_args(args.minillm_flags), args.shapes)
        if args.table1:
            return table1(args)
        if args.sweep:
            return sweep(args)
        if args.guard:
            return guard(args)
        if args.report:
            return report(args)
        if args.curves:
            return print(f"-> {draw_curves(args.curves, os.path.join(args.out or args.curves[0], 'curves.png'))}")
        if not args.checkpoints:
            raise minillm.InputError("give one or more checkpoints to evaluate (or --table1)")
        device = minillm.pick_device(args.device)
        teacher = None
        if args.teacher:
            model, ckpt = minillm.load_checkpoint(args.teacher, device)
            teacher = (model.eval(), ckpt["tokenizer"])
        args.data = args.data or checkpoint_data(args.checkpoints)
        splits, _ = data.load_instructions(args.data, n_test=args.n_test, cache_dir=None)  # (nothing written)
        template = "builtin" if args.data == "builtin" else "dolly"
        results = [evaluate(p, teacher, splits["test"], template, args, device) for p in args.checkpoints]
        write_reports(results, args.out)
        print(table(results))
        print(f"(mean ± std over seeds {args.seeds}; {len(splits['test'])} test prompts) -> {args.out}/")
    except (data.DataError, minillm.InputError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    except minillm.Stopped as e:  # --table1 after a SIGTERM or Ctrl-C: run it again to go on
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(128 + (minillm.STOP_SIGNALS or [signal.SIGTERM])[0])


# The built-in Table 1: each student starts from the same SFT student and trains until its validation score (the
# validity of sampled validation responses) stops improving for --patience evaluations; best.pt is kept. Every
# distillation row is trained once per --train_seeds (the teacher and the SFT student are shared).
ROLLOUTS = "--lr 1e-3 --lm_coef 0 --max_steps 2000 --eval_interval 100 --log_interval 100 --target_kl 0"  # (no guard)
TABLE1 = {  # row: minillm.py flags (the teacher, the initialization, the output folder, the seed, the patience added)
    "kd": "--method kd --lr 1e-3 --max_steps 6000 --eval_interval 250 --log_interval 250",
    "seqkd": "--method seqkd --lr 1e-3 --max_steps 1500 --eval_interval 250 --log_interval 250",
    # on-policy distillation (GKD with lmbda = 1): a token-level divergence on fresh student samples, every step
    "on-policy rkl": "--method onpolicy " + ROLLOUTS,
    "on-policy fkl": "--method onpolicy --divergence fkl " + ROLLOUTS,
    "on-policy jsd 0.5": "--method onpolicy --divergence jsd --beta 0.5 " + ROLLOUTS,
    "minillm": "--method minillm " + ROLLOUTS,
    # the paper's ablations of MiniLLM, and the single-step term alone on its rollouts; L_PT is off in the row
    # above, so its ablation turns it on
    "minillm, no long-term": "--method minillm --no_long_term " + ROLLOUTS,
    "minillm, no length norm": "--method minillm --no_length_norm " + ROLLOUTS,
    "minillm, alpha 0": "--method minillm --alpha 0 " + ROLLOUTS,
    "minillm, no single-step": "--method minillm --no_single_step " + ROLLOUTS,
    "minillm, with L_PT": "--method minillm " + ROLLOUTS.replace("--lm_coef 0", "--lm_coef 1"),
}


def table1(args):
    """Trains (or reuses) every row of TABLE1 from the pipeline's SFT student once per training seed, then evaluates
    the teacher, the SFT student and every run with the sampling seeds args.seeds. A row's numbers: the mean over its
    training seeds of each run's mean over the sampling seeds, ± the std over the training seeds; with the steps,
    minutes and responses sampled of its training, and a plot of validation validity against training minutes."""
    t0 = time.time()
    teacher, sft = pipeline_models(args)
    unknown = sorted(set(args.rows or []) - set(TABLE1))
    if unknown:
        raise minillm.InputError(f"--rows {unknown[0]!r}: not a row of Table 1 ({', '.join(TABLE1)})")
    runs = {"teacher": [os.path.dirname(teacher)], "sft": [os.path.dirname(sft)]}
    expect_runs(len([n for n in TABLE1 if not args.rows or n in args.rows]) * len(args.train_seeds))
    for name, flags in TABLE1.items():
        if args.rows and name not in args.rows:
            continue
        runs[name] = [train_run(name, flags, os.path.join(args.out, slug(name) + f"-seed{seed}"), seed, args)
                      for seed in args.train_seeds]
    test_table(runs, teacher, args, t0)


def pipeline_models(args):
    """The teacher and the SFT student of `python minillm.py` in args.pipeline_out (running it first if it lacks them),
    which every run of Table 1 and the sweep starts from."""
    teacher, sft = (os.path.join(args.pipeline_out, f, "best.pt") for f in ("teacher", "student-sft"))
    if not (os.path.isfile(teacher) and os.path.isfile(sft)):
        print(f"no teacher / SFT student in {args.pipeline_out}/: running the built-in pipeline first (python "
              "minillm.py)")
        minillm.main(["--out", args.pipeline_out])
    args.teacher_path, args.sft_path = teacher, sft
    return teacher, sft


def slug(name):
    """A row's or a setting's name as a folder name: 'minillm, official' -> 'minillm-official'."""
    return name.replace(", ", "-").replace(" ", "-")


PROGRESS = {"total": 0, "done": 0, "trained": 0, "seconds": 0.0}  # the runs of a --table1, --sweep or --guard


def expect_runs(n):
    """Starts counting the n training runs (at most; finished ones are reused) that train_run will be asked for."""
    PROGRESS.update(total=n, done=0, trained=0, seconds=0.0)


def train_run(name, flags, folder, seed, args):
    """Trains one run of a row from the pipeline's SFT student (a finished run is reused, a stopped one resumed);
    returns its folder. Says which run of how many it is and, from the runs trained so far, the time left."""
    PROGRESS["done"] += 1
    t0 = None  # (a finished run is reused: not timed)
    if not os.path.isfile(os.path.join(folder, "last.pt")):
        per_run = PROGRESS["seconds"] / PROGRESS["trained"] if PROGRESS["trained"] else None
        left = "" if per_run is None else (f"; about {per_run * (PROGRESS['total'] - PROGRESS['done'] + 1) / 60:.0f}"
                                           " min left at most")
        print(f"run {PROGRESS['done']} of {PROGRESS['total']}{left}: training {name}, seed {seed}: {flags}",
              flush=True)
        t0 = time.time()
    minillm.train(minillm.get_args(flags.split() + [
        "--teacher", args.teacher_path, "--init", args.sft_path, "--out", folder, "--seed", str(seed), "--patience",
        str(args.patience), "--device", args.device, "--resume"]))
    if t0 is not None:
        PROGRESS["trained"] += 1
        PROGRESS["seconds"] += time.time() - t0
    return folder


def test_table(runs, teacher, args, t0):
    """Evaluates every run of runs ({row: [run folders]}) on the test prompts with the sampling seeds args.seeds,
    writes the reports and prints the table (test_lines); returns {row: [each run's numbers]}, the record the table
    is recomputed from: every metric's [mean, std] over the sampling seeds, and the steps, best step, minutes and
    responses sampled of its training."""
    device = minillm.pick_device(args.device)
    model, ckpt = minillm.load_checkpoint(teacher, device)
    teacher_model = (model.eval(), ckpt["tokenizer"])
    splits, _ = data.load_instructions("builtin", n_test=args.n_test, cache_dir=None)
    args.data = "builtin"
    results, record = [], {}
    for name, folders in runs.items():
        per_seed = []
        for folder in folders:
            r = evaluate(os.path.join(folder, "best.pt"), teacher_model, splits["test"], "builtin", args, device)
            steps, best, seconds, samples = minillm.run_summary(folder)
            r.update(steps=[float(steps), 0.0], best_step=[float(best), 0.0], minutes=[seconds / 60, 0.0],
                     samples=[float(samples), 0.0])
            per_seed.append(r)
        results.append({**over_training_seeds(per_seed), "label": name, "train_seeds": len(folders)})
        record[name] = [{k: [round(m, 6), round(s, 6)] for k, (m, s) in pairs(r).items()} for r in per_seed]
    write_reports(results, args.out)
    cost_plot(runs, args.out)
    print(test_lines(record))
    print(f"(mean ± std over the training seeds {args.train_seeds} of each run's mean over the sampling seeds "
          f"{args.seeds}; teacher and SFT: one run, ± over the sampling seeds; {len(splits['test'])} test prompts; "
          f"steps, minutes and responses sampled in training, on this machine) -> {args.out}/; whole run "
          f"{(time.time() - t0) / 60:.1f} min")
    return record


def pairs(result):
    """The [mean, std] metrics of an evaluation (its curves, bins and names left out)."""
    return {k: v for k, v in result.items() if isinstance(v, list) and len(v) == 2 and all(isinstance(x, float)
                                                                                           for x in v)}


REPORT_COLUMNS = ["rougeL", "valid", "valid per seed", "exact", "dist4", "rkl", "ece", "best_step", "minutes",
                  "samples"]


def test_lines(record):
    """The test-set table (Markdown) from a record {row: [each run's numbers]}: a row is the mean over its training
    runs of each run's mean over the sampling seeds, ± the std over the runs (one run: ± over its sampling seeds),
    with each run's validity; then validity per family and Rouge-L by reference length (words)."""
    rows = [{**over_training_seeds(runs), "label": name, "train_seeds": len(runs),
             "valid per seed": ", ".join(f"{r['valid'][0]:.1f}" for r in runs) if len(runs) > 1 else ""}
            for name, runs in record.items()]
    detail = [k for k in rows[0] if k.startswith("valid ") and k != "valid per seed"] + [
        k for k in rows[0] if k.startswith("rougeL [")]
    return table(rows, REPORT_COLUMNS) + "\n\nValidity per family, Rouge-L by reference length (words):\n\n" + \
        table(rows, detail)


# The fair comparison: every distillation method gets the same small search on the pipeline's budget (DISTILL: 600
# steps from the SFT student, lr decayed to 1e-4, no L_PT), chosen on validation only: the peak learning rate, and
# for the methods that roll out, the passes over each round of 64 responses (1 or 4) and the mini-batch (the round
# or half of it). Each row's reference: the setting Table 1 and the paper use. The sweep predates the drift guard
# (--target_kl): its runs have none.
SWEEP_BUDGET = "--max_steps 600 --min_lr 1e-4 --lm_coef 0 --eval_interval 100 --log_interval 100"
SWEEP_LRS = ("3e-4", "1e-3", "3e-3")
SWEEP_ROUND = 64  # --rollout_size
SWEEP_ROUNDS = ((1, 64), (1, 32), (4, 64), (4, 32))  # (--ppo_epochs, --batch_size)
SWEEP_BATCHES = (64, 32)  # KD and SeqKD: the same two mini-batches as the rows that roll out
SWEEP = {  # row: (minillm.py flags, the reference setting)
    "kd": ("--method kd", "lr 1e-3, batch 32"),
    "seqkd": ("--method seqkd", "lr 1e-3, batch 32"),
    "on-policy rkl": ("--method onpolicy", "lr 1e-3, 1 epoch, batch 64"),  # (fresh samples every step: GKD)
    "on-policy jsd 0.5": ("--method onpolicy --divergence jsd --beta 0.5", "lr 1e-3, 1 epoch, batch 64"),
    "minillm": ("--method minillm", "lr 1e-3, 4 epochs, batch 32"),  # (the paper's 4 epochs, a quarter round: 256/64)
    "minillm, official": ("--method minillm --recipe official", "lr 1e-3, 4 epochs, batch 32"),
}


def sweep_settings(row):
    """{setting name: minillm.py flags} of a row's grid."""
    method = SWEEP[row][0]
    settings = {f"lr {lr}": f"{method} {SWEEP_BUDGET} --lr {lr} --target_kl 0" for lr in SWEEP_LRS}
    if "--method onpolicy" not in method and "--method minillm" not in method:
        return {f"{name}, batch {b}": f"{flags} --batch_size {b}" for name, flags in settings.items()
                for b in SWEEP_BATCHES}
    return {f"{name}, {k} epoch{'s' * (k > 1)}, batch {b}": f"{flags} --rollout_size {SWEEP_ROUND} --ppo_epochs {k} "
            f"--batch_size {b}" for name, flags in settings.items() for k, b in SWEEP_ROUNDS}


def log_fields(line):
    """{name: value} of a log line's "name value" cells: "step 500 | val valid 0.3540 | kl_old 0.0021 | ..." ->
    {"step": 500.0, "val valid": 0.354, "kl_old": 0.0021, ...} (cells without a number at the end are left out)."""
    fields = {}
    for cell in line.split("|"):
        name, _, value = cell.strip().rpartition(" ")
        try:
            fields[name.strip()] = float(value)
        except ValueError:
            pass
    return fields


def run_record(folder):
    """A finished training run as the records (sweep.json, guard.json) keep it, from its log.txt: the validation
    validity % at step 0 (the start), its best and that step (the earliest of a tie), its last and that step, the
    held-out pt_loss at the last validation, the training minutes and responses sampled, and the mean kl_old and
    passes over the log lines that have them (the methods that roll out)."""
    lines = [log_fields(line) for line in open(os.path.join(folder, "log.txt")) if line.startswith("step ")]
    vals = [f for f in lines if "val valid" in f]
    best = max(vals, key=lambda f: (f["val valid"], -f["step"]))
    _, _, seconds, samples = minillm.run_summary(folder)
    record = {"start": 100 * vals[0]["val valid"], "best": 100 * best["val valid"], "step": int(best["step"]),
              "end": 100 * vals[-1]["val valid"], "end_step": int(vals[-1]["step"]), "pt_loss": vals[-1].get(
                  "val pt_loss"), "minutes": round(seconds / 60, 2), "samples": samples}
    for key in ("kl_old", "passes"):
        xs = [f[key] for f in lines if key in f and "val valid" not in f]
        if xs:
            record[key] = sum(xs) / len(xs)
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in record.items()}


def save_record(record, path):
    """Adds record ({"validation": {row: {setting: {seed: run_record}}}, "test": {row: [each run's numbers]}, ...})
    to the sweep.json at path (which another sweep process with other --rows may be writing too), atomically; what
    the file holds beside (its "about") is kept."""
    merged = json.load(open(path)) if os.path.isfile(path) else {}
    for row, settings in record.get("validation", {}).items():
        for name, seeds in settings.items():
            merged.setdefault("validation", {}).setdefault(row, {}).setdefault(name, {}).update(seeds)
    merged.setdefault("test", {}).update(record.get("test", {}))
    write_json(merged, path)


def write_json(record, path):
    """record as JSON at path, atomically (a temporary file, then renamed)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".tmp", path)


def sweep(args):
    """`python eval.py --sweep`: trains every setting of every row's grid (SWEEP) once per --sweep_seeds from the
    pipeline's SFT student, picks each row's setting with the best validation validity (the mean over those seeds;
    the test set is not looked at), then trains the chosen and the reference setting once per --train_seeds and
    evaluates them on the test set. Writes sweep.json (every grid run's validation record, each test run's own
    numbers: what `--report` prints from) and sweep.md; finished runs are reused, so a stopped sweep goes on where it
    was, and --sweep_record (an earlier sweep's sweep.json, on the same code) stands for the grid's runs it holds."""
    t0 = time.time()
    teacher, sft = pipeline_models(args)
    unknown = sorted(set(args.rows or []) - set(SWEEP))
    if unknown:
        raise minillm.InputError(f"--rows {unknown[0]!r}: not a row of the sweep ({', '.join(SWEEP)})")
    rows = list(dict.fromkeys(args.rows or SWEEP))  # (in the order given)
    known = json.load(open(args.sweep_record)).get("validation", {}) if args.sweep_record else {}
    validation, path = {}, os.path.join(args.out, "sweep.json")
    expect_runs(sum(len(sweep_settings(row)) * len(args.sweep_seeds) + 2 * len(args.train_seeds) for row in rows))
    for row in rows:
        for name, flags in sweep_settings(row).items():
            for seed in args.sweep_seeds:
                folder = os.path.join(args.out, slug(row), slug(name) + f"-seed{seed}")
                run = known.get(row, {}).get(name, {}).get(str(seed))
                if not run:  # (one --sweep_record holds is not run again)
                    run = run_record(train_run(f"{row} ({name})", flags, folder, seed, args))
                validation.setdefault(row, {}).setdefault(name, {})[str(seed)] = run
        save_record({"validation": {row: validation[row]}}, path)  # (what chose, --sweep_record's too)
        scores = mean_best(validation[row])
        print(f"{row}: chosen on validation: {chosen(scores)} ({scores[chosen(scores)]:.1f}%; the reference "
              f"{SWEEP[row][1]}: {scores[SWEEP[row][1]]:.1f}%)", flush=True)
    lines = sweep_lines(validation)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sweep.md"), "w") as f:
        f.write(lines + "\n")
    print(lines)
    runs = {"teacher": [os.path.dirname(teacher)], "sft": [os.path.dirname(sft)]}
    for row in rows:  # the test set: the reference and the chosen setting, once per --train_seeds
        reference, best = SWEEP[row][1], chosen(mean_best(validation[row]))
        for name in dict.fromkeys([reference, best]):
            mark = ", ".join(m for m, yes in (("reference", name == reference), ("selected", name == best)) if yes)
            runs[f"{row}, {name} [{mark}]"] = [train_run(f"{row} ({name})", sweep_settings(row)[name], os.path.join(
                args.out, slug(row), slug(name) + f"-seed{seed}"), seed, args) for seed in args.train_seeds]
    save_record({"test": test_table(runs, teacher, args, t0)}, path)


def mean_best(settings):
    """{setting: the mean over its seeds of each run's best validation validity %} of one row's grid record."""
    return {name: sum(r["best"] for r in seeds.values()) / len(seeds) for name, seeds in settings.items()}


def chosen(scores):
    """The setting with the best score (a tie: the first in the grid's order)."""
    return max(scores, key=scores.get)


def sweep_lines(validation):
    """The sweep's validation table (Markdown) from its record {row: {setting: {seed: run_record}}}: per setting the
    best validation validity % (its step) of each seed's run, then, over the seeds, the mean of those, the last
    validation, the held-out pt_loss there, the training minutes and the responses sampled; each row's choice in
    bold, its reference marked."""
    lines = ["| row | setting | best validation validity % (step), per seed | mean | at the end (step) | val pt_loss "
             "at the end | minutes (1 thread) | responses sampled | start (the SFT student) |", "|---" * 9 + "|"]
    for row in sorted(validation, key=lambda r: list(SWEEP).index(r) if r in SWEEP else len(SWEEP)):
        settings, scores = validation[row], mean_best(validation[row])
        for name, seeds in settings.items():
            runs = list(seeds.values())
            mean = lambda k: sum(r[k] for r in runs) / len(runs)
            mark = "**" if name == chosen(scores) else ""
            lines.append(
                f"| {row} | {mark}{name}{mark}{' (reference)' if name == SWEEP.get(row, ('', ''))[1] else ''} | " +
                ", ".join(f"{r['best']:.1f} ({r['step']})" for r in runs) + f" | {mark}{scores[name]:.1f}{mark} | " +
                ", ".join(f"{r['end']:.1f} ({r['end_step']})" for r in runs) + f" | {mean('pt_loss'):.2f} | "
                f"{mean('minutes'):.1f} | {mean('samples'):,.0f} | {mean('start'):.1f} |")
    return "\n".join(lines)


# The drift guard (--target_kl) where PPO reuses a round: the paper's rounds (256 responses, 4 passes, mini-batches of
# 64) and the short rounds (64, 4, 32), with the paper's loss and with the official recipe's, at lr 1e-3 (what the
# pipeline runs on your data) on the sweep's budget. One target for all four rows, chosen on validation from
# GUARD_TARGETS (the best mean of the four rows' best validation validity; the test set never looked at); target 0,
# no guard, is each row's reference. Then the four rows at the chosen target, and the sweep's one-pass rows chosen on
# validation (docs/sweep.json), once per --train_seeds on the test set.
GUARD_TARGETS = ("0.001", "0.002", "0.005")
GUARD_ROWS = {
    "minillm, paper rounds": "--method minillm --rollout_size 256 --ppo_epochs 4 --batch_size 64",
    "minillm, short rounds": "--method minillm --rollout_size 64 --ppo_epochs 4 --batch_size 32",
    "minillm, official, paper rounds": "--method minillm --recipe official --rollout_size 256 --ppo_epochs 4 "
                                       "--batch_size 64",
    "minillm, official, short rounds": "--method minillm --recipe official --rollout_size 64 --ppo_epochs 4 "
                                       "--batch_size 32",
}
GUARD_ONE_PASS = ("minillm", "minillm, official")  # the sweep's rows whose one-pass setting stands beside them


def guard_settings(row):
    """{setting name: minillm.py flags} of a guard row: no guard (the reference), then each of GUARD_TARGETS."""
    return {f"target {t}": f"{GUARD_ROWS[row]} {SWEEP_BUDGET} --lr 1e-3 --target_kl {t}"
            for t in ("0",) + GUARD_TARGETS}


def guard(args):
    """`python eval.py --guard`: trains every setting of GUARD_ROWS once per --sweep_seeds from the pipeline's SFT
    student, chooses the target on validation, then trains the four rows at that target once per --train_seeds and
    evaluates them on the test set beside the sweep's chosen one-pass rows (trained the same way) and the SFT student.
    Writes guard.json (every validation run's record, the chosen target, each test run's own numbers: what
    `--report` prints from) and guard.md; finished runs are reused."""
    t0 = time.time()
    teacher, sft = pipeline_models(args)
    record = {"validation": {}, "test": {}}
    expect_runs(len(GUARD_ROWS) * ((len(GUARD_TARGETS) + 1) * len(args.sweep_seeds) + len(args.train_seeds)) +
                len(GUARD_ONE_PASS) * len(args.train_seeds))
    for row in GUARD_ROWS:
        for name, flags in guard_settings(row).items():
            for seed in args.sweep_seeds:
                folder = os.path.join(args.out, slug(row), slug(name) + f"-seed{seed}")
                run = run_record(train_run(f"{row} ({name})", flags, folder, seed, args))
                record["validation"].setdefault(row, {}).setdefault(name, {})[str(seed)] = run
    record["chosen"] = chosen({t: sum(mean_best(record["validation"][row])[f"target {t}"] for row in GUARD_ROWS)
                               for t in GUARD_TARGETS})
    lines = guard_lines(record)
    print(lines, flush=True)
    runs = {"teacher": [os.path.dirname(teacher)], "sft": [os.path.dirname(sft)]}
    for row in GUARD_ROWS:
        runs[f"{row}, target {record['chosen']}"] = [train_run(
            f"{row} (target {record['chosen']})", guard_settings(row)[f"target {record['chosen']}"],
            os.path.join(args.out, slug(row), f"target-{record['chosen']}-seed{seed}"), seed, args)
            for seed in args.train_seeds]
    sweep_record = json.load(open(os.path.join(HERE, "docs", "sweep.json")))["validation"]
    for row in GUARD_ONE_PASS:  # the one-pass setting the sweep chose on validation
        name = chosen({n: v for n, v in mean_best(sweep_record[row]).items() if "1 epoch," in n})
        runs[f"{row}, {name} (the sweep's choice)"] = [train_run(
            f"{row} ({name})", sweep_settings(row)[name],
            os.path.join(args.out, slug(row), slug(name) + f"-seed{seed}"), seed, args) for seed in args.train_seeds]
    record["test"] = test_table(runs, teacher, args, t0)
    write_json(record, os.path.join(args.out, "guard.json"))
    with open(os.path.join(args.out, "guard.md"), "w") as f:
        f.write(lines + "\n")


def guard_lines(record):
    """The guard study's validation table (Markdown) from its record: per row and target the best validation
    validity % (its step), the mean kl_old and passes per round over the run's log lines (the mean over the seeds),
    and the mean over the rows, the chosen target's in bold."""
    names = list(next(iter(record["validation"].values())))
    lines = [f"the target chosen on validation: {record['chosen']}", "", "| row | " + " | ".join(
        "no guard" if n == "target 0" else f"T = {n.split()[1]}" for n in names) + " |", "|---" * (len(names) + 1) +
        "|"]
    for row, settings in record["validation"].items():
        cells = []
        for name in names:
            runs = list(settings[name].values())
            mean = lambda k: sum(r.get(k, 0) for r in runs) / len(runs)
            steps = ", ".join(str(r["step"]) for r in runs)
            cells.append(f"{mean('best'):.1f} ({steps}); kl_old {mean('kl_old'):.4f}" +
                         (f", {mean('passes'):.1f} passes" if "passes" in runs[0] else ""))
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    means = {n: sum(mean_best(s)[n] for s in record["validation"].values()) / len(record["validation"])
             for n in names}
    lines.append("| mean of the rows | " + " | ".join(
        f"**{means[n]:.1f}**" if n == f"target {record['chosen']}" else f"{means[n]:.1f}" for n in names) + " |")
    return "\n".join(lines)


def report(args):
    """`python eval.py --report`: the sweep's validation table, Table 1 and the drift guard's tables, recomputed from
    their records alone (docs/sweep.json, docs/guard.json, or --sweep_record): no checkpoint, no training. The tables
    of docs/results.md are this command's output."""
    paths = [args.sweep_record or os.path.join(HERE, "docs", "sweep.json"), os.path.join(HERE, "docs", "guard.json")]
    for path in paths:
        if not os.path.isfile(path):
            raise minillm.InputError(f"{path}: no such record")
    sweep_record, guard_record = (json.load(open(p)) for p in paths)
    names = [os.path.relpath(p, HERE) if os.path.abspath(p).startswith(HERE + os.sep) else p for p in paths]
    for title, path, about, table in (
            ("The sweep: validation", names[0], sweep_record.get("about"), sweep_lines(sweep_record["validation"])),
            ("Table 1: the test set", names[0], None, test_lines(sweep_record["test"])),
            ("The drift guard: validation", names[1], guard_record.get("about"), guard_lines(guard_record)),
            ("The drift guard: the test set", names[1], None, test_lines(guard_record["test"]))):
        print(f"# {title} ({path})\n\n" + (f"{about}\n\n" if about else "") + f"{table}\n")


def over_training_seeds(per_seed):
    """One row from the evaluations of a method's training runs: each [mean, std] metric becomes the mean of the
    runs' means ± their std (a single run keeps its own, the spread over its sampling seeds); curves, bins and the
    like come from the first run."""
    if len(per_seed) == 1:
        return per_seed[0]
    row = dict(per_seed[0])
    for k in pairs(per_seed[0]):
        means = [r[k][0] for r in per_seed]
        row[k] = [sum(means) / len(means), minillm.std(means)]
    return row


def validation_curve(folder):
    """(minutes, validity) at each validation of a run, from its log.txt ("step N | ... | val valid V | ... | Ts")."""
    points = []
    for line in open(os.path.join(folder, "log.txt")):
        if "| val valid " in line:
            valid = float(line.split("| val valid ")[1].split()[0])
            points.append((float(line.rsplit("|", 1)[1].strip().rstrip("s")) / 60, 100 * valid))
    return points


def cost_plot(runs, folder):
    """validity_vs_minutes.png: validation validity against training minutes, one line per method (the mean over its
    training seeds at each validation); the SFT student is the point where every distillation run starts."""
    import matplotlib  # imported here: only the reports need it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    start = None
    for name, folders in runs.items():
        if name in ("teacher", "sft"):
            continue
        curves = [validation_curve(f) for f in folders]
        n = min(map(len, curves))
        if n == 0:
            continue
        minutes = [sum(c[i][0] for c in curves) / len(curves) for i in range(n)]
        valid = [sum(c[i][1] for c in curves) / len(curves) for i in range(n)]
        start = start or valid[0]
        ax.plot(minutes, valid, "-" if name.startswith(("minillm", "on-policy")) else "--", marker=".", label=name)
    if start is not None:
        ax.plot([0], [start], "ko", label="sft (the start)")
    ax.set(xlabel="training minutes (after SFT)", ylabel="validation validity (%)",
           title="Cost and quality: validation validity against training time")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "validity_vs_minutes.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    for s in (signal.SIGTERM, signal.SIGINT):  # --table1: a graceful stop
        signal.signal(s, minillm.on_stop_signal)
    main()
