"""
Tests for minillm: the model, KV-cache generation, the built-in task, the data loaders, SFT and checkpoints.

    python -m pytest test_minillm.py -q

Everything runs on the CPU in well under 3 minutes with tiny models; nothing is downloaded.
"""
import argparse
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
import unicodedata
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # the Triton kernels run on the CPU in the interpreter; set before kernels imports
    os.environ.setdefault("TRITON_INTERPRET", "1")

import data  # noqa: E402
import kernels  # noqa: E402
import minillm  # noqa: E402
from minillm import GPT, GPTConfig

HERE = os.path.dirname(os.path.abspath(__file__))
# the environment of the runs these tests start as users do (python minillm.py, torchrun): without the interpreter
# that runs the Triton kernel on the CPU here (slow; the kernel is tested against its reference in this process)
USER_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel tests run where the kernel runs


def tiny(vocab_size=97, block_size=64, seed=0, n_layer=2):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=2, n_embd=32)).eval()


def assert_close(actual, expected, atol, what):
    diff = (actual - expected).abs()
    where = tuple(torch.nonzero(diff == diff.max())[0].tolist())
    assert diff.max() <= atol, f"{what}: max abs diff {diff.max():.3g} at {where}"

# -----------------------------------------------------------------------------
# model


def test_forward_shapes_and_loss():
    model = tiny()
    x = torch.randint(0, 97, (3, 10))
    y = x.clone()
    y[:, :4] = -100
    logits, loss = model(x, y)
    assert logits.shape == (3 * 6, 97)  # only where there is a target
    whole = model(x)[0]
    assert whole.shape == (3, 10, 97) and torch.allclose(logits, whole[:, 4:].reshape(-1, 97), atol=1e-6)
    expected = torch.nn.functional.cross_entropy(whole[:, 4:].reshape(-1, 97), y[:, 4:].reshape(-1))
    assert torch.allclose(loss, expected)
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5  # fresh init: close to uniform
    assert model(x, last_only=True)[0].shape == (3, 1, 97)


def test_gpt2_parameter_names_and_sizes():
    names = set(dict(tiny().named_parameters()))
    for n in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
              "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.bias", "transformer.h.1.mlp.c_fc.weight",
              "transformer.h.1.mlp.c_proj.weight", "transformer.h.1.ln_2.bias", "transformer.ln_f.weight"]:
        assert n in names, n
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight
    gpt2 = minillm.MODEL_SIZES["gpt2"]()
    assert (gpt2.n_layer, gpt2.n_head, gpt2.n_embd, gpt2.vocab_size) == (12, 12, 768, 50257)
    t, s = (GPT(minillm.MODEL_SIZES[n](vocab_size=1569)).num_params() for n in ("teacher", "student"))
    assert t >= 4 * s, "the built-in teacher must be at least 4x the student"


def test_left_padding_does_not_change_logits():
    model = tiny()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    idx, valid = minillm.left_pad(prompts, 0, "cpu")
    padded = model(idx, valid=valid)[0]
    for i, p in enumerate(prompts):
        alone = model(torch.tensor([p]))[0][0]
        assert_close(padded[i, -len(p):], alone, 1e-5, f"row {i}")


def test_kv_cache_logits_match_recomputation():
    model = tiny()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    idx, valid = minillm.left_pad(prompts, 0, "cpu")
    cache, logits = minillm.prefill(model, idx, valid, max_new_tokens=8)
    for step in range(8):
        full = model(idx, valid=valid)[0][:, -1]
        assert_close(logits, full, 1e-5, f"step {step}")
        token = logits.argmax(-1)
        idx, valid = torch.cat([idx, token[:, None]], 1), torch.cat([valid, valid.new_ones(3, 1)], 1)
        logits = minillm.decode(model, cache, token)


@pytest.mark.parametrize("greedy", [True, False])
def test_kv_cache_generation_equals_no_cache(greedy):
    model = tiny()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8], [9, 10, 11], [12, 13, 14, 15, 16]]
    outs = []
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(3)
        outs.append(minillm.generate(model, prompts, 20, eos_id=None, greedy=greedy, generator=gen,
                                     use_cache=use_cache, temperature=0.7 if not greedy else 1.0))
    assert outs[0].shape == (4, 20)
    assert torch.equal(outs[0], outs[1]), f"cache {outs[0].tolist()} vs recompute {outs[1].tolist()}"


def test_batched_generation_equals_one_by_one():
    model = tiny()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8], [9, 10, 11]]
    batched = minillm.generate(model, prompts, 12, eos_id=None, greedy=True)
    for i, p in enumerate(prompts):
        alone = minillm.generate(model, [p], 12, eos_id=None, greedy=True)
        assert torch.equal(batched[i], alone[0]), f"row {i}"


def test_generation_stops_at_eos_and_pads_after():
    model = tiny()
    with torch.no_grad():  # zero (tied) embeddings: a uniform next-token distribution, so rows end at different steps
        model.lm_head.weight.zero_()
    eos = 3
    gen = torch.Generator().manual_seed(0)
    out = minillm.generate(model, [[1, 2]] * 16, 50, eos_id=eos, generator=gen, pad_id=0)
    for row in out.tolist():
        if eos in row:
            k = row.index(eos)
            assert all(t == 0 for t in row[k + 1:]), row
    assert any(eos in row for row in out.tolist())


def test_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.allclose(minillm.next_token_probs(logits, top_k=2), torch.tensor([[0.625, 0.375, 0, 0]]))
    assert torch.allclose(minillm.next_token_probs(logits, top_p=0.7), torch.tensor([[0.625, 0.375, 0, 0]]))
    assert torch.allclose(minillm.next_token_probs(logits, top_p=0.85), torch.tensor([[0.5, 0.3, 0.15, 0]]) / 0.95)
    assert torch.allclose(minillm.next_token_probs(logits, top_p=0.4), torch.tensor([[1.0, 0, 0, 0]]))
    t2 = minillm.next_token_probs(logits, temperature=2.0)
    assert torch.allclose(t2, torch.softmax(logits / 2, -1))


def test_generate_rejects_too_long():
    with pytest.raises(minillm.InputError, match="block_size"):
        minillm.generate(tiny(block_size=16), [[1] * 10], 10, eos_id=None)


def test_overfit_one_batch():
    model = tiny().train()
    x = torch.randint(0, 97, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses[::10]

# -----------------------------------------------------------------------------
# the built-in task


def test_builtin_deterministic_and_disjoint():
    a, b = data.make_builtin(700, 140, 140, seed=5), data.make_builtin(700, 140, 140, seed=5)
    assert a == b
    assert data.make_builtin(700, 140, 140, seed=6) != a
    assert {len(v) for v in a.values()} == {700, 140}
    for family in data.FAMILIES:
        assert sum(r["category"] == family for r in a["test"]) == 20
        if family in data.REPEATING:
            continue
        prompts = {s: {r["instruction"] for r in rows if r["category"] == family} for s, rows in a.items()}
        assert not prompts["train"] & prompts["test"], family
        assert not prompts["train"] & prompts["valid"], family
        assert not prompts["valid"] & prompts["test"], family


def test_response_lengths_span_few_to_about_sixty_words():
    rows = data.make_builtin(2000, 0, 0)["train"]
    words = [len(r["response"].split()) for r in rows]
    assert min(words) <= 3 and 50 <= max(words) <= 70


def corruptions(response):
    """Ways to spoil a response: each must make it invalid."""
    w = response.split()
    yield response[:-1]                                  # drop the final period
    yield " ".join(w[:-1]) + "."                         # drop the last word
    yield " ".join(w[:1] + w[:1] + w[1:])                # repeat the first word
    yield response.replace(".", "!", 1)
    if len(w) > 2 and "," not in response:               # (a list in another order is still a valid list)
        yield " ".join([w[0], w[2], w[1]] + w[3:])       # swap two words
    yield ""


def test_is_valid_accepts_references_and_rejects_corruptions():
    rng = random.Random(0)
    for family in data.FAMILIES:
        for _ in range(200):
            instruction, response = data.make_example(family, rng)
            ex = {"instruction": instruction, "category": family}
            assert data.is_valid(ex, response), (family, instruction, response)
            for bad in corruptions(response):
                if bad != response:
                    assert not data.is_valid(ex, bad), (family, instruction, bad)


def test_is_valid_specific_cases():
    enc = {"instruction": "Encode the letters a b z.", "category": "encode"}
    for ok in ["Copy: a b z.", "Reverse: z b a.", "Shift: b c a.", "Reverse shift: a c b."]:
        assert data.is_valid(enc, ok)
    assert not data.is_valid(enc, "Shift: z b a.")  # a real answer under the wrong style name
    lst = {"instruction": "Name 3 birds.", "category": "list"}
    assert data.is_valid(lst, "owl, crow, swan.")
    assert not data.is_valid(lst, "owl, owl, swan.")   # not distinct
    assert not data.is_valid(lst, "owl, crow, cat.")   # a cat is not a bird
    assert not data.is_valid(lst, "owl, crow.")        # too few
    yn = {"instruction": "Is a tiger a fruit?", "category": "yesno"}
    assert data.is_valid(yn, "No, a tiger is an animal.") and not data.is_valid(yn, "Yes, a tiger is a fruit.")
    st = {"instruction": "Write a short story about Tom the cook.", "category": "story"}
    good = ("Once there was a cook named Tom. He worked at the kitchen. First he fried an egg. Then he set the table. "
            "Finally he boiled the soup. In the end Tom went home and was happy.")
    assert data.is_valid(st, good)
    assert not data.is_valid(st, good.replace("fried an egg", "baked fresh bread"))  # another trade's action
    assert not data.is_valid(st, good.replace("set the table", "fried an egg"))      # repeated action
    assert not data.is_valid(st, good.replace("First he", "First she"))              # wrong pronoun


def test_builtin_tokenizer_round_trip_and_word_tokens():
    enc = data.get_encoding("builtin")
    rows = data.make_builtin(300, 0, 0)["train"]
    for r in rows:
        text = data.prompt_text(r, "builtin") + r["response"]
        assert enc.decode(enc.encode_ordinary(text)) == text
    assert len(enc.encode_ordinary(" giraffe")) == 1 and len(enc.encode_ordinary(" 15")) == 2  # digits one by one
    assert enc.decode(enc.encode_ordinary("zzqx unknown!")) == "zzqx unknown!"  # byte fallback
    assert enc.eot_token == enc.n_vocab - 1


def test_tokenize_masks_prompt_and_drops_long_prompts():
    enc = data.get_encoding("builtin")
    rows = [{"instruction": "What is 2 plus 3?", "context": "", "response": "2 plus 3 is 5.", "category": "add"},
            {"instruction": "Name 3 birds. " * 40, "context": "", "response": "owl.", "category": "list"}]
    pairs, dropped = data.tokenize(rows, enc, "builtin", max_length=64, max_prompt_length=32)
    assert dropped == 1 and len(pairs) == 1
    prompt, response = pairs[0]
    assert response[-1] == enc.eot_token and enc.decode(response[:-1]) == "2 plus 3 is 5."
    x, y = data.collate(pairs + pairs[:1], pad_id=0)
    assert (y[0] != -100).sum() == len(response)
    assert y[0, len(prompt) - 1].item() == response[0] and (y[0, :len(prompt) - 1] == -100).all()
    pairs, _ = data.tokenize(rows[:1], enc, "builtin", max_length=len(prompt) + 3, max_prompt_length=32)
    assert len(pairs[0][0]) + len(pairs[0][1]) == len(prompt) + 3  # truncated to max_length


def test_batches_cover_every_example_once_per_epoch():
    pairs = [([1] * random.Random(i).randint(1, 9), [2, i]) for i in range(96)]
    seen = []
    it = data.batches(pairs, 8, seed=0)
    for _ in range(12):
        epoch, x, y = next(it)
        assert epoch == 0 and x.shape[0] == 8
        seen += [int(row[row != -100][-1]) for row in y]
    assert sorted(seen) == list(range(96))


def test_pretrain_stream_packs_chunks():
    enc = data.get_encoding("builtin")
    x, y = next(data.pretrain_batches("builtin", enc, 4, 32, seed=0))
    assert x.shape == y.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1])
    assert (x == enc.eot_token).any()  # documents joined with EOS
    assert "Instruction" not in enc.decode(x[0].tolist())

# -----------------------------------------------------------------------------
# loaders on local files (the same code paths that read the hub copies)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def dolly_rows(n):
    return [{"instruction": f"Say {i}.", "context": "ctx" if i % 3 == 0 else "", "response": f"{i}.",
             "category": "open_qa"} for i in range(n)]


def test_local_jsonl_split_and_folder(tmp_path):
    path = str(tmp_path / "mine.jsonl")
    write_jsonl(path, dolly_rows(200))
    splits, skipped = data.load_instructions(path, n_valid=20, n_test=10)
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [170, 20, 10] and not skipped
    all_prompts = [r["instruction"] for s in splits.values() for r in s]
    assert len(set(all_prompts)) == 200
    assert data.load_instructions(path, n_valid=20, n_test=10)[0] == splits  # deterministic
    folder = tmp_path / "folder"
    folder.mkdir()
    for s in ("train", "valid", "test"):
        write_jsonl(str(folder / f"{s}.jsonl"), splits[s])
    assert data.load_instructions(str(folder))[0] == splits
    json_path = str(tmp_path / "mine.json")
    with open(json_path, "w") as f:
        json.dump(dolly_rows(50), f)
    assert sum(len(v) for v in data.load_instructions(json_path, n_valid=5, n_test=5)[0].values()) == 50


@pytest.mark.parametrize("line, problem", [
    ("{not json", "line 3: not valid JSON"),
    (json.dumps({"instruction": "x", "context": ""}), "line 3: missing or non-string field 'response'"),
    (json.dumps({"instruction": "x", "response": "   "}), "line 3: empty response"),
    (json.dumps(["a list"]), "line 3: expected a JSON object"),
])
def test_malformed_lines_name_file_and_line(tmp_path, line, problem):
    path = str(tmp_path / "bad.jsonl")
    write_jsonl(path, dolly_rows(2) + [line] + dolly_rows(40))
    with pytest.raises(data.DataError) as e:
        data.load_instructions(path)
    assert str(e.value).startswith(path) and problem.replace("line ", "") in str(e.value).replace("line ", "")
    assert "\n" not in str(e.value)
    splits, skipped = data.load_instructions(path, skip_bad=True)  # asked to skip: skipped and counted
    assert len(skipped) == 1 and sum(len(v) for v in splits.values()) == 42


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(data.DataError, match="empty"):
        data.load_instructions(str(empty))
    with pytest.raises(data.DataError, match="--data must be"):
        data.load_instructions(str(tmp_path / "nope.jsonl"))
    with pytest.raises(data.DataError, match="expected train.jsonl"):
        data.load_instructions(str(tmp_path))


def test_dolly_loader_on_local_copy(tmp_path):
    folder = tmp_path / "dolly"
    folder.mkdir()
    write_jsonl(str(folder / "databricks-dolly-15k.jsonl"), dolly_rows(6000))
    splits = data.load_dolly(str(folder))
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [4500, 1000, 500]
    enc = data.get_encoding("builtin")
    pairs, _ = data.tokenize(splits["train"][:50], enc, "dolly", 512, 256)
    with_context = next(r for r in splits["train"] if r["context"])
    assert "### Input:\nctx" in data.prompt_text(with_context, "dolly")
    assert data.prompt_text(splits["train"][0], "dolly").endswith("### Response:\n") and len(pairs) == 50


def test_pretrain_loaders_on_local_files(tmp_path):
    enc = data.get_encoding("builtin")
    folder = tmp_path / "owt"
    folder.mkdir()
    write_jsonl(str(folder / "data.jsonl"), [{"text": f"document number {i} about a tiger."} for i in range(30)])
    x, _ = next(data.pretrain_batches(str(folder), enc, 2, 16, seed=0))  # the datasets path openwebtext uses
    assert "document number 0" in enc.decode(x[0].tolist())
    txt = tmp_path / "docs.txt"
    txt.write_text("first doc.\n\nsecond doc.\n")
    x, _ = next(data.pretrain_batches(str(txt), enc, 2, 16, seed=0))
    assert enc.decode(x[0].tolist()).startswith("first doc.<|endoftext|>second doc.")

# -----------------------------------------------------------------------------
# training, checkpoints, the command line


def test_sft_run_learns_and_checkpoint_round_trips(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the built-in data cache goes to ./builtin_data
    argv = ["--method", "sft", "--model", "student", "--out", str(tmp_path / "run"), "--max_steps", "200",
            "--eval_interval", "100", "--log_interval", "50", "--lr", "1e-2", "--warmup_steps", "5", "--n_train", "700",
            "--n_valid", "70", "--n_test", "70"]
    best = minillm.train(minillm.get_args(argv))
    log = open(tmp_path / "run" / "log.txt").read()
    vals = [float(l.split("val loss ")[1].split()[0]) for l in log.splitlines() if "| val loss" in l]
    assert len(vals) == 3 and vals[-1] < 0.6 * vals[0], vals
    assert "tok/s" in log and "ETA" in log
    model, ckpt = minillm.load_checkpoint(best)
    assert ckpt["tokenizer"] == "builtin" and ckpt["step"] == 200 and ckpt["args"]["lr"] == 1e-2
    assert abs(ckpt["metrics"]["loss"] - min(vals)) < 1e-4
    last, ckpt_last = minillm.load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert set(ckpt_last["optimizer"]) == {"state", "param_groups"}
    x = torch.randint(0, model.config.vocab_size, (2, 8))
    assert torch.equal(model(x)[0], last(x)[0])  # best == last here: the final step had the best val loss
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "run").iterdir())
    # a run made before a flag existed ran with its default: --resume reuses it, unless the flag is now set otherwise
    older = minillm.read_checkpoint(str(tmp_path / "run" / "last.pt"))
    del older["args"]["beta"]
    torch.save(older, str(tmp_path / "run" / "last.pt"))
    assert minillm.train(minillm.get_args(argv + ["--resume"])) == best
    with pytest.raises(minillm.InputError, match="made with --beta 0.5, not 0.3"):
        minillm.train(minillm.get_args(argv + ["--resume", "--beta", "0.3"]))


def test_refuses_pickled_code(tmp_path):
    path = str(tmp_path / "evil.pt")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    torch.save({"model": Evil(), "config": {}, "tokenizer": "builtin"}, path)
    with pytest.raises(minillm.InputError, match="evil.pt: refused: it holds pickled objects that are not tensors"):
        minillm.load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")  # (text: not a file torch.save wrote at all)
    with pytest.raises(minillm.InputError, match="junk.pt: not a checkpoint: not a file torch.save wrote"):
        minillm.load_checkpoint(str(tmp_path / "junk.pt"))
    (tmp_path / "cut.pt").write_bytes(open(path, "rb").read()[:200])  # (a zip archive cut short)
    with pytest.raises(minillm.InputError, match="cut.pt: not a loadable checkpoint, truncated or damaged"):
        minillm.load_checkpoint(str(tmp_path / "cut.pt"))
    with pytest.raises(minillm.InputError, match="no such checkpoint"):
        minillm.load_checkpoint(str(tmp_path / "missing.pt"))
    minillm.save_checkpoint(str(tmp_path / "locked.pt"), tiny(), None, 0, None, "builtin", {})  # unreadable (root
    # reads anything: the error is simulated)

    def no_permission(path, **kwargs):
        raise PermissionError(13, "Permission denied", path)
    real, torch.load = torch.load, no_permission
    try:
        with pytest.raises(minillm.InputError, match="locked.pt: cannot read it \\(Permission denied\\)"):
            minillm.load_checkpoint(str(tmp_path / "locked.pt"))
    finally:
        torch.load = real


def test_help_shows_every_default_and_a_mistyped_flag_is_one_line():
    """--help: every flag that takes a value says its default; a mistyped flag is one line with the closest flag and
    argparse's exit code 2, in minillm.py and eval.py."""
    import eval as ev
    for ap in (minillm.arg_parser(), ev.arg_parser()):
        helper = ap.formatter_class("prog")
        for action in ap._actions:
            if action.option_strings and action.nargs != 0 and action.help != argparse.SUPPRESS:
                assert "default" in helper._get_help_string(action), action.option_strings
    text = minillm.arg_parser().format_help()
    assert "[paper: 512] (default: 64)" in text and "(default: 32)" in text  # --pt_length, --batch_size
    for script, typo, hint in (("minillm.py", "--lr_rate", "did you mean --lr?"),
                               ("eval.py", "--teachr", "did you mean --teacher?"),
                               ("minillm.py", "--xyzzy", "(--help lists the flags)")):
        r = subprocess.run([sys.executable, os.path.join(HERE, script), typo, "1e-3"], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f"error: unrecognized argument {typo}" in r.stderr and hint in r.stderr, r.stderr


def test_a_method_run_without_out_gets_its_own_folder():
    """--method without --out runs in out/METHOD (the pipeline's stage folder names), never in the pipeline's out/."""
    assert minillm.get_args(["--method", "kd"]).out == os.path.join("out", "kd")
    assert minillm.get_args(["--method", "onpolicy"]).out == os.path.join("out", "on-policy")
    assert minillm.get_args(["--method", "minillm", "--out", "mine"]).out == "mine"  # (typed: kept)
    assert minillm.get_args([]).out == "out"  # (the pipeline)


def test_a_run_folder_is_held_by_one_process_and_a_killed_holder_never_blocks(tmp_path):
    """Two real processes on one --out: the second stops at once with one line naming the folder and the holder;
    once the first is killed (SIGKILL: no chance to clean up), a run on the folder goes on."""
    run = [sys.executable, os.path.join(HERE, "minillm.py"), "--method", "sft", "--out", str(tmp_path / "run"),
           "--n_train", "200", "--n_valid", "20", "--n_test", "20", "--eval_interval", "50", "--log_interval", "50"]
    env = {**USER_ENV, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(run + ["--max_steps", "1000000"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (tmp_path / "run" / "log.txt").exists() and time.time() < deadline:
            time.sleep(0.2)
        t0 = time.time()
        second = subprocess.run(run + ["--max_steps", "1000000", "--resume"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 1 and len(second.stderr.strip().splitlines()) == 1 and time.time() - t0 < 30
        assert second.stderr.startswith(f"error: {tmp_path / 'run'}: in use by process {first.pid} ")
    finally:
        first.kill()
        first.wait()
    third = subprocess.run(run + ["--max_steps", "100", "--overwrite"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120)
    assert third.returncode == 0, third.stderr
    assert "done: 100 steps" in open(tmp_path / "run" / "log.txt").read()
    minillm.train(minillm.get_args(run[2:] + ["--max_steps", "100", "--resume"]))  # finished: reused in this process
    assert os.path.realpath(tmp_path / "run") not in minillm.HELD  # (and not held for the rest of the process)


def test_cli_bad_data_is_one_clear_line(tmp_path):
    """A checkpoint that is not there, named with its flag; a data file's own error before any tokenizer is fetched
    (--tokenizer auto on a data file means gpt2's, a download: the file's error comes first, offline too)."""
    path, good = tmp_path / "bad.jsonl", tmp_path / "good.jsonl"
    write_jsonl(str(path), dolly_rows(5) + ["{oops"])
    write_jsonl(str(good), dolly_rows(5))
    r = subprocess.run([sys.executable, os.path.join(HERE, "minillm.py"), "--method", "sft", "--data", str(good),
                        "--init", str(tmp_path / "nothing.pt"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode != 0
    assert r.stderr.strip() == f"error: --init {tmp_path / 'nothing.pt'}: no such checkpoint file"
    r = subprocess.run([sys.executable, os.path.join(HERE, "minillm.py"), "--method", "sft", "--data", str(path),
                        "--out", str(tmp_path / "o"), "--model", "student"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == (f"error: {path}:6: not valid JSON "
                                                 "(Expecting property name enclosed in double quotes)")


def test_distillation_without_its_checkpoints_is_one_line(tmp_path):
    (tmp_path / "mine.jsonl").write_text(json.dumps({"instruction": "Say a.", "context": "", "response": "a"}) + "\n")
    for argv, message in ((["--teacher", "t.pt", "--data", str(tmp_path / "mine.jsonl")],
                           f"--data {tmp_path / 'mine.jsonl'}: the pipeline trains a teacher and an SFT student for the "
                           "built-in task only: give --teacher CKPT and --init STUDENT_CKPT"),
                          (["--method", "kd", "--init", "s.pt"], "--method kd needs --teacher CKPT"),
                          (["--method", "seqkd", "--teacher", "none.pt"], "--teacher none.pt: no such checkpoint"),
                          (["--method", "minillm"], "--method minillm needs --teacher CKPT and --init STUDENT_CKPT")):
        with pytest.raises(SystemExit) as e:
            minillm.main(argv + ["--out", str(tmp_path / "o")])
        assert str(e.value).startswith(f"error: {message}") and "\n" not in str(e.value)
        assert not (tmp_path / "o").exists()  # stopped before writing anything


def test_unloadable_dataset_is_one_line(tmp_path):
    with pytest.raises(data.DataError) as e:
        data.load_dolly(str(tmp_path / "no-such-folder"))
    assert str(e.value).startswith(str(tmp_path / "no-such-folder")) and "\n" not in str(e.value)
    with pytest.raises(data.DataError, match="no such file"):
        next(data.pretrain_batches(str(tmp_path / "missing.jsonl"), data.get_encoding("builtin"), 2, 8, seed=0))


def test_builtin_default_trains_then_reuses(tmp_path, monkeypatch, capsys):
    import socket

    def no_network(*args):
        raise AssertionError(f"the default path tried to reach the network: {args}")
    monkeypatch.setattr(socket.socket, "connect", no_network)  # nothing downloaded, nothing sent
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(kernels, "USE_TRITON", False)  # the reference: the interpreter is slow (the kernel has tests)
    argv = ["--out", str(tmp_path / "out"), "--teacher_steps", "10", "--student_steps", "10", "--max_steps", "4",
            "--eval_interval", "2", "--n_train", "350", "--n_valid", "35", "--n_test", "35", "--rollout_size", "16",
            "--max_new_tokens", "24", "--batch_size", "16"]
    drawn, real_validity = [], minillm.validity  # (rows, greedy) of every validity call
    monkeypatch.setattr(minillm, "validity", lambda model, enc, rows, greedy=True, *a, **k: drawn.append(
        (len(rows), greedy)) or real_validity(model, enc, rows, greedy, *a, **k))
    minillm.main(argv)
    first = capsys.readouterr().out
    assert all(f"{stage}: trained" in first for stage in ("teacher", "student-sft", "kd", "on-policy", "minillm"))
    # the table: each model greedy once, and sampled with 3 seeds, each drawing every test prompt 4 times
    assert drawn.count((35, True)) == 5 and drawn.count((4 * 35, False)) == 15 and "each 4 draws per prompt" in first
    ours = {**minillm.CHOSEN["minillm"], "batch_size": 16, "rollout_size": 16}  # (the typed ones)
    assert "minillm: " + ", ".join(f"--{k} {ours[k]} (the paper: {v})" for k, v in minillm.PAPER.items()
                                   if ours[k] != v) + f", lr {ours['lr']:g}: " in first  # where it differs
    assert "validation valid (what chooses each distilled best.pt): teacher " in first  # before the first stage
    # progress: the stage of the five and the time left; the curves of every stage in one figure, from curves.jsonl
    assert "[stage 1 of 5, about " in first and "[stage 5 of 5, about " in first
    assert f"{tmp_path / 'out' / 'curves.png'}" in first and os.path.getsize(tmp_path / "out" / "curves.png") > 0
    for stage in ("teacher", "kd", "minillm"):
        records = [json.loads(line) for line in open(tmp_path / "out" / stage / "curves.jsonl")]
        logged = [line for line in open(tmp_path / "out" / stage / "log.txt") if line.startswith("step ")]
        assert len(records) == len(logged) and all(f"step {r['step']:5d} | " in line for r, line in zip(records,
                                                                                                         logged))
        val = [r for r in records if "val loss" in r]
        assert val and all(r["seconds"] >= 0 for r in records) and (stage == "teacher" or "val valid" in val[-1])
        assert all(f"val loss {r['val loss']:.4f}" in line for r, line in zip(records, logged) if "val loss" in r)
    minillm.main(argv)
    second = capsys.readouterr().out
    assert second.count(" has finished ") == 5 and "trained" not in second  # finished stages are reused
    table = lambda out: out[out.index("KD, on-policy and MiniLLM: "):out.index("the stages' curves")]
    assert table(first) == table(second)
    rows = table(first).splitlines()[3:]
    assert [r.split()[:2] for r in rows] == [[m, d] for m in ("teacher", "sft", "kd", "on-policy", "minillm")
                                            for d in ("greedy", "sampled")]
    assert [r.split()[2] for r in rows] == ["10"] * 4 + ["4"] * 6  # steps of each stage
    assert float(rows[0].split()[5]) == 0.0  # the teacher's reverse KL to itself
    assert all(r.split()[-2:-1] != [] for r in rows) and all(" ± " in r for r in rows[1::2])  # sampled: ± std
    # the typed --max_steps and --eval_interval reached KD and MiniLLM; the SFT stages kept the pipeline's
    for stage, steps, interval in (("teacher", 10, 500), ("student-sft", 10, 500), ("kd", 4, 2), ("on-policy", 4, 2),
                                   ("minillm", 4, 2)):
        args = minillm.read_checkpoint(str(tmp_path / "out" / stage / "last.pt"))["args"]
        assert (args["max_steps"], args["eval_interval"]) == (steps, interval), stage
    # each distillation stage ran its chosen settings where nothing typed replaced them (--rollout_size and
    # --batch_size were typed); on-policy distillation in rounds, as chosen
    for stage in ("kd", "on-policy", "minillm"):
        args = minillm.read_checkpoint(str(tmp_path / "out" / stage / "last.pt"))["args"]
        want = {**minillm.CHOSEN[stage], "batch_size": 16, "rollout_size": 16}
        assert all(args[k] == v for k, v in want.items() if k in minillm.CHOSEN[stage]), (stage, args)
    # python minillm.py --teacher CKPT: the pipeline with a given teacher trains the student and distills
    minillm.main(argv[:1] + [str(tmp_path / "given")] + argv[4:] +  # (--teacher_steps would be refused)
                 ["--teacher", str(tmp_path / "out" / "teacher" / "best.pt")])
    third = capsys.readouterr().out
    assert "teacher: trained" not in third and "student-sft: trained" in third and "minillm: trained" in third
    assert not (tmp_path / "given" / "teacher").exists() and table(third).splitlines()[3].split()[4:] == \
        rows[0].split()[4:]  # (its steps and minutes are not of this folder: "-")


def test_pipeline_checks_its_inputs_first(tmp_path, monkeypatch):
    """python minillm.py with a missing, a pickled-code, a wrong-tokenizer teacher (and a flag no stage uses): one
    line and a non-zero exit within seconds, before any stage trains; nothing written."""
    monkeypatch.chdir(tmp_path)
    enc = data.get_encoding("builtin")
    minillm.save_checkpoint(str(tmp_path / "bytes.pt"), tiny(vocab_size=300), None, 0, None, "builtin-bytes", {})
    minillm.save_checkpoint(str(tmp_path / "small.pt"), tiny(vocab_size=1000), None, 0, None, "builtin", {})
    minillm.save_checkpoint(str(tmp_path / "ok.pt"), tiny(vocab_size=enc.n_vocab), None, 0, None, "builtin", {})

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    torch.save({"model": Evil(), "config": {}, "tokenizer": "builtin"}, str(tmp_path / "evil.pt"))
    cases = [(["--teacher", "missing.pt"], "missing.pt: no such checkpoint file"),
             (["--teacher", "evil.pt"], "evil.pt: refused: it holds pickled objects that are not tensors"),
             (["--teacher", "bytes.pt"], "bytes.pt: its tokenizer is builtin-bytes; this run tokenizes with "
                                         "builtin (the built-in task's: give --data for yours)"),
             (["--teacher", "ok.pt", "--init", "bytes.pt"], "bytes.pt: its tokenizer is builtin-bytes"),
             (["--teacher", "small.pt"], "small.pt: 1000 embedding rows, fewer than the 1623 tokens of its tokenizer"),
             (["--init", "small.pt"], "small.pt: 1000 embedding rows, fewer than the 1623 tokens of its tokenizer"),
             (["--teacher", "ok.pt", "--max_new_tokens", "64"], "leaves no room for a prompt in block_size 64"),
             (["--teacher", "ok.pt", "--max_new_tokens", "56", "--n_train", "350"],
              "0 training prompts of --data builtin fit in 8 tokens"),
             (["--teacher", "ok.pt", "--teacher_steps", "5"], "--teacher_steps sizes a stage that --teacher replaces"),
             (["--init", "ok.pt", "--model", "gpt2"], "--model sizes a stage that --init replaces"),
             (["--teacher", "notes.txt"], "--teacher notes.txt: not a checkpoint: not a file torch.save wrote")]
    (tmp_path / "notes.txt").write_text("my notes\n")
    for i, (argv, message) in enumerate(cases):
        if i == 0:  # as a user runs it, with a deadline (the others in this process: the same main(), faster)
            t0 = time.time()
            r = subprocess.run([sys.executable, os.path.join(HERE, "minillm.py"), "--out", "out"] + argv,
                               capture_output=True, text=True, cwd=tmp_path, timeout=60)
            assert r.returncode == 1 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, (argv, r.stderr)
            assert r.stderr.startswith("error: ") and message in r.stderr and time.time() - t0 < 30, (argv, r.stderr)
        else:
            t0 = time.time()
            with pytest.raises(SystemExit) as e:
                minillm.main(["--out", str(tmp_path / "out")] + [str(tmp_path / a) if a.endswith(".pt") else a
                                                                  for a in argv])
            assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value)
            assert time.time() - t0 < 30, argv
        assert not (tmp_path / "out").exists() and not (tmp_path / "pwned").exists()
        assert not (tmp_path / "builtin_data").exists()  # (nothing written: the data cache neither)


# -----------------------------------------------------------------------------
# kernels.py: the fused reverse-KL kernel (under the Triton interpreter on the CPU) against float64


def rkl64(s, t, y, T, ignore_index=-100):
    """Independent float64 reverse KL, log q(y), log p(y), with the union mask, written from the definitions."""
    s, t = s.double() / T, t.double() / T
    masked = torch.isinf(s) | torch.isinf(t)
    row_s = torch.isinf(s).all(-1, keepdim=True)
    row_t = torch.isinf(t).all(-1, keepdim=True)
    es = torch.exp(s - torch.where(row_s, 0.0, s.max(-1, keepdim=True).values))
    et = torch.exp(t - torch.where(row_t, 0.0, t.max(-1, keepdim=True).values))
    q = es / es.sum(-1, keepdim=True).clamp_min(1e-300)
    p = et / et.sum(-1, keepdim=True).clamp_min(1e-300)
    terms = torch.where(masked, 0.0, q * (torch.where(masked, 1.0, q).log() - torch.where(masked, 1.0, p).log()))
    kl = terms.sum(-1)
    keep = y != ignore_index
    yy = y.clamp_min(0)[:, None]
    lq = torch.where(keep, q.gather(-1, yy).squeeze(-1), 1.0).log()  # an ignored row: log 1 = 0, no 0 * inf
    lp = torch.where(keep, p.gather(-1, yy).squeeze(-1), 1.0).log()
    return torch.where(keep, kl, 0.0), lq, lp


def kernel_case(N, V, seed, scale=3.0, mask=None, T=1.0, ignore=()):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(N, V, generator=g) * scale
    t = torch.randn(N, V, generator=g) * scale
    y = torch.randint(0, V, (N,), generator=g)
    if mask in ("student", "both"):
        s[torch.rand(N, V, generator=g) < 0.3] = float("-inf")
    if mask in ("teacher", "both"):
        t[torch.rand(N, V, generator=g) < 0.3] = float("-inf")
    for i in ignore:
        y[i] = -100
    for i in range(N):  # targets on entries both models keep, so that log q(y) and log p(y) are finite
        if y[i] >= 0 and (torch.isinf(s[i, y[i]]) or torch.isinf(t[i, y[i]])):
            finite = torch.nonzero(~torch.isinf(s[i]) & ~torch.isinf(t[i]))
            y[i] = finite[0, 0] if len(finite) else -100
    return s.to(DEV), t.to(DEV), y.to(DEV), T


def check_kernel(s, t, y, T, atol=1e-4):
    assert kernels.use_kernel(s), "the kernel path must run in these tests (TRITON_INTERPRET=1 or CUDA)"
    g = torch.Generator().manual_seed(1)
    g_kl, g_lq = (torch.randn(len(s), generator=g).to(s.device) for _ in range(2))  # grad_output != 1
    s_k = s.clone().requires_grad_()
    kl, lq, lp = kernels.reverse_kl(s_k, t, y, temperature=T)
    (kl * g_kl + lq * g_lq + lp).sum().backward()  # log p(y) carries no student gradient
    s64 = s.double().requires_grad_()
    kl64, lq64, lp64 = rkl64(s64, t, y, T)
    (kl64 * g_kl.double() + lq64 * g_lq.double()).sum().backward()
    for name, a, b in (("kl", kl, kl64), ("log q(y)", lq, lq64), ("log p(y)", lp, lp64), ("grad", s_k.grad, s64.grad)):
        assert torch.isfinite(a).all(), f"{name}: non-finite at {torch.nonzero(~torch.isfinite(a))[:3].tolist()}"
        assert_close(a.double(), b, atol, name)
    assert s_k.grad.dtype == s.dtype


@pytest.mark.parametrize("V", [8, 41, 1271, 5000])  # 5000 spans two 4096-wide blocks
@pytest.mark.parametrize("mask", [None, "student", "teacher", "both"])
def test_kernel_matches_float64(V, mask):
    check_kernel(*kernel_case(5, V, seed=V, mask=mask, ignore=(3,)))


def test_kernel_gpt2_vocabulary_peaked_and_temperature():
    check_kernel(*kernel_case(3, 50257, seed=0, scale=20.0, T=0.7))   # peaked logits (x20)
    check_kernel(*kernel_case(4, 1271, seed=2, scale=20.0, T=2.0, mask="both"))


def test_kernel_all_ignored_and_fully_masked_rows():
    s, t, y, T = kernel_case(4, 41, seed=3, ignore=(0, 1, 2, 3))
    check_kernel(s, t, y, T)
    s_k = s.clone().requires_grad_()
    kl, lq, lp = kernels.reverse_kl(s_k, t, y)
    (kl + lq).sum().backward()
    assert not kl.any() and not lq.any() and not lp.any() and not s_k.grad.any()
    s, t, y, T = kernel_case(4, 41, seed=4)
    s[0], t[1], s[2], t[2] = float("-inf"), float("-inf"), float("-inf"), float("-inf")
    y[0] = y[1] = y[2] = -100  # a fully masked row has no token to score
    check_kernel(s, t, y, T)
    kl = kernels.reverse_kl(s, t)  # without targets: KL only
    assert kl.shape == (4,) and kl[0] == 0 and kl[1] == 0 and kl[2] == 0


def test_kl_of_a_distribution_with_itself_is_zero_and_kl_is_nonnegative():
    s, t, y, _ = kernel_case(6, 1271, seed=5)
    assert kernels.reverse_kl(s, s.clone()).abs().max() < 1e-5
    for use in (True, False):
        kernels.USE_TRITON = use
        try:
            assert (kernels.reverse_kl(s, t) >= 0).all()
        finally:
            kernels.USE_TRITON = None


def test_kernel_and_reference_paths_agree_and_shapes():
    s, t, y, _ = kernel_case(6, 41, seed=6)
    outs = []
    for use in (True, False):
        kernels.USE_TRITON = use
        try:
            outs.append(kernels.reverse_kl(s.view(2, 3, 41), t.view(2, 3, 41), y.view(2, 3)))
        finally:
            kernels.USE_TRITON = None
    for a, b in zip(*outs):
        assert a.shape == (2, 3)
        assert_close(a, b, 1e-5, "kernel vs reference")
    with pytest.raises(ValueError, match="slice it"):
        kernels.reverse_kl(torch.randn(2, 41), torch.randn(2, 48))


def test_reference_gradcheck():
    s, t, y, _ = kernel_case(3, 8, seed=7, mask="teacher", ignore=(1,))
    s = s.double().requires_grad_()
    t = t.double()
    torch.autograd.gradcheck(lambda x: kernels.reverse_kl_ref(x, t, y, temperature=1.3), (s,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 / fp16 kernels are checked on CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_half_precision_on_cuda(dtype):
    s, t, y, T = kernel_case(64, 50257, seed=8, scale=5.0, mask="both", ignore=(3,))
    s, t, y = s.cuda().to(dtype), t.cuda().to(dtype), y.cuda()
    s_k = s.clone().requires_grad_()
    kl, lq, lp = kernels.reverse_kl(s_k, t, y)
    (kl + lq).sum().backward()
    kl64, lq64, lp64 = rkl64(s.double().cpu(), t.double().cpu(), y.cpu(), 1.0)
    for name, a, b in (("kl", kl, kl64), ("log q(y)", lq, lq64), ("log p(y)", lp, lp64)):
        assert_close(a.double().cpu(), b, 2e-2, name)  # inputs rounded to dtype, fp32 accumulation
    assert s_k.grad.dtype == dtype and torch.isfinite(s_k.grad).all()

# -----------------------------------------------------------------------------
# the MiniLLM objective


def estimator_models(seed=0):
    """A tiny student and teacher over 4 tokens (3 is EOS) whose next-token distributions differ clearly."""
    models = []
    for k in range(2):
        m = tiny(vocab_size=4, block_size=16, seed=seed + k, n_layer=1)
        with torch.no_grad():
            m.transformer.wte.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(seed + 10 + k))
            m.transformer.ln_f.weight.fill_(0.08)  # logits of order 1: neither peaked nor uniform
        models.append(m)
    return models


def exact_kl_gradient(student, teacher, prompt, eos, L):
    """grad of KL[q || p] over every response (ending at EOS, or cut at L tokens), by enumeration."""
    import itertools
    seqs = [c for n in range(1, L + 1) for c in itertools.product(range(4), repeat=n)
            if eos not in c[:-1] and (c[-1] == eos or n == L)]
    idx = torch.tensor([prompt + list(c) + [eos] * (L - len(c)) for c in seqs])  # (S, Tp + L)
    mask = torch.tensor([[i < len(c) for i in range(L)] for c in seqs])
    Tp = len(prompt)

    def seq_logprob(model):
        logp = F.log_softmax(model(idx[:, :-1])[0][:, Tp - 1:], -1)  # (S, L, V)
        return (logp.gather(-1, idx[:, Tp:, None])[..., 0] * mask).sum(1)
    lq = seq_logprob(student)
    with torch.no_grad():
        lp = seq_logprob(teacher)
    kl = (lq.exp() * (lq - lp)).sum()
    return kl.item(), torch.autograd.grad(kl, list(student.parameters()))


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_estimator_matches_exact_gradient_by_enumeration(alpha):
    student, teacher = estimator_models()
    prompt, eos, L, B = [0, 1], 3, 3, 40000
    kl, exact = exact_kl_gradient(student, teacher, prompt, eos, L)
    assert kl > 0.03  # the two models really differ
    batch = minillm.rollout(student, teacher, [prompt] * B, L, eos, alpha, torch.Generator().manual_seed(0))
    mask = batch["mask"]
    targets = batch["tokens"].masked_fill(~mask, -100)
    with torch.no_grad():
        t_logits = minillm.response_logits(teacher, batch)
    # the reference: the interpreter would run 120,000 kernel programs one by one (the kernel has its own tests)
    kl_t, logq, logp = kernels.reverse_kl_ref(minillm.response_logits(student, batch), t_logits, targets)
    assert_close(logp, batch["logp"], 1e-5, "teacher log-probs: rollout vs recomputation")
    r = batch["logp"] - batch["logq_old"]                                # r_t = log p - log q_old
    A = minillm.returns(r, mask, length_norm=False)                      # R_{t+1}, plain sum (Eq. 2)
    log_w = (batch["logq_old"] - batch["log_pmix"]) * mask               # per-step log q/p_mix
    w_single = torch.exp(log_w.cumsum(1) - log_w)                        # exact: prod over t' < t
    w_long = torch.exp(log_w.sum(1, keepdim=True)).expand_as(log_w)      # exact: the whole sequence
    single, long_term = minillm.minillm_terms(logq, kl_t, batch["logq_old"], A, w_single, w_long, clip_eps=None)
    loss = ((single + long_term) * mask).sum() / B                       # E over sequences of the sum over t
    est = torch.autograd.grad(loss, list(student.parameters()))
    g_est, g_exact = torch.cat([g.flatten() for g in est]), torch.cat([g.flatten() for g in exact])
    rel = ((g_est - g_exact).norm() / g_exact.norm()).item()
    assert rel < 0.05, f"alpha {alpha}: relative error {rel:.3f} of the estimated gradient"


def test_returns_length_normalization_and_masks():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0, 9.0], [5.0, 7.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    # R^Norm_{t+1}: mean of r over the valid steps after t; 0 at the last step and after the end
    expected = torch.tensor([[3.0, 3.5, 4.0, 0.0, 0.0], [7.0, 0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(minillm.returns(r, mask), expected)
    assert torch.equal(minillm.returns(r, mask, length_norm=False), torch.tensor([[9.0, 7, 4, 0, 0], [7.0, 0, 0, 0, 0]]))
    # --gamma (the official code's discount): R_{t+1} = sum_{t' > t} gamma^(t' - t - 1) r_t'
    half = torch.tensor([[2 + 3 / 2 + 4 / 4, 3 + 4 / 2, 4.0, 0, 0], [7.0, 0, 0, 0, 0]])
    assert torch.allclose(minillm.returns(r, mask, length_norm=False, gamma=0.5), half)
    assert torch.allclose(minillm.returns(r, mask, gamma=0.5), half / torch.tensor([[3.0, 2, 1, 1, 1], [1.0, 1, 1, 1, 1]]))
    # --no_single_step: R_t = r_t + R_{t+1}, step t included, normalized by the T - t + 1 steps t .. T
    assert torch.equal(minillm.returns(r, mask, length_norm=False, include_t=True),
                       torch.tensor([[10.0, 9, 7, 4, 0], [12.0, 7, 0, 0, 0]]))
    assert torch.equal(minillm.returns(r, mask, include_t=True), torch.tensor([[2.5, 3, 3.5, 4, 0], [6.0, 7, 0, 0, 0]]))


def test_clipping_only_outside_the_trust_region():
    logq_old = torch.zeros(1, 5)
    logq = torch.log(torch.tensor([[0.5, 0.9, 1.0, 1.1, 1.5]]))  # rho = q_theta / q_old (w = 1)
    ones = torch.ones(1, 5)
    for A in (1.0, -1.0):
        logq_ = logq.clone().requires_grad_()
        _, long_term = minillm.minillm_terms(logq_, torch.zeros(1, 5), logq_old, A * ones, ones, ones, clip_eps=0.2)
        long_term.sum().backward()
        inside = logq_.grad[0, 1:4]
        assert torch.allclose(inside, -A * torch.tensor([0.9, 1.0, 1.1])), inside  # d(-A rho)/d log q = -A rho
        if A > 0:  # a good action is not pushed further once rho > 1 + eps; a bad one (A < 0) below 1 - eps
            assert logq_.grad[0, 4] == 0 and logq_.grad[0, 0] != 0
        else:
            assert logq_.grad[0, 0] == 0 and logq_.grad[0, 4] != 0


def test_rollout_masks_and_tokens_after_eos_change_nothing():
    student, teacher = estimator_models(seed=3)
    batch = minillm.rollout(student, teacher, [[0, 1], [2], [1, 2, 0]] * 6, 6, 3, 0.2,
                            torch.Generator().manual_seed(1))
    mask, tokens = batch["mask"], batch["tokens"]
    ended = (tokens == 3) & mask
    assert ended.any() and (~mask).any()
    for row in range(len(tokens)):  # the mask runs up to and including the first EOS, then stops
        n = int(mask[row].sum())
        assert mask[row, :n].all() and not mask[row, n:].any()
        assert n == tokens.size(1) or tokens[row, n - 1] == 3
    for key in ("logq_old", "logp", "log_pmix"):
        assert (batch[key][~mask] == 0).all()

    def loss_of(b):
        targets = b["tokens"].masked_fill(~b["mask"], -100)
        kl, logq, _ = kernels.reverse_kl(minillm.response_logits(student, b),
                                         minillm.response_logits(teacher, b), targets)
        A = minillm.returns(b["logp"] - b["logq_old"], b["mask"])
        w = torch.exp(b["logq_old"] - b["log_pmix"])
        single, long_term = minillm.minillm_terms(logq, kl, b["logq_old"], A, w, w)
        return ((single + long_term) * b["mask"]).sum()
    garbled = {**batch, "tokens": torch.where(mask, tokens, torch.randint(0, 4, tokens.shape))}
    with torch.no_grad():
        assert torch.allclose(loss_of(batch), loss_of(garbled))


@pytest.mark.parametrize("with_teacher", [True, False])
def test_a_compact_rollout_drops_ended_rows_and_samples_the_same(monkeypatch, with_teacher):
    enc = data.get_encoding("builtin")
    student = eos_teacher(enc, p_eos=0.3)  # (a model that ends its responses early)
    teacher = tiny(vocab_size=enc.n_vocab, block_size=64, seed=1) if with_teacher else None
    prompts = [[5 + i % 7] * (1 + i % 5) for i in range(24)]
    widths = []
    decode = minillm.decode
    monkeypatch.setattr(minillm, "decode", lambda model, cache, token: widths.append(len(token)) or decode(
        model, cache, token))
    runs = [minillm.rollout(student, teacher, prompts, 24, enc.eot_token, 0.2 if teacher else 0.0,
                            torch.Generator().manual_seed(4), compact=c) for c in (False, True)]
    full, compact = widths[:len(widths) // 2], widths[len(widths) // 2:]
    assert set(full) == {24} and min(compact) < 12 and len(compact) == len(full)  # ended rows were dropped
    for key in ("tokens", "mask", "prompt_idx"):  # the same samples (the draws are made for every row) ...
        assert torch.equal(runs[0][key], runs[1][key]), key
    for key in ("logq_old", "logp", "log_pmix"):  # ... and the same log-probabilities, to rounding
        assert torch.allclose(runs[0][key], runs[1][key], atol=1e-5), key
    assert runs[1]["mask"].sum(1).min() < runs[1]["mask"].size(1)  # (some rows ended early)


def test_minillm_steps_lower_the_reverse_kl(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(kernels, "USE_TRITON", False)  # the reference: the interpreter is slow (the kernel has tests)
    enc = data.get_encoding("builtin")
    for name, seed in (("teacher", 0), ("student", 1)):
        model = tiny(vocab_size=enc.n_vocab, block_size=64, seed=seed)
        if name == "teacher":  # a peaked teacher, far from the near-uniform student
            with torch.no_grad():
                model.transformer.ln_f.weight.fill_(4.0)
        opt = torch.optim.AdamW(model.parameters())
        minillm.save_checkpoint(str(tmp_path / f"{name}.pt"), model, opt, 0, None, "builtin", {})
    args = minillm.get_args(["--method", "minillm", "--teacher", str(tmp_path / "teacher.pt"),
                             "--init", str(tmp_path / "student.pt"), "--out", str(tmp_path / "run"),
                             "--max_steps", "24", "--eval_interval", "24", "--log_interval", "8", "--lr", "1e-2",
                             "--warmup_steps", "1", "--rollout_size", "16", "--batch_size", "8",
                             "--max_new_tokens", "12", "--n_train", "350", "--n_valid", "35", "--n_test", "35",
                             "--lm_coef", "0",  # the objective alone: L_PT pulls toward other text
                             "--target_kl", "0"])  # (and every pass of each round: the guard has its own test)
    minillm.train(args)
    log = open(tmp_path / "run" / "log.txt").read()
    vals = [float(l.split("val rkl ")[1].split()[0]) for l in log.splitlines() if "val rkl" in l]
    assert len(vals) == 2 and vals[1] < 0.8 * vals[0], vals
    for field in ("rkl", "reward", "single", "long", "clip", " w ", "len", "tok/s", "ETA"):
        assert field in log, field

# -----------------------------------------------------------------------------
# the baselines, and the four methods in one loop


def test_forward_kl_and_the_kd_loss():
    g = torch.Generator().manual_seed(0)
    q, p = torch.randn(2, 3, 11, generator=g), torch.randn(2, 3, 11, generator=g)
    keep = torch.tensor([[True, True, False], [True, False, False]])
    ref = F.kl_div(F.log_softmax(q, -1), F.log_softmax(p, -1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(minillm.forward_kl(q, p), ref)  # (2, 3): one per position
    assert minillm.forward_kl(q, q).abs().max() < 1e-6
    p_zero = p.clone()
    p_zero[..., 0] = float("-inf")  # a token the teacher never emits adds nothing (and no NaN)
    assert torch.isfinite(minillm.forward_kl(q, p_zero)).all()
    qa, qb = q.clone().requires_grad_(), q.clone().requires_grad_()
    minillm.forward_kl(qa, p)[keep].mean().backward()
    (-(F.softmax(p, -1) * F.log_softmax(qb, -1)).sum(-1))[keep].mean().backward()
    assert torch.allclose(qa.grad, qb.grad, atol=1e-6)  # the gradient of the official soft cross-entropy
    student, teacher = tiny(seed=0), tiny(seed=1)
    x = torch.randint(0, 97, (2, 10), generator=g)
    y = x.roll(-1, 1)
    y[:, :4] = -100  # the prompt
    logits = student(x)[0]
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    loss, stats = minillm.token_loss(student, teacher, x, y, 0.5, torch.no_grad())
    assert torch.allclose(loss, 0.5 * ce + 0.5 * minillm.forward_kl(logits, teacher(x)[0])[y != -100].mean())
    assert set(stats) == {"ce", "fkl"}
    assert torch.allclose(minillm.token_loss(student, None, x, y, 0.5, torch.no_grad())[0], ce)  # sft


def eos_teacher(enc, p_eos=0.3):
    """A tiny model that says EOS with probability about p_eos at every step, whatever the context."""
    model = tiny(vocab_size=enc.n_vocab, block_size=64, seed=5)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()  # the final hidden state is the bias alone
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.transformer.wte.weight[:, 0] = 0.0
        model.transformer.wte.weight[enc.eot_token, 0] = math.log(p_eos / (1 - p_eos) * (enc.n_vocab - 1))
    return model


@pytest.mark.parametrize("method", ["sft", "kd", "seqkd", "onpolicy", "minillm"])
def test_every_method_runs_in_the_same_loop(tmp_path, monkeypatch, method):
    monkeypatch.chdir(tmp_path)
    enc = data.get_encoding("builtin")
    for name, model in (("teacher", eos_teacher(enc)), ("student", tiny(vocab_size=enc.n_vocab, block_size=64))):
        minillm.save_checkpoint(str(tmp_path / f"{name}.pt"), model, None, 0, None, "builtin", {})
    argv = ["--method", method, "--teacher", str(tmp_path / "teacher.pt"), "--init", str(tmp_path / "student.pt"),
            "--out", str(tmp_path / "run"), "--max_steps", "6", "--eval_interval", "3", "--log_interval", "2",
            "--batch_size", "4", "--max_new_tokens", "8", "--n_train", "70", "--n_valid", "14",
            "--n_test", "14", "--lm_coef", "1", "--pt_length", "16", "--warmup_steps", "1"]
    # (minillm: one round of 8, the drift guard off so that all 4 passes use it; on-policy: a fresh batch a step)
    argv += ["--rollout_size", "8", "--target_kl", "0"] if method == "minillm" else []
    best = minillm.train(minillm.get_args(argv))
    log = open(tmp_path / "run" / "log.txt").read()
    fields = {"sft": ["ce", "L_PT"], "kd": ["rkl", "ce", "fkl", "L_PT"], "seqkd": ["rkl", "ce", "fkl", "L_PT"],
              "onpolicy": ["rkl", "token_rkl", "len", "kl_old", "L_PT"],
              "minillm": ["rkl", "reward", "single", "long", "adv", "kl_old", "clip", "ent", "w", "len",
                          "L_PT"]}[method]
    step_lines = [line for line in log.splitlines() if line.startswith("step") and "| loss" in line]
    assert len(step_lines) == 3 and all("tok/s" in line and "ETA" in line for line in step_lines)
    assert [f.split()[0] for f in step_lines[0].split(" | lr ")[0].split(" | ")[2:] if f.split()[0] != "epoch"] == fields
    phases = [f.split()[0] for f in step_lines[0].split(" tok/s | ")[1].split(" | ")[:-1]]  # where the time went
    assert phases == (["rollout"] if method in ("minillm", "onpolicy") else []) + (
        ["teacher", "student"] if method != "sft" else []), phases
    assert len([line for line in log.splitlines() if "| val loss" in line]) == 3  # steps 0, 3, 6
    model, ckpt = minillm.load_checkpoint(best)
    assert set(ckpt["metrics"]) == ({"loss", "pt_loss"} if method == "sft" else {"loss", "pt_loss", "rkl", "valid"})
    assert minillm.load_checkpoint(str(tmp_path / "run" / "last.pt"))[1]["step"] == 6
    # the responses each method sampled: seqkd the teacher's 6 x 4, minillm one round of 8 (4 epochs of 2 mini-batches),
    # on-policy a fresh batch of 4 every step
    samples = {"sft": 0, "kd": 0, "seqkd": 24, "onpolicy": 24, "minillm": 8}[method]
    assert minillm.run_summary(str(tmp_path / "run"))[3] == samples
    if method == "seqkd":  # the teacher's responses: generated once, in the Dolly schema, reused by a second run
        rows = data.read_examples(str(tmp_path / "run" / "teacher_responses_24.jsonl"))
        assert 0 < len(rows) < 24  # some had no EOS within 8 tokens and were dropped
        originals = {r["instruction"]: r["response"] for r in data.load_instructions("builtin", 70, 14, 14)[0]["train"]}
        assert all(r["instruction"] in originals and r["response"] != originals[r["instruction"]] for r in rows)
        os.remove(tmp_path / "run" / "last.pt")  # as if stopped after step 3: --resume goes on from step-000003.pt
        minillm.train(minillm.get_args(argv + ["--resume"]))
        log = open(tmp_path / "run" / "log.txt").read()
        assert "step-000003.pt (step 3)" in log and "reusing the teacher's responses" in log


@pytest.mark.parametrize("method", ["minillm", "onpolicy"])
def test_the_drift_guard_ends_a_round_once_the_student_has_moved_from_q_old(tmp_path, monkeypatch, method):
    """--target_kl, at the end of each pass over a round of 8 in mini-batches of 4: a learning rate that carries the
    student far from q_old in one step ends every round after its first pass; one that barely moves it uses all 4
    passes; the log line says how many; and off (0) trains the same weights, bit for bit, as a target never reached."""
    monkeypatch.setattr(kernels, "USE_TRITON", False)  # (the reference: the kernel's own tests are above)
    enc = data.get_encoding("builtin")
    for name, model in (("teacher", eos_teacher(enc)), ("student", tiny(vocab_size=enc.n_vocab, block_size=64))):
        minillm.save_checkpoint(str(tmp_path / f"{name}.pt"), model, None, 0, None, "builtin", {})

    def run(name, lr, target):
        argv = ["--method", method, "--teacher", str(tmp_path / "teacher.pt"), "--init", str(tmp_path / "student.pt"),
                "--out", str(tmp_path / name), "--max_steps", "12", "--eval_interval", "12", "--log_interval", "9",
                "--rollout_size", "8", "--batch_size", "4", "--ppo_epochs", "4", "--max_new_tokens", "8",
                "--n_train", "70", "--n_valid", "14", "--n_test", "14", "--lm_coef", "0", "--warmup_steps", "1",
                "--min_lr", lr, "--lr", lr] + (["--target_kl", target] if target else [])
        minillm.train(minillm.get_args(argv))
        log = open(tmp_path / name / "log.txt").read()
        passes = [float(line.split("| passes ")[1].split()[0]) for line in log.splitlines() if "| passes " in line]
        assert ("the drift guard is on (--target_kl 0.001" in log) == (target is None)  # (the default, said once)
        return passes, minillm.read_checkpoint(str(tmp_path / name / "last.pt"))
    far, _ = run("far", "0.3", "0.002")
    assert far and all(p == 1.0 for p in far), far  # (never half a pass: the guard looks at the end of a pass)
    near, _ = run("near", "1e-7", None)  # (the default target)
    assert near and all(p == 4.0 for p in near), near
    if method == "minillm":
        off, off_ckpt = run("off", "1e-2", "0")
        never, never_ckpt = run("never", "1e-2", "1e9")
        assert off == [] and never and all(p == 4.0 for p in never)
        assert all(torch.equal(off_ckpt["model"][k], v) for k, v in never_ckpt["model"].items())


def test_generalized_jsd_by_hand_and_its_ends_are_the_two_kls():
    q = torch.tensor([[0.9, 0.1], [0.5, 0.5]], dtype=torch.float64).log()  # logits = log-probabilities
    p = torch.tensor([[0.5, 0.5], [0.2, 0.8]], dtype=torch.float64).log()
    for beta in (0.5, 0.3):
        Q, P = q.exp(), p.exp()
        M = beta * P + (1 - beta) * Q
        by_hand = beta * (P * (P / M).log()).sum(-1) + (1 - beta) * (Q * (Q / M).log()).sum(-1)
        assert torch.allclose(minillm.generalized_jsd(q, p, beta), by_hand.float())  # (computed in fp32)
    forward = (p.exp() * (p - q)).sum(-1)  # KL[p || q]
    reverse = (q.exp() * (q - p)).sum(-1)  # KL[q || p]
    assert torch.allclose(minillm.generalized_jsd(q, p, 0.0), forward.float())  # TRL's ends: 0 forward, 1 reverse
    assert torch.allclose(minillm.generalized_jsd(q, p, 1.0), reverse.float())
    assert minillm.generalized_jsd(q, q, 0.5).abs().max() < 1e-6
    p_masked = torch.tensor([[0.0, float("-inf")]], dtype=torch.float64)  # the teacher never emits token 1
    assert torch.isfinite(minillm.generalized_jsd(q[:1], p_masked, 0.5)).all()


def test_onpolicy_reverse_kl_has_the_single_step_terms_gradient():
    """--method onpolicy --divergence rkl on a batch of pure student samples takes the gradient of MiniLLM's
    single-step term alone (w_t = 1, --no_long_term) on the same samples."""
    student, teacher = estimator_models(seed=3)
    args = minillm.get_args(["--no_long_term", "--max_new_tokens", "6"])  # (--divergence rkl, --chunk 0)
    prompts = [[0, 1], [2], [1, 2, 0]] * 4
    batch = minillm.rollout(student, teacher, prompts, 6, 3, 0.0, torch.Generator().manual_seed(0))
    alone = minillm.rollout(student, None, prompts, 6, 3, 0.0, torch.Generator().manual_seed(0))  # as onpolicy samples
    assert torch.equal(alone["tokens"], batch["tokens"]) and torch.equal(alone["logq_old"], batch["logq_old"])
    batch = minillm.score_round(batch, args)
    batch["w"] = torch.ones_like(batch["w"])  # q_old / p_mix = 1 with alpha 0, up to rounding
    grads = []
    for loss_fn in (minillm.onpolicy_loss, minillm.minillm_loss):
        student.zero_grad()
        loss_fn(student, teacher, batch, args, torch.enable_grad())[0].backward()
        grads.append([p.grad.clone() for p in student.parameters()])
    assert any(g.abs().max() > 0 for g in grads[0])
    for a, b in zip(*grads):
        assert_close(a, b, 1e-6, "onpolicy rkl vs the single-step term")
    for div in ("fkl", "jsd"):  # the other divergences run and differ from the reverse KL
        other = argparse.Namespace(**{**vars(args), "divergence": div})
        loss, stats = minillm.onpolicy_loss(student, teacher, batch, other, torch.no_grad())
        assert torch.isfinite(loss) and f"token_{div}" in stats

# -----------------------------------------------------------------------------
# eval.py


def test_table_prints_a_dash_for_a_band_without_references():
    import eval as ev
    results = [{"label": "a", "rougeL [0,5]": [50.0, 1.0], "rougeL [6,10]": [40.0, 0.0]},
               {"label": "b", "rougeL [0,5]": [60.0, 2.0]}]  # b's test set has no 6-10-word reference
    lines = ev.table(results, ["rougeL [0,5]", "rougeL [6,10]"]).splitlines()
    assert lines[2] == "| a | 50.0 ± 1.0 | 40.0 |" and lines[3] == "| b | 60.0 ± 2.0 | - |"


def test_a_tokenizer_that_cannot_be_fetched_says_what_to_do(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("HTTPSConnectionPool(host=..., port=443): Max retries exceeded")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(data.DataError) as e:
        data.get_encoding("gpt2")
    assert str(e.value) == ("tokenizer gpt2: tiktoken fetches its file once from the internet and could not "
                            "(ConnectionError): run once with the network (it is then cached), or use --tokenizer "
                            "builtin for small experiments offline")
    with pytest.raises(data.DataError, match="tokenizer gtp2: unknown"):
        data.get_encoding("gtp2")


def test_rouge_l_dist4_and_buckets_by_hand():
    import eval as ev
    # LCS("the cat sat on the mat", "the cats sat on a mat") with stemming (cats -> cat) = 5 of 6 words each side
    assert abs(data.rouge_l("the cats sat on a mat", ["the cat sat on the mat"]) - 100 * 5 / 6) < 1e-9
    # precision 2/2, recall 2/4: F = 2 * 1 * 0.5 / 1.5; the maximum over references
    assert abs(data.rouge_l("a b", ["a x b y", "q"]) - 100 * 2 / 3) < 1e-9
    assert data.rouge_l("a b", ["c d"]) == 0 and data.rouge_l("same words", ["same words"]) == 100
    assert ev.dist_n(["a b c d e", "a b c d"], n=4) == 2 / 3  # (a b c d) twice, (b c d e) once
    assert ev.dist_n(["too short"], n=4) == 0.0
    assert [ev.bucket_of(" ".join("w" * k)) for k in (1, 5, 6, 10, 11, 40)] == \
        ["[0,5]", "[0,5]", "[6,10]", "[6,10]", "[11,inf)", "[11,inf)"]


def test_ece_on_a_constructed_case():
    import eval as ev
    # bin [0.9, 1.0): confidence 0.95 x 4, 2 right -> |0.5 - 0.95| = 0.45 with weight 4/10
    # bin [0.6, 0.7): confidence 0.65 x 6, all right -> |1 - 0.65| = 0.35 with weight 6/10
    value, bins = ev.ece([0.95] * 4 + [0.65] * 6, [1, 1, 0, 0] + [1] * 6)
    assert abs(value - (0.4 * 0.45 + 0.6 * 0.35)) < 1e-12 and len(bins) == 2
    assert ev.ece([0.7, 0.7], [1, 1])[0] == pytest.approx(0.3) and ev.ece([1.0, 1.0], [1, 1])[0] == 0.0


def test_exposure_bias_is_zero_for_the_teacher_itself_and_positive_otherwise():
    import eval as ev
    student, teacher = estimator_models(seed=4)
    prompts = [[0, 1], [2], [1, 2, 0]] * 10
    same = ev.exposure_bias(teacher, teacher, prompts, eos_id=3, length=5, seed=0)
    assert same["ExAccErr"] == [0.0] * len(same["ExAccErr"]) and max(same["R"]) == 0
    other = ev.exposure_bias(student, teacher, prompts, eos_id=3, length=5, seed=0)
    assert min(other["eps"]) > 0 and len(other["ExAccErr"]) >= 2


def test_benchmarks_print_their_tables(tmp_path, monkeypatch, capsys):
    """python eval.py --bench generate | minillm | rollout | tokenizers and kernels.py --sweep, at small sizes: each
    prints its whole table (the numbers are timings, not checked); an unknown flag is refused except where
    minillm.py's flags are meant."""
    import eval as ev
    monkeypatch.chdir(tmp_path)
    ev.bench_generate("cpu", n_prompts=4, new_tokens=8, repeats=1)
    ev.bench_tokenizers(n=64, steps=1)
    before = capsys.readouterr().out
    ev.bench_teacher(n_train=400, steps=1, warm=1, configs=("2 threads", "1 thread", "fused AdamW", "batch 64"))
    teacher = capsys.readouterr().out
    assert "tokens computed" in teacher and teacher.count(" thread(s): ") == 2
    assert [line.split()[0] for line in teacher.splitlines()[2:6]] == ["2", "1", "fused", "batch"]
    ev.main(["--bench", "minillm", "--device", "cpu", "--max_steps", "2", "--rollout_size", "8", "--batch_size", "4",
             "--max_new_tokens", "8"])
    monkeypatch.setattr(minillm, "DECODE_BACKEND", "eager")  # (inductor would take a minute to compile here)
    minillm.compiled_decode.cache_clear()
    small = minillm.GPTConfig(vocab_size=97, block_size=128, n_layer=1, n_head=2, n_embd=16)  # (quick to trace)
    monkeypatch.setitem(ev.BENCH_SHAPES, "gpt2", (ev.BENCH_SHAPES["gpt2"][0], (small, small)))
    ev.bench_rollout(minillm.get_args(["--device", "cpu", "--rollout_size", "4", "--batch_size", "2",
                                       "--max_new_tokens", "4", "--ppo_epochs", "1"]), "gpt2", repeats=1)
    minillm.compiled_decode.cache_clear()
    launch = dict(kernels.LAUNCH)  # the GPU's block-size sweep, with a stand-in timer (1 ms) and copy bandwidth
    kernels.sweep(N=2, V=100, blocks=(32, 64), warps=(4,), device=DEV, timer=lambda fn: (fn(), 1.0)[1], copy_gbs=1.0)
    assert kernels.LAUNCH == launch
    out = before + capsys.readouterr().out
    assert "bfloat16     64      4    1.000     0%    1.000     0%" in out and "best (BLOCK, warps)" in out
    for line in ("KV cache", "recompute", "speedup", "builtin-bytes", "rollout:", "reference", "fused kernel",
                 "kernel, --chunk 1024", "rollouts of up to 8 tokens", "rollout, student + teacher, eager",
                 "rollout, student + teacher, fast", "(fast: 2 graphs traced, 0 skipped CUDA graphs",
                 "generate, student alone, fast", "transformers generate",
                 "MiniLLM per training row", "per response sampled"):
        assert line in out, line
    assert kernels.USE_TRITON is None  # the benchmark gives the dispatch back
    with pytest.raises(SystemExit):
        ev.main(["--bench", "generate", "--max_steps", "2"])


def test_eval_of_a_checkpoint_is_deterministic_and_writes_reports(tmp_path, monkeypatch, capsys):
    import eval as ev
    monkeypatch.chdir(tmp_path)
    enc = data.get_encoding("builtin")
    paths = []
    for name, model in (("teacher", eos_teacher(enc)), ("student", tiny(vocab_size=enc.n_vocab, block_size=64))):
        os.makedirs(tmp_path / name)
        paths.append(str(tmp_path / name / "best.pt"))
        minillm.save_checkpoint(paths[-1], model, None, 0, None, "builtin", {})
    argv = [paths[1], paths[0], "--teacher", paths[0], "--n_test", "21", "--seeds", "1", "2",
            "--max_new_tokens", "12", "--exposure_len", "6", "--out", str(tmp_path / "eval")]
    with pytest.raises(SystemExit, match="student/best.pt: records no training data: give --data"):
        ev.main(argv)  # (checkpoints made by hand: they record no --data)
    argv += ["--data", "builtin"]
    ev.main(argv)
    first = json.load(open(tmp_path / "eval" / "results.json"))
    ev.main(argv)
    assert json.load(open(tmp_path / "eval" / "results.json")) == first  # same seeds, same numbers
    assert not (tmp_path / "builtin_data").exists()  # the built-in test set made in memory, nothing written here
    student, teacher = first
    assert student["label"] == "student" and student["n"] == 21 and student["seeds"] == [1, 2]
    for key in ("rougeL", "valid", "exact", "dist4", "rkl", "ece", "lm_loss", "rougeL [0,5]", "valid story"):
        assert key in student and len(student[key]) == 2, key
    assert teacher["rkl"] == [0.0, 0.0] and teacher["exposure"]["ExAccErr"][0] == 0.0
    assert json.load(open(tmp_path / "student" / "best-eval.json"))["data"] == "builtin"
    for f in ("results.csv", "results.md", "exposure_bias.png", "reliability.png"):
        assert os.path.getsize(tmp_path / "eval" / f) > 0, f
    # a checkpoint that records its training data is evaluated on it; its own evaluation is replaced with a line
    minillm.save_checkpoint(paths[1], tiny(vocab_size=enc.n_vocab, block_size=64), None, 0,
                            argparse.Namespace(data="builtin"), "builtin", {})
    ev.main([paths[1], "--n_test", "14", "--seeds", "3", "--max_new_tokens", "12", "--out", str(tmp_path / "eval")])
    out = capsys.readouterr().out
    assert f"replacing {tmp_path / 'student' / 'best-eval.json'}: it held an evaluation with n 21, seeds [1, 2]" in out
    assert json.load(open(tmp_path / "student" / "best-eval.json"))["seeds"] == [3]


def test_eval_reads_a_builtin_export_offline(tmp_path, monkeypatch):
    """python eval.py OUT/hf --teacher OUT/teacher/best.pt on the export a built-in run writes: its tokenizer comes
    back as the built-in one (nothing to download), the numbers equal those of the checkpoint it was made from; a
    folder without a tokenizer stops with one line."""
    import eval as ev
    monkeypatch.chdir(tmp_path)
    enc = data.get_encoding("builtin")
    teacher, student = str(tmp_path / "teacher.pt"), str(tmp_path / "student" / "best.pt")
    minillm.save_checkpoint(teacher, eos_teacher(enc), None, 0, None, "builtin", {})
    os.makedirs(tmp_path / "student")
    minillm.save_checkpoint(student, eos_teacher(enc, 0.2), None, 0, None, "builtin", {})
    minillm.save_pretrained(minillm.load_checkpoint(student)[0], str(tmp_path / "student" / "hf"), enc.eot_token,
                            "builtin", trained_on="builtin")
    common = ["--teacher", teacher, "--n_test", "14", "--seeds", "1", "--max_new_tokens", "8", "--exposure_len", "4"]
    results = []
    for path, flags in ((student, ["--data", "builtin"]), (str(tmp_path / "student" / "hf"), [])):  # (the export
        ev.main([path, *common, *flags, "--out", str(tmp_path / "eval")])                        # records its data)
        results.append(json.load(open(tmp_path / "eval" / "results.json"))[0])
    assert results[1]["label"] == "student" and results[1]["data"] == "builtin"  # the run's folder, above hf/
    for key in ("rougeL", "valid", "rkl", "lm_loss"):
        assert results[0][key] == pytest.approx(results[1][key], abs=1e-4), key
    hf = tmp_path / "student" / "hf"  # without its tokenizer files and the name config.json records
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (hf / f).unlink()
    config = json.loads((hf / "config.json").read_text())
    del config["minillm_tokenizer"]
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="no tokenizer.json"):
        ev.main([str(hf), *common, "--out", str(tmp_path / "eval")])


def pipeline_folder(folder):
    """What `python minillm.py` leaves for eval.py's --table1, --sweep and --guard: a tiny teacher and SFT student."""
    enc = data.get_encoding("builtin")
    for name, model in (("teacher", eos_teacher(enc)), ("student-sft", tiny(vocab_size=enc.n_vocab, block_size=64))):
        os.makedirs(folder / name)
        minillm.save_checkpoint(str(folder / name / "best.pt"), model, None, 0, None, "builtin", {})
        (folder / name / "log.txt").write_text("done: 7 steps in 3s; best.pt is step 5 -> best.pt\n")


def test_table1_trains_each_row_from_the_sft_student_and_reuses_finished_runs(tmp_path, monkeypatch, capsys):
    import eval as ev
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(kernels, "USE_TRITON", False)  # the reference: the interpreter is slow (the kernel has tests)
    pipeline_folder(tmp_path / "pipe")
    small = " --max_steps 4 --eval_interval 2 --n_train 70 --n_valid 14 --n_test 14 --max_new_tokens 8 --batch_size 4"
    monkeypatch.setattr(ev, "TABLE1", {"kd": "--method kd" + small, "on-policy rkl": "--method onpolicy" + small,
                                       "minillm, alpha 0": "--method minillm --alpha 0 --rollout_size 8" + small})
    argv = ["--table1", "--pipeline_out", str(tmp_path / "pipe"), "--out", str(tmp_path / "t1"), "--n_test", "14",
            "--seeds", "1", "--max_new_tokens", "8", "--exposure_len", "4", "--train_seeds", "1", "2"]
    ev.main(argv)
    first = capsys.readouterr().out
    assert "training kd, seed 2" in first and "training minillm, alpha 0, seed 1" in first
    assert "run 1 of 6: training kd, seed 1" in first and "run 6 of 6; about " in first  # (progress, time left)
    results = json.load(open(tmp_path / "t1" / "results.json"))
    assert [r["label"] for r in results] == ["teacher", "sft", "kd", "on-policy rkl", "minillm, alpha 0"]
    assert results[0]["steps"] == [7.0, 0.0] and results[2]["steps"] == [4.0, 0.0]
    assert [r["samples"][0] for r in results] == [0.0, 0.0, 0.0, 16.0, 8.0]  # on-policy: 4 steps x 4 fresh samples
    assert "'alpha': 0.2" in open(tmp_path / "t1" / "kd-seed1" / "log.txt").read()
    assert "'alpha': 0.0" in open(tmp_path / "t1" / "minillm-alpha-0-seed2" / "log.txt").read()
    # a row is the mean over its training seeds of each run's mean over the sampling seeds, ± their std
    runs = [json.load(open(tmp_path / "t1" / f"on-policy-rkl-seed{s}" / "best-eval.json")) for s in (1, 2)]
    means = [r["rkl"][0] for r in runs]
    assert results[3]["rkl"] == [sum(means) / 2, minillm.std(means)] and results[3]["train_seeds"] == 2
    logs = [training_lines(log_of(tmp_path / "t1" / f"on-policy-rkl-seed{s}")) for s in (1, 2)]
    assert logs[0] != logs[1]  # the seeds trained differently (their best.pt may both be the SFT student)
    table = first[first.index("| model |"):].split("\n\n")[0].splitlines()  # (then: per family)
    assert len(table) == 7 and all(" ± " in line for line in table[4:])  # every distillation row with its spread
    assert os.path.getsize(tmp_path / "t1" / "validity_vs_minutes.png") > 0
    ev.main(argv + ["--rows", "kd"])  # a subset of the rows, each run reused
    assert capsys.readouterr().out.count("reusing") == 2
    with pytest.raises(SystemExit, match="not a row of Table 1"):
        ev.main(argv + ["--rows", "nope"])


def test_the_guard_study_chooses_its_target_on_validation_then_runs_the_test_set(tmp_path, monkeypatch, capsys):
    """python eval.py --guard: every row at no guard and at each target (the sweep seeds), the target with the best
    mean over the rows chosen, then the rows at that target and the sweep's one-pass row (docs/sweep.json's choice)
    with every training seed on the test set; guard.json holds each validation and each test run's own numbers."""
    import eval as ev
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(kernels, "USE_TRITON", False)
    pipeline_folder(tmp_path / "pipe")
    monkeypatch.setattr(ev, "SWEEP_BUDGET", "--max_steps 4 --eval_interval 2 --n_train 70 --n_valid 14 --n_test 14 "
                                            "--max_new_tokens 8 --lm_coef 0 --log_interval 1")
    monkeypatch.setattr(ev, "GUARD_TARGETS", ("0.001", "1"))
    monkeypatch.setattr(ev, "GUARD_ROWS", {"minillm, short": "--method minillm --rollout_size 4 --ppo_epochs 2 "
                                                             "--batch_size 4",  # (a round: 2 steps)
                                           "official, short": "--method minillm --recipe official --rollout_size 8 "
                                                              "--ppo_epochs 2 --batch_size 4"})
    monkeypatch.setattr(ev, "GUARD_ONE_PASS", ("minillm",))
    argv = ["--guard", "--pipeline_out", str(tmp_path / "pipe"), "--out", str(tmp_path / "g"), "--n_test", "14",
            "--seeds", "1", "--max_new_tokens", "8", "--exposure_len", "4", "--sweep_seeds", "1", "--train_seeds",
            "1", "2"]
    ev.main(argv)
    out = capsys.readouterr().out
    record = json.load(open(tmp_path / "g" / "guard.json"))
    means = {t: sum(ev.run_record(str(tmp_path / "g" / ev.slug(row) / f"target-{t}-seed1"))["best"]
                    for row in ev.GUARD_ROWS) for t in ev.GUARD_TARGETS}
    chosen = max(ev.GUARD_TARGETS, key=means.get)  # (a tie: the first)
    assert record["chosen"] == chosen and f"the target chosen on validation: {chosen}" in out
    assert set(record["validation"]["official, short"]) == {"target 0", "target 0.001", "target 1"}
    assert "'recipe': 'official'" in open(tmp_path / "g" / "official-short" / "target-0-seed1" / "log.txt").read()
    one_pass = json.load(open(os.path.join(HERE, "docs", "sweep.json")))["validation"]["minillm"]
    name = max((n for n in one_pass if "1 epoch," in n), key=lambda n: sum(r["best"] for r in one_pass[n].values()))
    labels = ["teacher", "sft", f"minillm, short, target {chosen}", f"official, short, target {chosen}",
              f"minillm, {name} (the sweep's choice)"]
    assert list(record["test"]) == labels and all(len(record["test"][k]) == 2 for k in labels[2:])
    assert {"valid", "rougeL", "rkl", "valid add", "minutes", "samples", "best_step"} <= set(
        record["test"][labels[2]][1])
    run = record["validation"]["minillm, short"]["target 0.001"]["1"]
    assert run == ev.run_record(str(tmp_path / "g" / "minillm-short" / "target-0.001-seed1"))
    assert 1 <= run["passes"] <= 2 and run["kl_old"] >= 0 and run["samples"] >= 8  # (the log's means; the done line)
    # the tables come back from the record alone, as the study printed them
    assert ev.guard_lines(record) in out and ev.test_lines(record["test"]).split("\n\n")[0] in out
    assert "'ppo_epochs': 1" in open(tmp_path / "g" / "minillm" / f"{ev.slug(name)}-seed2" / "log.txt").read()
    ev.main(argv)  # everything reused
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("training ")]


def test_the_sweep_chooses_on_validation_then_runs_the_test_set(tmp_path, monkeypatch, capsys):
    import eval as ev
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(kernels, "USE_TRITON", False)
    pipeline_folder(tmp_path / "pipe")
    monkeypatch.setattr(ev, "SWEEP_BUDGET", "--max_steps 2 --eval_interval 1 --n_train 70 --n_valid 14 --n_test 14 "
                                            "--max_new_tokens 8 --lm_coef 0")
    monkeypatch.setattr(ev, "SWEEP_LRS", ("1e-4", "3e-2"))
    monkeypatch.setattr(ev, "SWEEP_ROUND", 8)
    monkeypatch.setattr(ev, "SWEEP_ROUNDS", ((1, 8), (2, 4)))
    monkeypatch.setattr(ev, "SWEEP_BATCHES", (8, 4))
    monkeypatch.setattr(ev, "SWEEP", {"kd": ("--method kd", "lr 1e-4, batch 4"),
                                      "on-policy rkl": ("--method onpolicy", "lr 1e-4, 1 epoch, batch 8")})
    assert list(ev.sweep_settings("on-policy rkl")) == ["lr 1e-4, 1 epoch, batch 8", "lr 1e-4, 2 epochs, batch 4",
                                                        "lr 3e-2, 1 epoch, batch 8", "lr 3e-2, 2 epochs, batch 4"]
    # KD gets the same choice of mini-batch as the rows that roll out
    assert list(ev.sweep_settings("kd")) == ["lr 1e-4, batch 8", "lr 1e-4, batch 4", "lr 3e-2, batch 8",
                                             "lr 3e-2, batch 4"]
    assert ev.sweep_settings("kd")["lr 3e-2, batch 8"].endswith("--lr 3e-2 --target_kl 0 --batch_size 8")
    argv = ["--sweep", "--pipeline_out", str(tmp_path / "pipe"), "--out", str(tmp_path / "sw"), "--n_test", "14",
            "--seeds", "1", "--max_new_tokens", "8", "--exposure_len", "4", "--sweep_seeds", "1", "2",
            "--train_seeds", "1", "3"]
    ev.main(argv)
    out = capsys.readouterr().out
    # the choice: the setting with the best mean over the sweep seeds of each run's best validation validity
    for row, folder in (("kd", "kd"), ("on-policy rkl", "on-policy-rkl")):
        means = {name: sum(ev.run_record(str(tmp_path / "sw" / folder / f"{ev.slug(name)}-seed{s}"))["best"]
                           for s in (1, 2)) / 2 for name in ev.sweep_settings(row)}
        best = max(means, key=means.get)
        assert f"{row}: chosen on validation: {best} ({means[best]:.1f}%" in out
        assert f"| **{best}**" in open(tmp_path / "sw" / "sweep.md").read()
    on_policy = tmp_path / "sw" / "on-policy-rkl"
    assert "'ppo_epochs': 2" in open(on_policy / "lr-1e-4-2-epochs-batch-4-seed1" / "log.txt").read()
    assert "'rollout_size': 8" in open(on_policy / "lr-1e-4-2-epochs-batch-4-seed1" / "log.txt").read()
    # on-policy in rounds: 2 steps of one epoch of one mini-batch are 2 rounds of 8 responses; of 2 epochs of 2, one
    assert minillm.run_summary(str(on_policy / "lr-1e-4-1-epoch-batch-8-seed1"))[3] == 16
    assert minillm.run_summary(str(on_policy / "lr-1e-4-2-epochs-batch-4-seed1"))[3] == 8
    # the test set: the reference and the chosen setting with every training seed (seed 1's run reused)
    labels = [r["label"] for r in json.load(open(tmp_path / "sw" / "results.json"))]
    assert labels[:3] == ["teacher", "sft", "kd, lr 1e-4, batch 4 [reference" + (", selected]" if labels[2].endswith(
        "selected]") else "]")]
    assert all(os.path.isfile(on_policy / f"{ev.slug(ev.SWEEP['on-policy rkl'][1])}-seed{s}" / "best.pt")
               for s in (1, 2, 3))
    ev.main(argv)  # everything reused
    assert "training kd" not in capsys.readouterr().out
    record = json.load(open(tmp_path / "sw" / "sweep.json"))
    assert record["validation"]["kd"]["lr 3e-2, batch 4"]["2"] == ev.run_record(str(tmp_path / "sw" / "kd" /
                                                                                   "lr-3e-2-batch-4-seed2"))
    assert list(record["test"]) == labels and all(len(record["test"][k]) == 2 for k in labels[2:])
    # python eval.py --report: the same tables from the record alone, in a process with no checkpoint at hand
    report = subprocess.run([sys.executable, os.path.join(HERE, "eval.py"), "--report", "--sweep_record",
                             str(tmp_path / "sw" / "sweep.json")], capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    unmarked = lambda text: text.replace(" (reference)", "")  # (the report's process has the real SWEEP's references)
    assert unmarked(ev.sweep_lines(record["validation"])) in unmarked(report.stdout)
    assert ev.sweep_lines(record["validation"]) in out
    assert ev.test_lines(record["test"]) in report.stdout and ev.test_lines(record["test"]).split("\n\n")[0] in out
    # another folder with a record whose scores make the choice: the grid's runs are not run, the chosen and the
    # reference setting are, with seeds 1 and 3
    run = lambda best, step: {"start": 20.0, "best": best, "step": step, "end": 20.0, "end_step": 2, "pt_loss": 9.0,
                              "minutes": 0.1, "samples": 0}
    record["validation"]["kd"] = {"lr 1e-4, batch 8": {"1": run(10.0, 0), "2": run(10.0, 0)},
                                  "lr 1e-4, batch 4": {"1": run(30.0, 2), "2": run(20.0, 0)},
                                  "lr 3e-2, batch 8": {"1": run(24.0, 1), "2": run(27.0, 2)},
                                  "lr 3e-2, batch 4": {"1": run(10.0, 0), "2": run(10.0, 0)}}
    (tmp_path / "record.json").write_text(json.dumps(record))
    ev.main(argv + ["--rows", "kd", "--out", str(tmp_path / "sw2"), "--sweep_record", str(tmp_path / "record.json")])
    again = capsys.readouterr().out
    assert "kd: chosen on validation: lr 3e-2, batch 8 (25.5%; the reference lr 1e-4, batch 4: 25.0%)" in again
    assert "seed 2:" not in again and again.count("training kd") == 4
    assert [r["label"] for r in json.load(open(tmp_path / "sw2" / "results.json"))][2:] == [
        "kd, lr 1e-4, batch 4 [reference]", "kd, lr 3e-2, batch 8 [selected]"]
    assert ("| kd | **lr 3e-2, batch 8** | 24.0 (1), 27.0 (2) | **25.5** | 20.0 (2), 20.0 (2) | 9.00 | 0.1 | 0 | 20.0 |"
            in open(tmp_path / "sw2" / "sweep.md").read())
    assert json.load(open(tmp_path / "sw2" / "sweep.json"))["validation"] == {"kd": record["validation"]["kd"]}
    with pytest.raises(SystemExit, match="not a row of the sweep"):
        ev.main(argv + ["--rows", "nope"])


def test_the_method_part_of_minillm_py_fits_950_lines_and_the_readme_says_where_it_ends():
    """A first reading of minillm.py, the method from the docstring's derivation to main(), stays at most 950 lines;
    the README's reading guide names that range."""
    lines = open(os.path.join(HERE, "minillm.py")).read().splitlines()
    ruler = next(i for i, line in enumerate(lines) if line.startswith("# ====="))  # (after main(): stop here)
    end = max(i for i in range(ruler) if lines[i].strip()) + 1
    assert "def main(" in "\n".join(lines[end - 20:end]) and end <= 950
    assert f"(lines 1-{end} of {len(lines):,})" in open(os.path.join(HERE, "README.md")).read()


def test_the_tables_of_results_md_are_what_the_records_print():
    """docs/results.md's sweep, Table 1 and drift-guard tables are `python eval.py --report`'s output: recomputed from
    docs/sweep.json and docs/guard.json alone, in seconds, by a process with no checkpoint at hand."""
    t0 = time.time()
    report = subprocess.run([sys.executable, os.path.join(HERE, "eval.py"), "--report"], capture_output=True,
                            text=True, timeout=60, cwd=HERE)
    assert report.returncode == 0, report.stderr
    assert time.time() - t0 < 30
    results = open(os.path.join(HERE, "docs", "results.md")).read()
    lines = [line for line in report.stdout.splitlines() if line.startswith("| ")]
    assert len(lines) > 60 and [line for line in lines if line not in results] == []


def test_eval_on_a_local_jsonl_file(tmp_path, capsys):
    import eval as ev
    enc = data.get_encoding("builtin")
    path = str(tmp_path / "student.pt")
    minillm.save_checkpoint(path, tiny(vocab_size=enc.n_vocab, block_size=512), None, 0, None, "builtin", {})
    write_jsonl(str(tmp_path / "mine.jsonl"), dolly_rows(40))
    ev.main([path, "--data", str(tmp_path / "mine.jsonl"), "--seeds", "3", "--max_new_tokens", "8",
             "--out", str(tmp_path / "eval")])
    (result,) = json.load(open(tmp_path / "eval" / "results.json"))
    assert result["n"] == 10  # the file's test split, as training splits it
    assert "rougeL" in result and "lm_loss" in result and "valid" not in result and "ece" not in result
    assert "| student |" in capsys.readouterr().out

# -----------------------------------------------------------------------------
# transformers, the reference of the Hugging Face tests, in a process of its own
#
# Hugging Face publishes a package named `kernels`, which transformers (5.25 and later) imports; in this process that
# name is our kernels.py (which lends transformers the other package's names: tested below, as users meet it). So
# that no comparison with transformers depends on which module answers to the name, transformers runs in one child
# process for the whole session, started in a temporary folder with `python -P` (nothing of this folder on its path).
# A test sends it code and inputs (its variables); the code leaves what the test compares in `result`.

HF_WORKER = r"""
import contextlib, json, sys, traceback
import torch, transformers
shared = {"torch": torch, "transformers": transformers}
exec(sys.argv[1], shared)  # HF_MODELS
for line in sys.stdin:
    job = json.loads(line)
    scope = dict(shared, **torch.load(job["inputs"], weights_only=True))
    try:
        with contextlib.redirect_stdout(sys.stderr):
            exec(job["code"], scope)
        torch.save(scope.get("result"), job["inputs"] + ".out")
        print(json.dumps({"ok": True}), flush=True)
    except Exception:
        print(json.dumps({"ok": False, "error": traceback.format_exc()}), flush=True)
"""

HF_MODELS = r"""
def gpt2(seed=0, vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=2):
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head)).eval()

def family(name, vocab_size=101, seed=0):
    # a tiny random model of a family, with grouped-query attention and rope scaling where it has them
    torch.manual_seed(seed)
    shape = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                 initializer_range=0.3)  # (weights large enough that every part moves the logits)
    made = {
        "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}, rope_theta=500000.0, tie_word_embeddings=True)),
        "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape, rope_theta=1e6)),
        "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**shape, head_dim=16,
                                                                               tie_word_embeddings=True)),
        "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**shape, sliding_window=64)),
        "opt": lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=vocab_size, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, word_embed_proj_dim=32, dropout=0.0, init_std=0.3)),
    }[name]()
    with torch.no_grad():  # (transformers initializes biases and norms to 0 and 1: made random, so they count)
        for n, p in made.named_parameters():
            if n.endswith(("bias", "norm.weight", "layernorm.weight", "layer_norm.weight")):
                p.add_(torch.randn_like(p) * 0.5)
    return made.eval()

def greedy(model, x, n):  # transformers' greedy decoding: the n tokens after x (B, T) -> (B, n)
    return model.generate(x, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)[:, x.size(1):]
"""


@pytest.fixture(scope="session")
def hf(tmp_path_factory):
    """hf(code, **inputs): runs `code` in the transformers process with `inputs` as its variables; returns `result`."""
    folder = tmp_path_factory.mktemp("transformers")
    env = {**{k: v for k, v in USER_ENV.items() if k != "PYTHONPATH"}, "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    worker = subprocess.Popen([sys.executable, "-P", "-c", HF_WORKER, HF_MODELS], cwd=folder, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    jobs = iter(range(10 ** 6))

    def run(code, **inputs):
        path = str(folder / f"job-{next(jobs)}.pt")
        torch.save(inputs, path)
        worker.stdin.write(json.dumps({"code": textwrap.dedent(code), "inputs": path}) + "\n")
        worker.stdin.flush()
        reply = worker.stdout.readline()
        assert reply, f"the transformers process ended (exit code {worker.wait()}); its errors are above"
        reply = json.loads(reply)
        assert reply["ok"], "in the transformers process:\n" + reply["error"]
        return torch.load(path + ".out", weights_only=True)
    yield run
    worker.stdin.close()
    worker.wait(timeout=60)


def test_the_transformers_process_loads_hugging_faces_kernels_package_not_ours(hf):
    origin = hf("import importlib.util; spec = importlib.util.find_spec('kernels'); "
                "result = spec and spec.origin; import transformers.integrations.hub_kernels")
    assert origin is None or os.path.dirname(os.path.realpath(origin)) != HERE, origin


def test_transformers_reads_an_export_in_a_process_that_imported_minillm(tmp_path):
    """As users meet it: one process started from this folder imports minillm, then transformers loads an export
    (transformers >= 5.25 imports Hugging Face's `kernels` package, whose name our kernels.py holds there); the
    logits are ours, and minillm's kernel still answers to the name `kernels`."""
    ours = tiny(vocab_size=97, block_size=64, seed=3)
    minillm.save_pretrained(ours, str(tmp_path / "export"), 96)
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    script = ("import sys, torch, minillm, transformers\n"
              "hf = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
              "with torch.no_grad():\n"
              "    torch.save(hf(torch.load(sys.argv[2])).logits, sys.argv[3])\n"
              "import kernels\n"
              "assert kernels is minillm.kernels and kernels.reverse_kl is minillm.kernels.reverse_kl\n"
              "print('Hugging Face kernels:', minillm.kernels._hub)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "export"), str(tmp_path / "x.pt"),
                           str(tmp_path / "logits.pt")], cwd=HERE, env={**USER_ENV, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    with torch.no_grad():
        assert_close(torch.load(tmp_path / "logits.pt"), ours(x)[0], 1e-5, "transformers' logits beside minillm")


def test_kernels_py_lends_transformers_the_names_of_hugging_faces_package(tmp_path):
    """A stand-in for Hugging Face's `kernels` package (whose modules import it by that name, as the real one's do),
    on the path past this folder of a process where our kernels.py holds the name: `from kernels import
    CUDAProperties` finds it and the name stays ours; a package that fails to load stops with one line that names
    the clash and the fix; with no such package, a missing name is an AttributeError."""
    for name, init in (("good", "from kernels._internals.layer import CUDAProperties\n"),
                       ("broken", "raise OSError('libkernels.so: cannot open shared object file')\n")):
        (tmp_path / name / "kernels" / "_internals").mkdir(parents=True)
        (tmp_path / name / "kernels" / "__init__.py").write_text(init)
        (tmp_path / name / "kernels" / "_internals" / "__init__.py").write_text("")
        (tmp_path / name / "kernels" / "_internals" / "layer.py").write_text("class CUDAProperties:\n    pass\n")
    script = """
        import sys
        import kernels  # ours: this folder is sys.path[0]
        ours = kernels.__file__
        sys.path[:] = ['', sys.argv[1]]  # the stand-in past this folder, where site-packages would be
        from kernels import CUDAProperties
        assert CUDAProperties.__module__ == 'kernels._internals.layer' and sys.modules['kernels'] is kernels
        from kernels import reverse_kl, CUDAProperties as again
        assert again is CUDAProperties and kernels.__file__ == ours
        kernels._hub, sys.path[1] = None, sys.argv[2]
        try:
            from kernels import CUDAProperties
        except ImportError as e:
            print(e)
        assert sys.modules['kernels'] is kernels and 'kernels._internals' not in sys.modules
        kernels._hub, sys.path[:] = None, ['']
        assert not hasattr(kernels, 'CUDAProperties') and not hasattr(kernels, '__path__')
        print('done')
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script), str(tmp_path / "good"),
                           str(tmp_path / "broken")], cwd=HERE, env=USER_ENV, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    message, last = done.stdout.splitlines()
    assert last == "done" and "kernels.py (minillm's Triton kernel) answers to the name `kernels`" in message
    assert "OSError: libkernels.so" in message and "fix: `pip uninstall kernels`" in message

# -----------------------------------------------------------------------------
# Hugging Face GPT-2 checkpoints (transformers is a test-only dependency)


def test_hugging_face_gpt2_loads_with_matching_logits(tmp_path, hf):
    x = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(0))
    # model.safetensors, and the older pytorch_model.bin (read with weights_only); a GPT-2 folder of 50,257 rows
    expected = hf("""
        model = gpt2()
        for safe in (True, False):
            model.save_pretrained(f"{folder}/hf-{safe}", safe_serialization=safe)
        gpt2(vocab_size=50257, n_positions=16, n_embd=8, n_layer=1).save_pretrained(f"{folder}/gpt2-rows")
        with torch.no_grad():
            result = model(x).logits
    """, folder=str(tmp_path), x=x)
    for safe in (True, False):
        model, ckpt = minillm.load_checkpoint(str(tmp_path / f"hf-{safe}"))
        assert ckpt["tokenizer"] is None and model.config.n_layer == 2 and model.config.block_size == 64
        with torch.no_grad():
            assert_close(model.eval()(x)[0], expected, 1e-5, f"logits (safetensors {safe})")
    # a GPT-2 folder without a tokenizer is GPT-2's (tiktoken's gpt2) only with GPT-2's 50,257 rows (not 97)
    assert minillm.load_checkpoint(str(tmp_path / "gpt2-rows"))[1]["tokenizer"] == "gpt2"


def test_export_loads_in_transformers_with_the_same_logits_and_greedy_tokens(tmp_path, hf):
    ours = tiny(vocab_size=97, block_size=64, seed=3)
    minillm.save_pretrained(ours, str(tmp_path / "export"), 96)
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    logits, hf_tokens = hf("""
        model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
        with torch.no_grad():
            result = model(x).logits, greedy(model, x, 12)
    """, folder=str(tmp_path / "export"), x=x)
    with torch.no_grad():
        assert_close(logits, ours(x)[0], 1e-5, "logits after export")
    assert torch.equal(minillm.generate(ours, x.tolist(), 12, None, greedy=True), hf_tokens)
    back, _ = minillm.load_checkpoint(str(tmp_path / "export"))  # and back into ours
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values()))
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "export").iterdir())


@pytest.mark.parametrize("name", ["builtin", "builtin-bytes"])
def test_the_export_of_a_builtin_model_carries_its_tokenizer(tmp_path, name, hf):
    """save_pretrained writes the tiktoken tokenizer a model was trained with: its name in config.json (read back
    exactly) and a tokenizer.json that transformers' AutoTokenizer loads and that gives the same ids; without the
    name, tokenizer.json alone reads back as the same tokenizer by content. A folder without either is GPT-2's only
    with GPT-2's 50,257 rows."""
    enc = data.get_encoding(name)
    model = tiny(vocab_size=enc.n_vocab, block_size=256, seed=4)
    minillm.save_pretrained(model, str(tmp_path / "hf"), enc.eot_token, name)
    back, ckpt = minillm.load_checkpoint(str(tmp_path / "hf"))
    assert ckpt["tokenizer"] == name
    rows = data.make_builtin(200, 1, 1, seed=3)["train"]
    prompts = data.encode_prompts(rows[:8], enc, "builtin")[1]
    with torch.no_grad():
        assert_close(back(torch.tensor([prompts[0]]))[0], model(torch.tensor([prompts[0]]))[0], 1e-5, "logits")
    assert minillm.respond(back, enc, prompts, seed=1, max_new_tokens=16) == minillm.respond(model, enc, prompts,
                                                                                              seed=1, max_new_tokens=16)
    # transformers: the built-in encoding's ids on the built-in task's text (and on text it never saw), decoded back
    docs = data.pretrain_documents(random.Random(0))
    texts = [data.prompt_text(r, "builtin") + r["response"] for r in rows] + [next(docs) for _ in range(50)] + [
        "Ünïcödé, ÆØÅ & 東京 emoji 🙂 tabs\tand\r\nCRLF   spaces 12345 don't it's", "aaaaaaaa xqzzy Tomato Annabel."]
    hf_ids, hf_texts, eos, eot = hf("""
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        ids = [tok(text, add_special_tokens=False)["input_ids"] for text in texts]
        result = ids, [tok.decode(i) for i in ids], tok.eos_token_id, tok.convert_tokens_to_ids(eot)
    """, folder=str(tmp_path / "hf"), texts=texts, eot=data.EOT)
    for text, ids, back_text in zip(texts, hf_ids, hf_texts):
        assert ids == enc.encode_ordinary(text), text
        assert back_text == text
    assert eos == enc.eot_token and eot == enc.eot_token
    # tokenizer.json alone (a config.json without the recorded name): the same tokenizer, compared by content
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    del config["minillm_tokenizer"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    _, ckpt = minillm.load_checkpoint(str(tmp_path / "hf"))
    assert isinstance(ckpt["tokenizer"], dict) and data.same_tokenizer(ckpt["tokenizer"], name)
    assert data.get_encoding(ckpt["tokenizer"]).encode_ordinary(texts[0]) == enc.encode_ordinary(texts[0])
    run = minillm.get_args(["--method", "sft", "--init", str(tmp_path / "hf"), "--tokenizer", name])
    minillm.load_models(run, torch.device("cpu"))  # --tokenizer NAME: accepted, the same tokenizer by content
    # no tokenizer at all: not guessed (GPT-2's only for a 50,257-row vocabulary)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "hf" / f).unlink()
    assert minillm.load_checkpoint(str(tmp_path / "hf"))[1]["tokenizer"] is None


def test_an_unsupported_folder_is_one_clear_line(tmp_path):
    for name, config, expected in (
            ("bert", {"model_type": "bert"}, "model_type = 'bert': not a family"),
            ("bare", {"model_type": "llama"}, "config.json has no 'max_position_embeddings'"),
            ("opt350", {"model_type": "opt", "do_layer_norm_before": False}, "do_layer_norm_before = False"),
            ("yarn", {"model_type": "qwen2", "rope_scaling": {"type": "yarn"}}, "rope type 'yarn'"),
            ("gelu", {"model_type": "llama", "hidden_act": "gelu"}, "hidden_act = 'gelu'")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        with pytest.raises(minillm.InputError, match=re.escape(expected)):
            minillm.load_checkpoint(str(tmp_path / name))
    (tmp_path / "empty").mkdir()
    with pytest.raises(minillm.InputError, match="no readable config.json"):
        minillm.load_checkpoint(str(tmp_path / "empty"))


# -----------------------------------------------------------------------------
# The other families: Llama, Qwen2, Qwen3, Mistral and OPT checkpoints made by transformers (tiny, random)


FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "opt")


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_loads_with_the_same_logits_and_greedy_tokens_and_exports_back(tmp_path, family, hf):
    x = torch.randint(3, 101, (3, 20), generator=torch.Generator().manual_seed(0))
    expected, hf_tokens, hf_class = hf("""
        model = family(name)
        model.save_pretrained(folder)
        with torch.no_grad():
            result = model(x).logits, greedy(model, x, 10), type(model).__name__
    """, name=family, folder=str(tmp_path / "hf"), x=x)
    model, ckpt = minillm.load_checkpoint(str(tmp_path / "hf"))
    assert model.config.model_type == family and ckpt["tokenizer"] is None  # (a folder without a tokenizer)
    with torch.no_grad():
        assert_close(model(x)[0], expected, 1e-4, f"{family} logits")
    assert torch.equal(minillm.generate(model, x.tolist(), 10, None, greedy=True), hf_tokens)  # our KV cache
    minillm.save_pretrained(model, str(tmp_path / "export"), eos_id=2)
    back, back_class = hf("""
        model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            result = model(x).logits, type(model).__name__
    """, folder=str(tmp_path / "export"), x=x)
    assert back_class == hf_class
    assert_close(back, expected, 1e-5, f"{family} logits after export")


def test_left_padded_prompts_and_the_kv_cache_agree_for_rotary_and_offset_positions(tmp_path, hf):
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    for name in ("qwen3", "opt"):
        alone = hf("""
            model = family(name)
            model.save_pretrained(folder)
            with torch.no_grad():  # each row alone, unpadded, as transformers generates it
                result = [greedy(model, torch.tensor([p]), 8)[0] for p in prompts]
        """, name=name, folder=str(tmp_path / name), prompts=prompts)
        model, _ = minillm.load_checkpoint(str(tmp_path / name))
        cached = minillm.generate(model, prompts, 8, None, greedy=True)
        assert torch.equal(cached, minillm.generate(model, prompts, 8, None, greedy=True, use_cache=False))
        for i in range(len(prompts)):
            assert torch.equal(cached[i], alone[i]), (name, i)


def test_sharded_safetensors_and_bin_checkpoints_load(tmp_path, hf):
    x = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(0))
    expected, written = hf("""
        model, written = family("qwen2"), []
        for name, kw in (("sharded", dict(max_shard_size="20KB")), ("bin", dict(safe_serialization=False))):
            try:
                model.save_pretrained(f"{folder}/{name}", **kw)
                written.append(name)
            except TypeError:  # a transformers version without .bin writing
                pass
        with torch.no_grad():
            result = model(x).logits, written
    """, folder=str(tmp_path), x=x)
    assert "sharded" in written
    for name in written:
        files = os.listdir(tmp_path / name)
        model, _ = minillm.load_checkpoint(str(tmp_path / name))
        with torch.no_grad():
            assert_close(model(x)[0], expected, 1e-4, f"{name}: {files}")
    assert any(f.endswith(".index.json") for f in os.listdir(tmp_path / "sharded"))


# -----------------------------------------------------------------------------
# Tokenizers of Hugging Face checkpoints: byte-level BPE as tiktoken, SentencePiece-style through `tokenizers`

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
CORPUS = ["Hello world! It's 2026, and 12345 + 678 = 13023.\n\nTabs\tand   runs of    spaces   \n",
          "naïve café, cafe\u0301 (decomposed), 東京 and Zürich; emoji 😀🚀 <|endoftext|> after a special token.\n",
          "A list:\n- one\n- two\r\n- three <|im_end|>\n\n\n   leading spaces and trailing ones   ",
          "Write a long story about Anna the baker. Anna bakes bread at 5 am; she sells 42 loaves."] * 3


def trained_tokenizer(style):
    """A small tokenizer trained on CORPUS in a family's style, as a tokenizers.Tokenizer."""
    import tokenizers
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
    specials = ["<|endoftext|>", "<|im_end|>"]
    if style == "sentencepiece":  # LLaMA / Llama-2 / Mistral v0.1: "▁" for spaces, unknown characters as bytes
        tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False, special_tokens=["<unk>", "<s>", "</s>"] + specials
                                      + [f"<0x{i:02X}>" for i in range(256)])
    else:
        tok = tokenizers.Tokenizer(models.BPE())
        split = {"gpt2": None, "llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}[style]
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
        tok.pre_tokenizer = byte_level if split is None else pre_tokenizers.Sequence(
            [pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"), byte_level])
        tok.decoder = decoders.ByteLevel()
        if style == "qwen2":
            tok.normalizer = normalizers.NFC()
        trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def write_tokenizer(folder, style, eos="<|endoftext|>", bos=None):
    """tokenizer.json and tokenizer_config.json; bos: a token put before every text, as Llama's tokenizer.json says
    (Llama-3.1's way: a Sequence of ByteLevel and TemplateProcessing)."""
    from tokenizers import processors
    os.makedirs(folder, exist_ok=True)
    tok = trained_tokenizer(style)
    if bos:
        tok.add_special_tokens([bos])
        template = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                 special_tokens=[(bos, tok.token_to_id(bos))])
        tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), template])
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos}, f)


@pytest.mark.parametrize("style", ["gpt2", "llama3", "qwen2", "sentencepiece"])
def test_a_checkpoints_tokenizer_gives_the_hugging_face_ids_and_decodes_back(tmp_path, style, hf):
    write_tokenizer(str(tmp_path), style, eos="<|im_end|>")
    spec = data.hf_tokenizer(str(tmp_path))
    enc = data.get_encoding(spec)
    assert isinstance(enc, data.HFTokenizer) == (style == "sentencepiece")  # byte-level BPE: a tiktoken Encoding
    unseen = "Zebras 9876543 juggle\u00a0quietly\t\t→ ☃ ünïcödé\n\r\n  x"
    texts = CORPUS[:4] + [unseen]
    eos, hf_ids, hf_texts, hf_n_vocab = hf("""
        tok = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
        ids = [tok.encode(text, add_special_tokens=False) for text in texts]
        result = tok.convert_tokens_to_ids("<|im_end|>"), ids, [tok.decode(i) for i in ids], len(tok)
    """, folder=str(tmp_path), texts=texts)
    assert enc.eot_token == eos == spec["eos_token_id"]
    for text, expected, expected_text in zip(texts, hf_ids, hf_texts):
        ids = enc.encode(text, allowed_special="all")
        assert ids == expected, text
        assert enc.decode(ids) == expected_text
        if style != "sentencepiece":  # byte-level: exactly the text back (NFC-normalized where the file asks)
            assert enc.decode(ids) == (unicodedata.normalize("NFC", text) if style == "qwen2" else text)
    assert enc.n_vocab == hf_n_vocab


def test_tokenizers_are_compared_by_content_and_vocab_json_merges_txt_load(tmp_path):
    for name, style in (("a", "llama3"), ("b", "llama3"), ("c", "qwen2")):
        write_tokenizer(str(tmp_path / name), style)
    a, b, c = (data.hf_tokenizer(str(tmp_path / n)) for n in "abc")
    assert a["name"] != b["name"] and data.same_tokenizer(a, b) and not data.same_tokenizer(a, c)
    # OPT ships GPT-2-style vocab.json + merges.txt: the same tokenizer as its tokenizer.json
    tok = trained_tokenizer("gpt2")
    (tmp_path / "opt").mkdir()
    tok.model.save(str(tmp_path / "opt"))  # vocab.json, merges.txt
    with open(tmp_path / "opt" / "config.json", "w") as f:
        json.dump({"eos_token_id": 0}, f)
    write_tokenizer(str(tmp_path / "gpt2"), "gpt2")
    opt, gpt2 = data.hf_tokenizer(str(tmp_path / "opt")), data.hf_tokenizer(str(tmp_path / "gpt2"))
    assert opt["eos_token_id"] == 0 and data.same_tokenizer(opt, gpt2)
    assert data.hf_tokenizer(str(tmp_path / "nothing")) is None


def test_a_tokenizer_that_starts_texts_with_bos_puts_it_where_transformers_does(tmp_path, hf):
    """Llama-3 (<|begin_of_text|>), LLaMA / Llama-2 / Mistral (<s>) and OPT (</s>, from tokenizer_config.json's
    add_bos_token) put a BOS before every text: before each prompt and each pretraining document, never before a
    response; the same ids as transformers; and a tokenizer differs from itself without its BOS."""
    row = {"instruction": "Write a long story about Anna.", "context": "", "response": "Anna bakes bread."}
    (tmp_path / "docs.txt").write_text("First document.\n\nSecond one, longer.\n\nThird.")
    tok = trained_tokenizer("gpt2")  # OPT: GPT-2-style vocab.json + merges.txt, tokenizer_config.json's BOS
    (tmp_path / "opt").mkdir()
    tok.model.save(str(tmp_path / "opt"))
    with open(tmp_path / "opt" / "tokenizer_config.json", "w") as f:
        json.dump({"add_bos_token": True, "bos_token": "<|im_end|>", "eos_token": "<|endoftext|>"}, f)
    for style, bos in (("llama3", "<|begin_of_text|>"), ("sentencepiece", "<s>"), ("opt", "<|im_end|>")):
        folder = str(tmp_path / style)
        if style != "opt":
            write_tokenizer(folder, style, bos=bos)
        bos_id, hf_prompt = hf("""
            kind = transformers.GPT2Tokenizer if style == "opt" else transformers.PreTrainedTokenizerFast
            tok = kind.from_pretrained(folder)
            result = tok.convert_tokens_to_ids(bos), tok.encode(text)
        """, style=style, folder=folder, bos=bos, text=data.prompt_text(row, "dolly"))
        enc = data.get_encoding(data.hf_tokenizer(folder))
        assert data.bos_ids(enc) == [bos_id], style
        _, (prompt,) = data.encode_prompts([row], enc, "dolly")
        assert prompt[0] == bos_id and prompt == hf_prompt, style
        ((p, r),), _ = data.tokenize([row], enc, "dolly", 256, 256)
        assert p == prompt and bos_id not in r and r[-1] == enc.eot_token
        x, y = next(data.pretrain_batches(str(tmp_path / "docs.txt"), enc, 1, 40, 0))
        stream = torch.cat([x[0], y[0, -1:]]).tolist()
        assert stream[0] == bos_id and [stream[i + 1] for i, t in enumerate(stream[:-1]) if t == enc.eot_token] == \
            [bos_id] * stream[:-1].count(enc.eot_token), style  # after every EOS a new document's BOS
    plain, with_bos = str(tmp_path / "plain"), str(tmp_path / "sentencepiece")  # (the same vocabulary)
    write_tokenizer(plain, "sentencepiece")
    tokens = data.get_encoding(data.hf_tokenizer(plain))
    assert tokens.n_vocab == data.get_encoding(data.hf_tokenizer(with_bos)).n_vocab
    assert data.bos_ids(tokens) == [] and not data.same_tokenizer(data.hf_tokenizer(plain),
                                                                   data.hf_tokenizer(with_bos))


def llama_folder(hf, folder, vocab_size, seed, tokenizer_style="llama3", layers=2):
    """A tiny random Llama (made by transformers) with a trained tokenizer that starts every text with
    <|begin_of_text|>, embedding rows padded to vocab_size."""
    hf("""
        torch.manual_seed(seed)
        config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=256, tie_word_embeddings=False)
        transformers.LlamaForCausalLM(config).save_pretrained(folder)
    """, folder=folder, vocab_size=vocab_size, seed=seed, layers=layers)
    write_tokenizer(folder, tokenizer_style, bos="<|begin_of_text|>")


@pytest.mark.parametrize("method", ["minillm", "kd"])
def test_a_step_with_llama_shaped_models_whose_embeddings_are_padded_differently(tmp_path, method, hf):
    llama_folder(hf, str(tmp_path / "teacher"), 640, seed=0, layers=2)
    llama_folder(hf, str(tmp_path / "student"), 608, seed=1, layers=1)
    rows = [{"instruction": f"Say {i} and {i + 1}.", "context": "", "response": f"{i} and {i + 1}."}
            for i in range(80)]
    write_jsonl(str(tmp_path / "mine.jsonl"), rows)
    out = tmp_path / "run"
    args = minillm.get_args(["--method", method, "--teacher", str(tmp_path / "teacher"), "--init",
                             str(tmp_path / "student"), "--data", str(tmp_path / "mine.jsonl"), "--n_valid", "8",
                             "--n_test", "8", "--lm_coef", "0", "--max_steps", "2", "--batch_size", "4",
                             "--rollout_size", "4", "--max_new_tokens", "8", "--eval_interval", "2", "--out",
                             str(out), "--device", "cpu"])
    minillm.train(args)
    ckpt = minillm.read_checkpoint(str(out / "last.pt"))
    n_vocab = data.get_encoding(data.hf_tokenizer(str(tmp_path / "teacher"))).n_vocab  # fewer than 608 and 640
    assert ckpt["config"]["vocab_size"] == 608 and ckpt["config"]["n_vocab"] == n_vocab < 600 and ckpt["step"] == 2
    assert data.same_tokenizer(ckpt["tokenizer"], data.hf_tokenizer(str(tmp_path / "teacher")))
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    log = (out / "log.txt").read_text()
    assert "nan" not in log.lower()
    # the export: transformers loads the model and tokenizer
    x, bos_ids, logits = hf("""
        model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        x = torch.tensor([tok.encode("Say 3 and 4.")])  # (after <|begin_of_text|>, as our prompts were)
        with torch.no_grad():
            result = x, (model.config.bos_token_id, tok.convert_tokens_to_ids("<|begin_of_text|>")), model(x).logits
    """, folder=str(out / "hf"))
    model, _ = minillm.load_checkpoint(str(out / "best.pt"))
    assert x[0, 0] == bos_ids[0] == bos_ids[1]
    with torch.no_grad():
        assert_close(logits[..., :n_vocab], model(x)[0], 1e-4, "exported logits")


def test_a_large_vocabulary_chunks_the_single_step_term_unless_chunk_is_typed(tmp_path, monkeypatch):
    builtin = data.get_encoding("builtin")
    large = type("Large", (), {"n_vocab": 70000, "eot_token": builtin.eot_token})()  # a 70,000-token tokenizer
    monkeypatch.setattr(data, "get_encoding", lambda spec: large)
    for name in ("teacher", "student"):
        minillm.save_checkpoint(str(tmp_path / f"{name}.pt"), tiny(vocab_size=70016, n_layer=1), None, 0, None,
                                "builtin", {})
    for method, typed, chunk in (("minillm", [], 4096), ("onpolicy", [], 4096), ("kd", [], 0),
                                 ("minillm", ["--chunk", "0"], 0), ("minillm", ["--chunk", "512"], 512)):
        args = minillm.get_args(["--method", method, "--teacher", str(tmp_path / "teacher.pt"), "--init",
                                 str(tmp_path / "student.pt"), "--device", "cpu"] + typed)
        student, teacher, _ = minillm.load_models(args, torch.device("cpu"))
        assert args.chunk == chunk and student.config.n_vocab == teacher.config.n_vocab == 70000, (method, typed)

    # a run whose --chunk load_models set (nobody typed it) resumes: --chunk changes how the term is computed, not what
    argv = ["--method", "minillm", "--teacher", "t.pt", "--init", "s.pt", "--out", str(tmp_path / "run")]
    made = minillm.get_args(argv)
    made.chunk = 4096
    os.makedirs(tmp_path / "run")
    minillm.save_checkpoint(str(tmp_path / "run" / "step-000100.pt"), tiny(), None, 100, made, "builtin", {})
    path, ckpt, _ = minillm.find_resume(minillm.get_args(argv + ["--resume"]))
    assert path.endswith("step-000100.pt") and ckpt["step"] == 100


def test_a_student_with_another_tokenizer_is_refused_before_training(tmp_path, hf):
    llama_folder(hf, str(tmp_path / "teacher"), 640, seed=0, tokenizer_style="llama3")
    llama_folder(hf, str(tmp_path / "student"), 640, seed=1, tokenizer_style="qwen2")
    write_jsonl(str(tmp_path / "mine.jsonl"), dolly_rows(40))
    args = minillm.get_args(["--method", "kd", "--teacher", str(tmp_path / "teacher"), "--init",
                             str(tmp_path / "student"), "--data", str(tmp_path / "mine.jsonl"), "--out",
                             str(tmp_path / "run"), "--device", "cpu"])
    with pytest.raises(minillm.InputError, match="differs from the teacher's"):
        minillm.train(args)
    assert not (tmp_path / "run" / "last.pt").exists()


# -----------------------------------------------------------------------------
# The fast decode: a static cache and a compiled step (torch.compile's eager backend here: it traces and guards as
# inductor does, without compiling code, so that the test counts graphs in seconds)


def counting_backend(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


def test_fast_decode_gives_the_eager_tokens_and_compiles_once_per_model(monkeypatch):
    torch._dynamo.reset()
    graphs = []
    monkeypatch.setattr(minillm, "DECODE_BACKEND", counting_backend(graphs))
    minillm.compiled_decode.cache_clear()
    enc = data.get_encoding("builtin")
    teacher, student = eos_teacher(enc), tiny(vocab_size=enc.n_vocab, block_size=64, n_layer=1)
    rng = random.Random(0)
    for round_ in range(3):  # rounds of different prompt lengths: nothing traced again after the first
        prompts = [[rng.randrange(enc.n_vocab - 1) for _ in range(rng.randint(3, 12))] for _ in range(6)]
        eager, fast = (minillm.rollout(student, teacher, prompts, 20, enc.eot_token, 0.2,
                                       torch.Generator().manual_seed(round_), fast=f) for f in (False, True))
        n = eager["tokens"].size(1)
        assert fast["tokens"].size(1) >= n and torch.equal(fast["tokens"][:, :n], eager["tokens"])
        assert torch.equal(fast["mask"][:, :n], eager["mask"]) and not fast["mask"][:, n:].any()  # ended rows
        assert (fast["tokens"][:, n:] == enc.eot_token).all()                                       # stay padded
        for k in ("logq_old", "logp", "log_pmix"):
            assert_close(fast[k][:, :n], eager[k], 1e-5, k)
        greedy = [minillm.generate(student, prompts, 16, None, greedy=True, fast=f) for f in (False, True)]
        assert torch.equal(*greedy)
        assert len(graphs) == 2, (round_, len(graphs))  # one graph per model (student, teacher), then replayed
        kept = [minillm.STATIC_CACHES[m][k].data_ptr() for m in (student, teacher) for k in ("k", "v", "valid", "slot")]
        assert round_ == 0 or kept == addresses  # the same memory every round (which CUDA graphs are recorded on)
        addresses = kept
    with pytest.raises(minillm.InputError, match="a teacher other than the student"):
        minillm.rollout(student, student, prompts, 4, enc.eot_token, 0.2, fast=True)
    minillm.compiled_decode.cache_clear()


@torch.no_grad()
def assert_rollout_log_probs_are_the_forwards(batch, student, teacher, what, atol=0.03):
    """A rollout's log q_old(y_t) and log p(y_t) = what each model's forward over prompt + response gives for the
    sampled tokens (atol: bf16 rounding)."""
    for key, model in (("logq_old", student), ("logp", teacher)):
        logits = minillm.response_logits(model, batch).float()
        forward = logits.log_softmax(-1).gather(-1, batch["tokens"][..., None])[..., 0] * batch["mask"]
        assert_close(batch[key], forward, atol, f"{key}, {what}")


def test_rollouts_in_bf16_autocast_fast_and_eager_agree_with_the_models(monkeypatch):
    """What a GPU run does (the training's bf16 autocast around the rollouts, the teacher's weights in bf16), on the
    CPU's autocast: the caches are bf16, the fast path traces once per model, and both paths' log q_old(y_t) and
    log p(y_t) are what the two models' forwards over prompt + response give for the sampled tokens."""
    torch._dynamo.reset()
    graphs = []
    monkeypatch.setattr(minillm, "DECODE_BACKEND", counting_backend(graphs))
    minillm.compiled_decode.cache_clear()
    enc = data.get_encoding("builtin")
    torch.manual_seed(1)  # a Qwen3-shaped student: rotary, GQA, q/k norm (their outputs are fp32 under autocast)
    qwen = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=64, n_layer=2, n_head=4, n_embd=32, bias=False,
                         norm="rmsnorm", pos="rope", mlp="swiglu", n_kv_head=2, head_dim=16, qk_norm=True)).eval()
    teacher = eos_teacher(enc).to(torch.bfloat16)
    rng = random.Random(0)
    prompts = [[rng.randrange(enc.n_vocab - 1) for _ in range(rng.randint(3, 12))] for _ in range(6)]
    new_cache = minillm.new_cache
    dtypes = []
    monkeypatch.setattr(minillm, "new_cache", lambda *a: dtypes.append(
        ((c := new_cache(*a))["k"].dtype, torch.is_autocast_enabled("cpu"))) or c)
    for student in (tiny(vocab_size=enc.n_vocab, block_size=64, n_layer=1), qwen):
        fp32 = minillm.rollout(student, teacher, prompts, 20, enc.eot_token, 0.2, torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for fast in (False, True):
                b = minillm.rollout(student, teacher, prompts, 20, enc.eot_token, 0.2,
                                    torch.Generator().manual_seed(0), fast=fast)
                assert_rollout_log_probs_are_the_forwards(b, student, teacher, f"fast={fast}")
                if b["tokens"].shape == fp32["tokens"].shape and torch.equal(b["tokens"], fp32["tokens"]):
                    assert not torch.equal(b["logq_old"], fp32["logq_old"])  # (bf16 arithmetic did run)
    assert {d for d, autocast in dtypes if autocast} == {torch.bfloat16} and len(dtypes) == 11  # (the teacher's
    # static cache made once, kept for the second student's round)
    assert len(graphs) == 3  # the teacher's step traced once, each student's once
    minillm.compiled_decode.cache_clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs (the fast decode on a GPU) need a GPU")
def test_fast_decode_on_a_gpu_captures_cuda_graphs_and_gives_the_eager_tokens(device="cuda"):
    """The real fast path (inductor, CUDA graphs): in fp32 the eager path's greedy tokens and sampled rollouts, in
    bf16 autocast log-probs = the models' forwards; 4 graphs (student and teacher, fp32 and bf16), none traced
    again after the first round, no CUDA-graph skipped."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    minillm.compiled_decode.cache_clear()
    enc = data.get_encoding("builtin")
    teacher = eos_teacher(enc).to(device)
    student = tiny(vocab_size=enc.n_vocab, block_size=64, n_layer=1).to(device)
    rng = random.Random(0)
    for round_ in range(3):  # rounds of different prompt lengths
        prompts = [[rng.randrange(enc.n_vocab - 1) for _ in range(rng.randint(3, 12))] for _ in range(6)]
        greedy = [minillm.generate(student, prompts, 16, None, greedy=True, fast=f) for f in (False, True)]
        assert torch.equal(*greedy)
        for ctx in (nullcontext(), torch.autocast(device, dtype=torch.bfloat16)):
            with ctx:
                eager, fast = (minillm.rollout(student, teacher, prompts, 20, enc.eot_token, 0.2,
                                               torch.Generator(device).manual_seed(round_), fast=f) for f in (0, 1))
                n = eager["tokens"].size(1)
                if isinstance(ctx, nullcontext):  # fp32: the same tokens
                    assert torch.equal(fast["tokens"][:, :n], eager["tokens"]) and not fast["mask"][:, n:].any()
                    for k in ("logq_old", "logp", "log_pmix"):
                        assert_close(fast[k][:, :n], eager[k], 1e-4, k)
                assert_rollout_log_probs_are_the_forwards(fast, student, teacher, str(ctx))
        assert counters["stats"]["unique_graphs"] == 4, (round_, dict(counters["stats"]))
        assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    minillm.compiled_decode.cache_clear()


def test_chunked_path_equals_the_whole_logits():
    g = torch.Generator().manual_seed(0)
    h_q, h_p = torch.randn(3, 13, 16, generator=g), torch.randn(3, 13, 24, generator=g)
    w_q, w_p = torch.randn(41, 16, generator=g) / 4, torch.randn(48, 24, generator=g) / 4  # teacher padded: 48 > 41
    y = torch.randint(0, 41, (3, 13), generator=g)
    y[0, :5] = -100
    h_q, h_p, w_q, w_p, y = (t.to(DEV) for t in (h_q, h_p, w_q, w_p, y))  # the kernel's device
    results = []
    for chunk in (None, 7, 64):  # None: the whole (39, 41) logits at once
        hq, wq = h_q.clone().requires_grad_(), w_q.clone().requires_grad_()
        if chunk is None:
            out = kernels.reverse_kl(hq @ wq.t(), (h_p @ w_p.t())[..., :41], y)
        else:
            out = kernels.reverse_kl_chunked(hq, wq, h_p, w_p, y, chunk)
        (out[0].sum() + (out[1] * torch.linspace(-1, 1, 13, device=DEV)).sum()).backward()
        results.append((*out, hq.grad, wq.grad))
    for other in results[1:]:
        for name, a, b in zip(("kl", "log q", "log p", "grad h", "grad w"), other, results[0]):
            assert a.shape == b.shape
            assert_close(a, b, 1e-5, name)


def test_minillm_loss_with_chunk_equals_without():
    student, teacher = estimator_models(seed=6)
    batch = minillm.rollout(student, teacher, [[0, 1], [2], [1, 2, 0]] * 4, 6, 3, 0.2, torch.Generator().manual_seed(2))
    r = batch["logp"] - batch["logq_old"]
    w = torch.exp(batch["logq_old"] - batch["log_pmix"])
    mb = {**batch, "r": r, "A": minillm.returns(r, batch["mask"]), "w": w}
    grads = []
    for chunk in (0, 7):
        args = minillm.get_args(["--chunk", str(chunk)])
        student.zero_grad()
        loss, _ = minillm.minillm_loss(student, teacher, mb, args, torch.enable_grad())
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in student.parameters()]))
    assert_close(grads[1][0], grads[0][0], 1e-6, "loss")
    for a, b in zip(grads[1][1], grads[0][1]):
        assert_close(a, b, 1e-6, "gradient")


def official_loss(logits_q, logits_p, batch, alpha, width, gamma=0.95, reward_scaling=0.5, cliprange_reward=100.0,
                  use_whitening=True, cliprange=0.2):
    """The official code's MiniLLM loss on one mini-batch, transcribed from its source (microsoft/LMOps,
    minillm/minillm/) without minillm.py's functions: the rollout's tensors padded to `width` (its responses are
    (B, max_length - max_prompt_length)); sampler.py run_sample (rewards, w), losses.py _get_advantages_and_returns,
    _pg_loss, _reg_loss and ppo_loss, utils.py whiten (the distributed path its launcher always takes: population
    variance). logits_q: (B, n, V) with gradient, logits_p: (B, n, V)."""
    pad = lambda x: F.pad(x, (0, width - x.size(1)))
    mask = pad(batch["mask"].float())
    # sampler.py: t_rewards = log p(y_t) (reward.py: centred logits minus their logsumexp), ent_rewards = -logprobs
    # (the student at sampling time), both 0 after the end; w = q / ((1 - alpha) q + alpha p)
    logq_old, logp = pad(batch["logq_old"]) * mask, pad(batch["logp"]) * mask
    w = torch.exp(logq_old - torch.log((1 - alpha) * logq_old.exp() + alpha * logp.exp()))
    rewards = torch.clip((logp + -logq_old) / reward_scaling, -cliprange_reward, cliprange_reward)
    # losses.py _get_advantages_and_returns
    lens = torch.cumsum(mask, dim=-1)
    lens = mask - lens + lens[:, -1:None]
    lens = torch.masked_fill(lens, lens == 0, 1)
    last_rw, rw_reversed = 0, []
    for t in reversed(range(width)):
        last_rw = rewards[:, t] + gamma * last_rw
        rw_reversed.append(last_rw)
    advantages = torch.stack(rw_reversed[::-1], dim=1) / lens
    if use_whitening:  # utils.py whiten -> get_global_statistics
        mean = advantages.sum() / advantages.numel()
        var = ((advantages - mean) ** 2).sum() / advantages.numel()
        advantages = (advantages - mean) * torch.rsqrt(var + 1e-8)
    # losses.py _pg_loss, with utils.py get_log_probs
    logprobs = pad(F.log_softmax(logits_q, dim=-1).gather(-1, batch["tokens"].unsqueeze(-1)).squeeze(-1)) * mask
    n = mask.sum()
    ratio = torch.exp((logprobs - logq_old) * mask) * w
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = torch.sum(torch.max(pg_loss1, pg_loss2) * mask) / n
    # losses.py _reg_loss: cross-entropy to the teacher minus the student's entropy, no w
    probs, m = F.softmax(logits_q, dim=-1), batch["mask"].float()
    xent = -torch.sum(probs * F.log_softmax(logits_p, dim=-1), dim=-1) * m
    ent = -torch.sum(probs * F.log_softmax(logits_q, dim=-1), dim=-1) * m
    return pg_loss + torch.sum(xent - ent) / m.sum()  # ppo_loss: pg_loss + the single-step term


def paper_loss(logits_q, logits_p, batch, clip_eps=0.2):
    """Eq. 7 written out by loops: w_t KL(q_theta || p)_t + max(-A_t rho_t, -A_t clip(rho_t)) with A_t = R^Norm_{t+1}
    the mean of the rewards r_t' = log p(y_t') - log q_old(y_t') over the valid steps t' > t, rho_t = q_theta / p_mix,
    w_t = q_old / p_mix: the mean over the response tokens."""
    log_q, log_p = F.log_softmax(logits_q, -1), F.log_softmax(logits_p, -1)
    total, count = 0.0, 0
    for b in range(batch["tokens"].size(0)):
        T = int(batch["mask"][b].sum())
        r = [(batch["logp"][b, t] - batch["logq_old"][b, t]).item() for t in range(T)]
        for t in range(T):
            A = sum(r[t + 1:]) / (T - t - 1) if t < T - 1 else 0.0
            w = torch.exp(batch["logq_old"][b, t] - batch["log_pmix"][b, t])
            kl = (log_q[b, t].exp() * (log_q[b, t] - log_p[b, t])).sum()
            rho = torch.exp(log_q[b, t, batch["tokens"][b, t]] - batch["logq_old"][b, t]) * w
            total = total + w * kl + torch.max(-A * rho, -A * rho.clamp(1 - clip_eps, 1 + clip_eps))
            count += 1
    return total / count


@pytest.mark.parametrize("recipe", [["--recipe", "paper"], ["--recipe", "official"],
                                    ["--recipe", "official", "--gamma", "1", "--no_whiten", "--reward_clip", "0.5"]])
def test_recipes_take_the_gradient_of_eq7_and_of_the_official_code(recipe, monkeypatch):
    """On one scored round, several PPO steps apart from q_old: --recipe paper takes the gradient of Eq. 7, --recipe
    official that of the transcribed official loss (and its own switches, gamma, whitening and reward scaling, act)."""
    monkeypatch.setattr(kernels, "USE_TRITON", False)  # (the kernel has its own tests)
    student, teacher = estimator_models(seed=6)
    args = minillm.get_args(["--rollout_size", "16", "--batch_size", "8", "--max_new_tokens", "7"] + recipe)
    args.eos_id = 3
    mb = next(minillm.rollout_batches(student, teacher, [[0, 1], [2], [1, 2, 0], [2, 2]] * 4, args, "cpu"))
    assert len(set(mb["mask"].sum(1).tolist())) > 2  # responses of several lengths
    width = args.max_new_tokens = 10  # as if every response had ended before the limit: padding beyond the round
    with torch.no_grad():  # q_theta a step away from q_old, so that the ratio and its clipping act
        for p in student.parameters():
            p.add_(0.3 * torch.randn_like(p))
    grads = []
    for loss_fn in ("ours", "reference"):
        student.zero_grad()
        if loss_fn == "ours":
            loss, stats = minillm.minillm_loss(student, teacher, mb, args, nullcontext())
        else:
            logits_q = minillm.response_logits(student, mb)
            with torch.no_grad():
                logits_p = minillm.response_logits(teacher, mb)
            if args.recipe == "paper":
                loss = paper_loss(logits_q, logits_p, mb)
            else:
                loss = official_loss(logits_q, logits_p, mb, args.alpha, width, args.gamma, args.reward_scaling,
                                     args.reward_clip, args.whiten)
        loss.backward()
        grads.append((loss.detach(), torch.cat([p.grad.flatten() for p in student.parameters()])))
    assert stats["clip"] > 0  # some ratios q_theta / q_old outside the trust region
    assert_close(grads[0][0], grads[1][0], 1e-5, f"{recipe}: loss")
    assert grads[1][1].abs().max() > 1e-3
    assert_close(grads[0][1], grads[1][1], 1e-5, f"{recipe}: gradient")


def test_recipe_switches_default_from_the_recipe_and_a_typed_one_wins():
    paper, official = minillm.get_args([]), minillm.get_args(["--recipe", "official"])
    for name, (p, o, _) in minillm.RECIPES.items():
        assert getattr(paper, name) == p and getattr(official, name) == o, name
    mixed = minillm.get_args(["--recipe", "official", "--no_whiten", "--gamma", "1", "--w_single"])
    assert (mixed.whiten, mixed.gamma, mixed.w_single, mixed.include_t) == (False, 1.0, True, True)
    assert minillm.get_args(["--whiten"]).whiten is True
    for recipe, kd_ratio in (("paper", 0.0), ("official", 0.5)):  # L_PT: the official 0.5 LM + 0.5 soft CE
        args = minillm.get_args(["--method", "minillm", "--recipe", recipe])
        notes = minillm.set_method_defaults(args)
        assert args.kd_ratio == kd_ratio and args.lm_coef == 1
        assert any(n.startswith("--lm_coef 1 (the paper's L_PT) on the built-in text") for n in notes)  # (said once)
    for typed in (["--lm_coef", "1"], ["--data", "dolly", "--pt_data", "openwebtext"]):  # chosen: nothing to say
        notes = minillm.set_method_defaults(minillm.get_args(["--method", "minillm"] + typed))
        assert [n for n in notes if not n.startswith("the drift guard is on")] == [], notes  # (of L_PT)


def test_rollout_batches_advantages_and_the_official_whitening():
    student, teacher = estimator_models(seed=7)
    args = minillm.get_args(["--rollout_size", "12", "--batch_size", "6", "--max_new_tokens", "5"])
    args.eos_id = 3
    mb = next(minillm.rollout_batches(student, teacher, [[0, 1], [2], [1, 2, 0]] * 4, args, "cpu"))
    mask, A = mb["mask"], mb["A"]
    assert mb["tokens"].shape[0] == 6 and (A[~mask] == 0).all()
    assert torch.equal(A, minillm.returns(mb["r"], mask))
    # whitening (--recipe official): zero mean and unit population variance over the (b, 5) tensor, zeros included
    white = minillm.whiten(A, mask, 5)
    full = F.pad(A * mask, (0, 5 - A.size(1)))  # the official tensor: (b, max_new_tokens)
    expect = (full - full.mean()) / full.var(unbiased=False).sqrt()
    assert_close(white, expect[:, :A.size(1)] * mask, 1e-5, "whitened advantages")
    assert (white[~mask] == 0).all() and abs(white[mask].mean()) > 1e-3  # the valid tokens keep part of their mean


def test_rollout_minibatches_are_cut_to_their_longest_response_and_lose_nothing(monkeypatch):
    """A mini-batch keeps the round's columns up to its own longest response: its rows are the round's rows cut there,
    nothing of a response is cut, and the loss and gradient on it equal those on the uncut rows."""
    monkeypatch.setattr(kernels, "USE_TRITON", False)
    student, teacher = estimator_models(seed=7)
    with torch.no_grad():  # EOS more likely (its logit up by 1.5): responses of 1 to 12 tokens
        for m in (student, teacher):
            w = m.transformer.wte.weight
            m.transformer.ln_f.bias.add_(1.5 * w[3] / w[3].dot(w[3]))
    args = minillm.get_args(["--rollout_size", "24", "--batch_size", "4", "--max_new_tokens", "12"])
    args.eos_id = 3
    state = {}
    batches = minillm.rollout_batches(student, teacher, [[0, 1], [2], [1, 2, 0]] * 8, args, "cpu", state=state)
    cut = []
    for _ in range(6):  # the round's six mini-batches
        mb = next(batches)
        whole = state["round"]
        n = mb["mask"].size(1)
        assert n == int(mb["mask"].sum(1).max())  # cut at its longest response
        rows = [next(j for j in range(24) if torch.equal(whole["logq_old"][j, :n], mb["logq_old"][i]) and
                     torch.equal(whole["tokens"][j, :n], mb["tokens"][i])) for i in range(4)]
        assert not whole["mask"][rows, n:].any()  # nothing of a response lies past the cut
        assert all(torch.equal(mb[k], v[rows] if k.startswith("prompt") else v[rows, :n]) for k, v in whole.items())
        cut.append(n < whole["mask"].size(1))
        grads = []
        for batch in (mb, {k: v[rows] for k, v in whole.items()}):  # cut, and the round's full width
            student.zero_grad()
            loss, _ = minillm.minillm_loss(student, teacher, batch, args, nullcontext())
            loss.backward()
            grads.append((loss.detach(), torch.cat([p.grad.flatten() for p in student.parameters()])))
        assert_close(grads[0][0], grads[1][0], 1e-6, "loss")
        assert_close(grads[0][1], grads[1][1], 1e-6, "gradient")
    assert any(cut)  # (some mini-batch was narrower than its round)


def test_ppo_diagnostics_in_the_loss_stats(monkeypatch):
    """kl_old is 0 while q_theta = q_old and grows once it moves; clip is the share of tokens whose long-term
    gradient the clip takes away, where the ratio it acts on, q_theta / p_mix (w_t at q_old), is past 1 +- eps on the
    side A_t pushes it; ent is -log q_theta(y_t), adv the mean A."""
    monkeypatch.setattr(kernels, "USE_TRITON", False)
    student, teacher = estimator_models(seed=7)
    args = minillm.get_args(["--rollout_size", "12", "--batch_size", "12", "--max_new_tokens", "5"])
    args.eos_id = 3
    mb = next(minillm.rollout_batches(student, teacher, [[0, 1], [2], [1, 2, 0]] * 4, args, "cpu"))
    _, stats = minillm.minillm_loss(student, teacher, mb, args, nullcontext())
    mask = mb["mask"]
    assert abs(stats["kl_old"]) < 1e-6
    A, w = mb["A"], mb["w"]
    removed = (A > 0) & (w > 1.2) | (A < 0) & (w < 0.8)  # at q_old rho_t = w_t; eps 0.2
    assert removed[mask].any() and abs(stats["clip"] - removed[mask].float().mean()) < 1e-6
    logq = mb["logq_old"].clone().requires_grad_()  # the same tokens, by the gradient: none where the clip acts
    _, long_term = minillm.minillm_terms(logq, torch.zeros_like(A), mb["logq_old"], A, w, w, args.clip_eps)
    (long_term * mask).sum().backward()
    assert torch.equal((logq.grad == 0) & mask & (A != 0), removed & mask & (A != 0))
    assert abs(stats["ent"] - (-mb["logq_old"][mask]).mean()) < 1e-5
    assert abs(stats["adv"] - mb["A"][mask].mean()) < 1e-6
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.5 * torch.randn_like(p))
    _, moved = minillm.minillm_loss(student, teacher, mb, args, nullcontext())
    assert moved["kl_old"] > 1e-3 and moved["clip"] > 0


def test_two_processes_with_gloo_take_the_single_process_step(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**USER_ENV, "OMP_NUM_THREADS": "1"}
    cwd = os.getcwd()
    # MiniLLM under torchrun: each process rolls out half of each round; process 0 writes the checkpoints
    enc = data.get_encoding("builtin")  # models that say EOS often: the processes' rollouts end at different steps
    for name, p_eos in (("teacher", 0.6), ("student", 0.4)):
        minillm.save_checkpoint(str(tmp_path / f"{name}.pt"), eos_teacher(enc, p_eos), None, 0, None, "builtin", {})
    r = subprocess.run(torchrun + [os.path.join(HERE, "minillm.py"), "--method", "minillm", "--teacher",
                                   str(tmp_path / "teacher.pt"), "--init", str(tmp_path / "student.pt"), "--out",
                                   str(tmp_path / "mllm"), "--max_steps", "4", "--rollout_size", "8", "--batch_size",
                                   "4", "--max_new_tokens", "6", "--n_train", "350", "--n_valid", "35", "--n_test",
                                   "35", "--device", "cpu", "--save_interval", "3", "--resume"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert minillm.load_checkpoint(str(tmp_path / "mllm" / "last.pt"))[1]["step"] == 4
    # resumed under torchrun: each process takes back its own random state and rollout round (gathered on process 0)
    os.replace(tmp_path / "mllm" / "last.pt", tmp_path / "whole.pt")
    r = subprocess.run(r.args, cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0 and "step-000003.pt (step 3)" in r.stdout, r.stderr[-2000:]
    assert same_weights(tmp_path / "whole.pt", tmp_path / "mllm" / "last.pt")
    # the teacher sharded (FSDP): each process holds half of it; the run is the same run
    args = r.args[:r.args.index("--out") + 1] + [str(tmp_path / "sharded")] + r.args[r.args.index("--out") + 2:]
    r = subprocess.run(args + ["--shard_teacher"], cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    n = eos_teacher(enc).num_params()
    assert f"teacher sharded (FSDP): {n / 2e6:.3f}M of its {n / 1e6:.3f}M parameters here" in r.stdout, r.stdout
    whole, sharded = (minillm.read_checkpoint(str(p))["model"] for p in (tmp_path / "whole.pt",
                                                                          tmp_path / "sharded" / "last.pt"))
    for name in whole:
        assert_close(sharded[name], whole[name], 1e-6, f"{name}: sharded teacher vs whole")
    kd = [os.path.join(HERE, "minillm.py"), "--method", "kd", "--teacher", str(tmp_path / "teacher.pt"), "--init",
          str(tmp_path / "student.pt"), "--max_steps", "2", "--batch_size", "8", "--max_new_tokens", "6", "--n_train",
          "350", "--n_valid", "35", "--n_test", "35", "--device", "cpu", "--lr", "1e-4"]
    r = subprocess.run(torchrun + kd + ["--out", str(tmp_path / "kd-sharded"), "--shard_teacher"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    try:  # the same KD run in one process, whole teacher (in this process: a torchrun costs 5 s of start-up)
        os.chdir(tmp_path)
        minillm.train(minillm.get_args(kd[1:] + ["--out", str(tmp_path / "kd")]))
    finally:
        os.chdir(cwd)
    whole, sharded = (minillm.read_checkpoint(str(tmp_path / name / "last.pt"))["model"] for name in ("kd", "kd-sharded"))
    for name in whole:  # (DistributedDataParallel's average, each process's rows weighted: unweighted, 1.5e-4 off)
        assert_close(sharded[name], whole[name], 5e-6, f"{name}: kd, 2 processes with a sharded teacher vs 1 process")
    assert "2 processes (gloo)" in open(tmp_path / "kd-sharded" / "log.txt").read()


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real = minillm.token_loss

    def poison(bad):  # the loss of the steps in `bad` (counted from 0) is NaN
        calls = []

        def token_loss(*a, **k):
            loss, stats = real(*a, **k)
            calls.append(1)
            return (loss * float("nan") if bad(len(calls) - 1) else loss), stats
        return token_loss
    argv = ["--method", "sft", "--model", "student", "--out", str(tmp_path / "run"), "--max_steps", "6",
            "--eval_interval", "100", "--n_train", "350", "--n_valid", "35", "--n_test", "35", "--max_bad_steps", "3"]
    monkeypatch.setattr(minillm, "token_loss", poison(lambda n: n in (2, 3)))
    minillm.train(minillm.get_args(argv))
    log = open(tmp_path / "run" / "log.txt").read()
    assert "step 2: non-finite loss; optimizer step skipped (1 in a row)" in log
    assert "step 3: non-finite loss; optimizer step skipped (2 in a row)" in log and "step 4: non-finite" not in log
    model, ckpt = minillm.load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert ckpt["step"] == 6 and all(torch.isfinite(p).all() for p in model.parameters())  # no NaN in the weights
    monkeypatch.setattr(minillm, "token_loss", poison(lambda n: n >= 1))
    with pytest.raises(FloatingPointError, match="step 3: 3 steps in a row with a non-finite loss"):
        minillm.train(minillm.get_args(argv[:5] + [str(tmp_path / "run2")] + argv[6:] + ["--max_steps", "20"]))


def test_every_flag_value_is_checked_where_the_flags_are_read(tmp_path, capsys):
    """Each numeric flag out of its range, and the combinations that cannot work: one `error:` line naming the flag,
    the value and what is allowed, before anything is written; as a user runs it, within a deadline."""
    types = {a.dest: a.type for a in minillm.arg_parser()._actions}
    for name, (ok, words) in minillm.FLAG_RANGES.items():
        for bad in ("-1", "nan", "inf") if types[name] is float else ("-1",):
            with pytest.raises(SystemExit) as e:
                minillm.get_args([f"--{name}", bad, "--out", str(tmp_path / "o")])
            value = str(float(bad)) if types[name] is float else bad
            assert str(e.value) == f"error: --{name} {value}: must be {words}", (name, bad, e.value)
    for argv, message in ((["--method", "minillm", "--batch_size", "128"], "--batch_size 128: a mini-batch is part"),
                          (["--method", "kd", "--lr", "5e-5"], "--min_lr 0.0001 is above --lr 5e-05"),
                          (["--method", "kd", "--max_steps", "30", "--warmup_steps", "30"],
                           "--warmup_steps 30: must be below --max_steps 30"),
                          (["--max_prompt_length", "512"], "--max_prompt_length 512: must be below --max_length 512"),
                          (["--data", str(tmp_path / "mine.jsonl")], "mine.jsonl: no such file or folder"),
                          (["--pt_data", str(tmp_path / "t.txt")], "t.txt: no such file"),
                          (["--lr", "5e-5"], "the kd stage: --min_lr 0.0001 is above --lr 5e-05"),  # the pipeline
                          (["--data", "builtin", "--teacher_steps", "0"], "--teacher_steps 0: must be at least 1")):
        with pytest.raises(SystemExit) as e:
            minillm.main(argv + ["--out", str(tmp_path / "o")])
        assert str(e.value).startswith("error: ") and message in str(e.value), (argv, e.value)
    assert not (tmp_path / "o").exists()
    t0 = time.time()
    r = subprocess.run([sys.executable, os.path.join(HERE, "minillm.py"), "--method", "kd", "--batch_size", "0",
                        "--out", "o"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (1, "", "error: --batch_size 0: must be at least 1\n")
    assert time.time() - t0 < 30 and not (tmp_path / "o").exists()


def test_what_a_run_says_and_what_it_leaves(tmp_path, monkeypatch, capsys):
    """The settings as a short block (all of them in log.txt); the default warm-up capped by a short run's length,
    in one line; a run that stopped before its first step does not block the corrected command; a stop signal
    outside the training loop stops at once."""
    monkeypatch.chdir(tmp_path)
    argv = ["--method", "sft", "--model", "student", "--out", str(tmp_path / "run"), "--max_steps", "20",
            "--eval_interval", "10", "--log_interval", "10", "--n_train", "140", "--n_valid", "14", "--n_test", "14",
            "--batch_size", "8", "--lr", "3e-3"]
    os.makedirs(tmp_path / "run")  # a run that stopped before its first step (made with another --lr)
    (tmp_path / "run" / "log.txt").write_text("# settings: {'lr': -1}\nstep     0 | val loss 7.0 | best: step 0\n")
    minillm.save_checkpoint(str(tmp_path / "run" / "best.pt"), tiny(vocab_size=1623, block_size=64), None, 0,
                            argparse.Namespace(lr=-1.0), "builtin", {})
    minillm.train(minillm.get_args(argv))
    out, log = capsys.readouterr().out, log_of(tmp_path / "run")
    assert "its run stopped before its first step: starting again" in out and log.count("# settings:") == 1
    block = out[out.index("settings (those not at their defaults"):].splitlines()
    assert block[1].split() == ["what", "to", "run:", "--method", "sft", "--out", str(tmp_path / "run")]
    assert "# settings: {" not in out and "# settings: {'method': 'sft'" in log and "GPTConfig" not in out
    assert "--warmup_steps 100 (the default) is not shorter than --max_steps 20: warming up over 2 steps" in out
    assert minillm.read_checkpoint(str(tmp_path / "run" / "last.pt"))["args"]["warmup_steps"] == 2
    assert minillm.get_lr(2, minillm.get_args(argv + ["--warmup_steps", "2"])) == 3e-3  # the peak, reached
    with pytest.raises(minillm.Stopped, match="SIGINT outside a training loop: stopped at once"):
        minillm.on_stop_signal(signal.SIGINT, None)  # (outside train()'s loop)
    minillm.STOP_SIGNALS.clear()


def test_the_pipeline_on_your_own_data(tmp_path, monkeypatch, capsys):
    """python minillm.py --data mine.jsonl: says in one line what it needs without --teacher and --init; with them,
    runs the three distillation stages from the student (the settings chosen for the built-in task left out) and
    prints the comparison with Rouge-L."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(kernels, "USE_TRITON", False)
    enc = data.get_encoding("builtin")
    write_jsonl(str(tmp_path / "mine.jsonl"), [{"instruction": f"Name {n}.", "context": "", "response": n}
                                               for n in data.NOUNS[:120]])
    for name, seed in (("teacher", 1), ("student", 2)):  # (the Dolly template: about 100 built-in tokens)
        model = tiny(vocab_size=enc.n_vocab, block_size=256, seed=seed)
        minillm.save_checkpoint(str(tmp_path / f"{name}.pt"), model, None, 0, None, "builtin", {})
    argv = ["--data", "mine.jsonl", "--out", str(tmp_path / "out"), "--n_valid", "10", "--n_test", "10",
            "--max_steps", "2", "--eval_interval", "2", "--rollout_size", "8", "--batch_size", "8",
            "--max_new_tokens", "8", "--tokenizer", "builtin", "--lm_coef", "0"]
    with pytest.raises(SystemExit, match="the pipeline trains a teacher and an SFT student for the built-in task "
                                         "only: give --teacher CKPT and --init STUDENT_CKPT"):
        minillm.main(argv)
    assert not (tmp_path / "out").exists()
    minillm.main(argv + ["--teacher", "teacher.pt", "--init", "student.pt"])
    out = capsys.readouterr().out
    assert "kd: trained" in out and "minillm: trained" in out and "Rouge-L on the 10 test prompts" in out
    assert "each 1 draw per prompt" in out  # (the 4 draws are the built-in task's: a real model's responses cost more)
    assert "minillm: --batch_size 8 (the paper: 64), --rollout_size 8 (the paper: 256), lr 0.001: as typed " \
           "(--batch_size, --rollout_size); with the drift guard --target_kl " \
           f"{minillm.MINILLM_OPTIONS['target_kl'][1]:g}" in out  # (the built-in task's lr 3e-3 and one pass not taken)
    rows = out[out.index("KD, on-policy and MiniLLM: "):].splitlines()[3:13]
    assert [r.split()[:2] for r in rows] == [[m, d] for m in ("teacher", "sft", "kd", "on-policy", "minillm")
                                            for d in ("greedy", "sampled")]
    for stage in ("kd", "on-policy", "minillm"):  # the pipeline's lr, not the built-in task's CHOSEN
        assert minillm.read_checkpoint(str(tmp_path / "out" / stage / "last.pt"))["args"]["lr"] == 1e-3
    # before the first distillation stage: the teacher and the SFT student on validation Rouge-L, and a line where
    # the teacher is not ahead (here, one with the student's own weights cannot be)
    teacher, student = re.search(r"validation rougeL \(what chooses each distilled best.pt\): teacher ([\d.]+), SFT "
                                 r"student ([\d.]+)", out).groups()
    assert ("the teacher is not ahead of the SFT student" in out) == (float(teacher) <= float(student))
    args = minillm.get_args(argv + ["--teacher", "student.pt", "--init", "student.pt"])
    minillm.teacher_ahead(args, dict(minillm.pipeline_stages(args))["kd"])
    assert "the teacher is not ahead of the SFT student on validation rougeL: distillation can only pull the " \
           "student toward the teacher" in capsys.readouterr().out
    assert json.load(open(tmp_path / "out" / "kd" / "hf" / "config.json"))["minillm_data"] == "mine.jsonl"


def test_more_bad_inputs_are_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # (the data cache)
    enc = data.get_encoding("builtin")
    for name, tok, vocab, block in (("teacher", "builtin", enc.n_vocab, 64), ("student", "builtin", enc.n_vocab, 64),
                                    ("bytes", "builtin-bytes", 300, 64), ("small", "builtin", 1000, 64)):
        minillm.save_checkpoint(str(tmp_path / f"{name}.pt"), tiny(vocab_size=vocab, block_size=block), None, 0, None,
                                tok, {})
    base = ["--method", "minillm", "--out", str(tmp_path / "o"), "--n_train", "70", "--n_valid", "14", "--n_test", "14"]
    cases = [(["--teacher", str(tmp_path / "bytes.pt"), "--init", str(tmp_path / "student.pt")],
              "student.pt: its tokenizer (builtin) differs from the teacher's (builtin-bytes"),
             (["--teacher", str(tmp_path / "teacher.pt"), "--init", str(tmp_path / "small.pt")],
              "small.pt: 1000 embedding rows, fewer than the 1623 tokens of its tokenizer builtin"),
             (["--teacher", str(tmp_path / "teacher.pt"), "--init", str(tmp_path / "student.pt"),
               "--max_new_tokens", "64"], "--max_new_tokens 64 leaves no room for a prompt in block_size 64"),
             (["--teacher", str(tmp_path / "teacher.pt"), "--init", str(tmp_path / "student.pt"),
               "--max_new_tokens", "8", "--max_prompt_length", "3"],
              "builtin: 0 usable training prompts, fewer than --rollout_size 64"),
             (["--teacher", str(tmp_path / "teacher.pt"), "--init", str(tmp_path / "student.pt"), "--max_new_tokens",
               "8", "--pt_data", str(tmp_path / "missing.txt")], "missing.txt: no such file"),
             (["--teacher", str(tmp_path / "teacher.pt"), "--init", str(tmp_path / "student.pt"), "--max_new_tokens",
               "8", "--shard_teacher"], "--shard_teacher needs a teacher and torchrun with 2 or more processes"),
             (["--teacher", str(tmp_path / "teacher.pt"), "--init", str(tmp_path / "student.pt"), "--no_single_step",
               "--no_long_term"], "--no_single_step with --no_long_term leaves MiniLLM no loss"),
             (["--teacher", str(tmp_path / "teacher.pt"), "--init", str(tmp_path / "student.pt"), "--method",
               "onpolicy", "--divergence", "jsd", "--beta", "1.5"], "--beta 1.5: must be in [0, 1]"),
             (["--teacher", str(tmp_path / "teacher.pt"), "--init", str(tmp_path / "student.pt"), "--method",
               "onpolicy", "--divergence", "fkl", "--chunk", "64"], "not --divergence fkl"),
             (["--teacher", str(tmp_path / "teacher.pt"), "--method", "onpolicy"],
              "--method onpolicy needs --init STUDENT_CKPT")]
    if not torch.cuda.is_available():
        cases.append((["--teacher", str(tmp_path / "teacher.pt"), "--init", str(tmp_path / "student.pt"),
                       "--device", "cuda"], "--device cuda was asked for, but no CUDA GPU is available"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            minillm.main(base + argv)
        assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value), e.value
        assert not (tmp_path / "o").exists() and not (tmp_path / "builtin_data").exists()  # nothing written

# -----------------------------------------------------------------------------
# Resume after a crash, and run folders that never mix two runs


def training_lines(text, first_step=0):
    """The step lines of a log's text from the training step first_step on (a checkpoint of step N is written after
    its validation, before its training step), without the clock (seconds, tok/s, ETA)."""
    step = lambda line: int(line.split()[1].rstrip(":"))
    lines = [line for line in text.splitlines() if line.startswith("step ") and " | " in line and
             (step(line) > first_step or step(line) == first_step and "| val " not in line)]
    return [line.split(" tok/s")[0].rsplit(" | ", 1)[0] if "tok/s" in line else line.rsplit(" | ", 1)[0]
            for line in lines]


def log_of(folder):
    return open(os.path.join(folder, "log.txt")).read()


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(minillm.read_checkpoint(a)["model"].values(),
                                                 minillm.read_checkpoint(b)["model"].values()))


def test_sigterm_ctrl_c_and_sigkill_then_resume_give_the_uninterrupted_run(tmp_path):
    import time
    enc = data.get_encoding("builtin")
    student = GPT(GPTConfig(vocab_size=enc.n_vocab, block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.1))
    for name, model in (("teacher", eos_teacher(enc)), ("student", student)):  # dropout: the torch RNG matters
        minillm.save_checkpoint(str(tmp_path / f"{name}.pt"), model, None, 0, None, "builtin", {})
    argv = [sys.executable, os.path.join(HERE, "minillm.py"), "--method", "minillm", "--teacher",
            str(tmp_path / "teacher.pt"), "--init", str(tmp_path / "student.pt"), "--max_steps", "40",
            "--eval_interval", "10", "--save_interval", "5", "--log_interval", "1", "--rollout_size", "8",
            "--batch_size", "4", "--ppo_epochs", "3", "--max_new_tokens", "8", "--n_train", "70", "--n_valid", "14",
            "--n_test", "14", "--lm_coef", "1", "--pt_length", "16", "--warmup_steps", "1", "--lr", "1e-2",
            "--device", "cpu"]  # MiniLLM with L_PT: the rollout round, the text stream and four RNGs to resume
    r = subprocess.run(argv + ["--out", str(tmp_path / "whole")], cwd=tmp_path, capture_output=True, text=True,
                       timeout=240, env=USER_ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "stopped"

    def stop_when(checkpoint, sig, *extra):
        """Starts the run (with extra flags) and sends it sig once `checkpoint` exists; returns its stderr."""
        proc = subprocess.Popen(argv + ["--out", str(out), *extra], cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=USER_ENV)
        deadline = time.time() + 200
        while not (out / checkpoint).exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=200)
        assert proc.returncode in (128 + sig, -signal.SIGKILL), (proc.returncode, err[-2000:])
        assert not (out / "last.pt").exists(), "the run ended before the signal"
        assert "Traceback" not in err, err[-2000:]
        return err
    # SIGTERM (a scheduler's notice): a checkpoint at the next step, then exit 143 with one line
    err = stop_when("step-000010.pt", signal.SIGTERM)
    stopped_at = int(err.split("SIGTERM at step ")[1].split(":")[0])
    assert err.strip().splitlines()[-1].startswith("stopped: SIGTERM at step") and stopped_at >= 10
    assert (out / f"step-{stopped_at:06d}.pt").exists()
    # Ctrl-C (SIGINT) in the resumed run: the same, exit 130
    err = stop_when(f"step-{stopped_at // 5 * 5 + 5:06d}.pt", signal.SIGINT, "--resume")  # (the next save)
    interrupted_at = int(err.split("SIGINT at step ")[1].split(":")[0])
    assert err.strip().splitlines()[-1] == (f"stopped: SIGINT at step {interrupted_at}: {out}/step-"
                                            f"{interrupted_at:06d}.pt written; --resume goes on from it")
    assert interrupted_at < 25
    stop_when("step-000025.pt", signal.SIGKILL, "--resume")  # then SIGKILL in the middle of the resumed run
    r = subprocess.run(argv + ["--out", str(out), "--resume"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=240, env=USER_ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    step = int(r.stdout.split("(step ")[1].split(")")[0])  # "resuming from .../step-0000N.pt (step N)"
    assert step >= 25
    # each resumed part of the log: the lines of the uninterrupted run from its step on (the killed part stops
    # somewhere after step 25: a prefix)
    runs = log_of(out).split("resuming from")
    assert len(runs) == 4 and f"step-{stopped_at:06d}.pt (step {stopped_at})" in runs[1]
    for text, at, complete in ((runs[0], 0, False), (runs[1], stopped_at, False), (runs[2], interrupted_at, False),
                               (runs[3], step, True)):
        lines, whole = training_lines(text, at), training_lines(log_of(tmp_path / "whole"), at)
        assert lines == whole if complete else (len(lines) >= 3 and lines == whole[:len(lines)])
    assert same_weights(tmp_path / "whole" / "last.pt", out / "last.pt")
    assert same_weights(tmp_path / "whole" / "best.pt", out / "best.pt")


def test_crash_then_resume_falls_back_past_a_damaged_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--method", "sft", "--model", "student", "--dropout", "0.1", "--max_steps", "12", "--eval_interval", "4",
            "--log_interval", "1", "--n_train", "350", "--n_valid", "35", "--n_test", "35", "--batch_size", "8",
            "--lm_coef", "1", "--pt_length", "16", "--warmup_steps", "1",
            "--device", "cpu"]  # (the batches and the L_PT stream; bit-exact on the CPU)
    minillm.train(minillm.get_args(argv + ["--out", str(tmp_path / "whole"), "--keep", "1"]))
    assert sorted(p.name for p in (tmp_path / "whole").glob("*.pt")) == ["best.pt", "last.pt", "step-000008.pt"]
    real = minillm.get_lr

    def crash(step, args, elapsed):
        if step == 10:
            raise RuntimeError("the machine went away")
        return real(step, args, elapsed)
    monkeypatch.setattr(minillm, "get_lr", crash)
    with pytest.raises(RuntimeError):
        minillm.train(minillm.get_args(argv + ["--out", str(tmp_path / "crashed")]))
    monkeypatch.setattr(minillm, "get_lr", real)
    newest = tmp_path / "crashed" / "step-000008.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    with pytest.raises(minillm.InputError, match="step-000008.pt: not a loadable checkpoint"):
        minillm.read_checkpoint(str(newest))
    minillm.train(minillm.get_args(argv + ["--out", str(tmp_path / "crashed"), "--resume"]))
    log = open(tmp_path / "crashed" / "log.txt").read()
    assert f"warning: {newest}: not a loadable checkpoint" in log and "step-000004.pt (step 4)" in log
    resumed = log_of(tmp_path / "crashed").split("resuming from")[1]
    assert training_lines(resumed, 4) == training_lines(log_of(tmp_path / "whole"), 4)
    assert same_weights(tmp_path / "whole" / "last.pt", tmp_path / "crashed" / "last.pt")
    newest.write_bytes(b"")  # every checkpoint damaged: one line, no fresh start over the run
    (tmp_path / "crashed" / "step-000004.pt").write_bytes(b"junk")
    (tmp_path / "crashed" / "last.pt").unlink()
    (tmp_path / "crashed" / "best.pt").write_bytes(b"junk")
    with pytest.raises(SystemExit, match="no loadable checkpoint to resume from"):
        minillm.main(argv + ["--out", str(tmp_path / "crashed"), "--resume"])


def test_sigterm_during_a_validation_stops_it_and_resume_validates_that_step_again(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(kernels, "USE_TRITON", False)
    enc = data.get_encoding("builtin")
    for name, model in (("teacher", eos_teacher(enc)), ("student", tiny(vocab_size=enc.n_vocab, block_size=64))):
        minillm.save_checkpoint(str(tmp_path / f"{name}.pt"), model, None, 0, None, "builtin", {})
    argv = ["--method", "kd", "--teacher", str(tmp_path / "teacher.pt"), "--init", str(tmp_path / "student.pt"),
            "--max_steps", "6", "--eval_interval", "3", "--log_interval", "1", "--batch_size", "4",
            "--max_new_tokens", "8", "--n_train", "70", "--n_valid", "140", "--n_test", "14", "--warmup_steps", "1",
            "--device", "cpu"]
    minillm.train(minillm.get_args(argv + ["--out", str(tmp_path / "whole")]))
    real, calls = minillm.respond, []

    def sigterm_in_the_middle(model, enc, prompts, *args, **kwargs):  # step 3's validation, after its first batch
        calls.append(1)
        if len(calls) == 2:
            kwargs["progress"] = lambda n: minillm.STOP_SIGNALS.append(signal.SIGTERM)
        return real(model, enc, prompts, *args, **kwargs)
    monkeypatch.setattr(minillm, "respond", sigterm_in_the_middle)
    with pytest.raises(minillm.Stopped, match="SIGTERM at step 3"):
        minillm.train(minillm.get_args(argv + ["--out", str(tmp_path / "cut")]))
    monkeypatch.setattr(minillm, "respond", real)
    minillm.STOP_SIGNALS.clear()
    log = log_of(tmp_path / "cut")
    assert "step     3 | val" not in log and os.path.isfile(tmp_path / "cut" / "step-000003.pt")
    minillm.train(minillm.get_args(argv + ["--out", str(tmp_path / "cut"), "--resume"]))
    resumed = log_of(tmp_path / "cut").split("resuming from")[1]
    assert "step     3 | val" in resumed  # validated again, and the rest is the uninterrupted run
    assert training_lines(resumed, 3) == training_lines(log_of(tmp_path / "whole"), 3)
    assert same_weights(tmp_path / "whole" / "last.pt", tmp_path / "cut" / "last.pt")
    assert same_weights(tmp_path / "whole" / "best.pt", tmp_path / "cut" / "best.pt")


def test_max_minutes_ends_the_learning_rate_schedule_with_the_run():
    args = minillm.get_args(["--lr", "1e-2", "--min_lr", "1e-3", "--max_steps", "1000", "--warmup_steps", "10"])
    assert minillm.get_lr(505, args, elapsed=1e9) == pytest.approx(5.5e-3)  # no clock: by steps alone
    args.max_minutes = 2
    assert minillm.get_lr(100, args, elapsed=60) == pytest.approx(5.5e-3)  # half the time: half-way down
    assert minillm.get_lr(100, args, elapsed=120) == pytest.approx(1e-3)  # time is up: the schedule has ended
    assert minillm.get_lr(900, args, elapsed=1) == minillm.get_lr(900, argparse.Namespace(
        **{**vars(args), "max_minutes": 0}))  # the steps run out first: by steps


def test_other_data_needs_its_own_pt_data_and_selects_by_validation_rouge_l(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(kernels, "USE_TRITON", False)
    enc = data.get_encoding("builtin")
    for name, seed in (("teacher", 5), ("student", 0)):  # (the Dolly template: prompts of about 150 tokens here)
        minillm.save_checkpoint(str(tmp_path / f"{name}.pt"), tiny(vocab_size=enc.n_vocab, block_size=256, seed=seed),
                                None, 0, None, "builtin", {})
    write_jsonl(str(tmp_path / "mine.jsonl"), dolly_rows(200))
    given = ["--teacher", str(tmp_path / "teacher.pt"), "--init", str(tmp_path / "student.pt"), "--data",
             str(tmp_path / "mine.jsonl"), "--out", str(tmp_path / "o"), "--n_valid", "20", "--n_test", "10"]
    with pytest.raises(SystemExit) as e:  # minillm (L_PT on) on your own data
        minillm.main(given + ["--method", "minillm"])
    assert str(e.value) == ("error: --data mine.jsonl: L_PT (--lm_coef 1) needs its text: --pt_data openwebtext | a "
                            ".txt/.jsonl file (the built-in text only fits --data builtin), or --lm_coef 0 to train "
                            "without it").replace("mine.jsonl", str(tmp_path / "mine.jsonl"))
    assert not (tmp_path / "o").exists()
    real, calls = data.rouge_l, []

    def scripted(response, references):  # the real score, plus 10, 30, 20 points at the validations of steps 0, 2, 4
        calls.append(1)
        return real(response, references) + (10, 30, 20)[(len(calls) - 1) // 20]
    monkeypatch.setattr(data, "rouge_l", scripted)
    minillm.main(given + ["--method", "kd", "--max_steps", "4", "--eval_interval", "2", "--batch_size", "4",
                          "--max_new_tokens", "8", "--warmup_steps", "1"])
    log = log_of(tmp_path / "o")
    val = [line for line in log.splitlines() if "val rougeL" in line]
    losses = [float(line.split("val loss ")[1].split()[0]) for line in val]
    assert len(calls) == 3 * 20 and losses[2] < losses[1]  # 20 validation prompts, steps 0, 2, 4
    best = minillm.read_checkpoint(str(tmp_path / "o" / "best.pt"))
    assert best["step"] == 2 and best["metrics"]["rougeL"] >= 30  # chosen by Rouge-L, not by the loss


def test_a_folder_holding_a_run_is_refused_unless_resume_or_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    argv = ["--method", "sft", "--model", "student", "--max_steps", "4", "--eval_interval", "2", "--n_train", "350",
            "--n_valid", "35", "--n_test", "35", "--batch_size", "8", "--out", str(out)]
    bad = tmp_path / "bad.jsonl"
    write_jsonl(str(bad), dolly_rows(5) + ["{oops"])
    with pytest.raises(SystemExit, match="bad.jsonl:6: not valid JSON"):
        minillm.main(argv + ["--data", str(bad), "--tokenizer", "builtin"])
    assert not out.exists()  # bad input: nothing written
    minillm.main(argv)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for extra, message in (([], f"{out}: holds a run already (best.pt, curves.jsonl, hf, last.pt): --resume "
                                "continues it, --overwrite replaces it"),
                           (["--resume", "--lr", "2e-3"], f"{out}: holds a run made with --lr 0.001, not 0.002: "
                                                          "--overwrite replaces it"),
                           (["--overwrite", "--data", str(bad), "--tokenizer", "builtin"], "bad.jsonl:6: not valid")):
        with pytest.raises(SystemExit) as e:
            minillm.main(argv + extra)
        assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value)
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # the run is untouched
    capsys.readouterr()
    minillm.main(argv + ["--resume", "--device", "cpu"])  # finished: reused, nothing trained or written
    assert capsys.readouterr().out.strip() == f"{out} has finished (4 steps): reusing {out / 'best.pt'}"
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    (out / "step-000099.pt").write_bytes(b"an old checkpoint")
    minillm.main(argv + ["--overwrite", "--max_steps", "2"])  # replaced: a new run in the same folder
    log = open(out / "log.txt").read()
    assert log.count("# settings") == 1 and "done: 2 steps" in log and not (out / "step-000099.pt").exists()


def test_no_nan_from_empty_responses_masked_batches_and_extreme_logits():
    enc = data.get_encoding("builtin")
    teacher, student = eos_teacher(enc, p_eos=1 - 1e-7), eos_teacher(enc, p_eos=1 - 1e-7)  # EOS first: empty answers
    student.train()
    args = minillm.get_args(["--rollout_size", "4", "--batch_size", "4", "--max_new_tokens", "6", "--lm_coef", "0"])
    args.eos_id = enc.eot_token
    prompts = [enc.encode_ordinary(data.prompt_text(r, "builtin")) for r in data.make_builtin(8, 1, 1)["train"][:8]]
    for whiten in (False, True):
        args.whiten = whiten
        mb = next(minillm.rollout_batches(student, teacher, prompts, args, torch.device("cpu")))
        assert (mb["mask"].sum(1) == 1).all() and (mb["tokens"][:, 0] == enc.eot_token).all()  # EOS, nothing else
        masked = {**mb, "mask": torch.zeros_like(mb["mask"])}
        for name, batch in (("empty responses", mb), ("every token masked", masked)):
            student.zero_grad()
            loss, stats = minillm.minillm_loss(student, teacher, batch, args, nullcontext())
            loss.backward()
            assert torch.isfinite(loss) and all(math.isfinite(float(v)) for v in stats.values()), name
            assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None), name
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 97, generator=g) * 1e4, torch.randn(6, 97, generator=g) * 1e4  # extreme logits
    y = torch.tensor([3, -100, 5, 7, 0, 96])
    for use in (True, False):
        kernels.USE_TRITON = use
        try:
            s_k = s.clone().requires_grad_()
            kl, lq, lp = kernels.reverse_kl(s_k, t, y)
            (kl + lq).sum().backward()
            assert all(torch.isfinite(v).all() for v in (kl, lq, lp, s_k.grad)), f"triton {use}"
        finally:
            kernels.USE_TRITON = None


def test_validation_loss_on_response_tokens_in_chunks_equals_the_whole_logits():
    from contextlib import nullcontext
    enc = data.get_encoding("builtin")
    pairs, _ = data.tokenize(data.make_builtin(20, 1, 1)["train"], enc, "builtin", 64, 64)
    model = tiny(vocab_size=enc.n_vocab, block_size=64)
    x, y = data.collate(pairs, pad_id=0)
    whole = F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten(), ignore_index=-100).item()
    for chunk in (7, 8192):  # chunks that split the batch's response tokens, and one chunk for all
        got = minillm.validation_loss(model, pairs, 6, "cpu", nullcontext(), chunk=chunk)
        assert abs(got - whole) < 1e-5, (chunk, got, whole)
