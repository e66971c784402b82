"""
Data for MiniLLM: the built-in instruction task, its tokenizer, real-data loaders and batching.

    python data.py                       # writes builtin_data/builtin-*/{train,valid,test}.jsonl, prints stats

Follows the data setup of MiniLLM (Gu et al., ICLR 2024), section 4.1 and appendix C: instruction data in the
databricks-dolly-15k schema (instruction, context, response, category), prompt + response + EOS with the prompt
tokens masked out of the loss, prompts over max_prompt_length dropped, and a plain-text pretraining stream for
L_PT packed into fixed-length chunks.

The built-in task ("builtin") is a small world made offline in seconds, deterministic from a seed: 240 nouns in 12
categories, 40 antonym pairs, 12 trades with 8 actions each. Seven families, each with an exact `is_valid`:

    family   kind          example instruction                        prompts repeat across splits?
    add      one answer    What is 7 plus 12?                         yes: 256 facts to memorize
    antonym  one answer    Give the opposite of each word: hot up wet. no (3-6 of 80 words)
    reverse  one answer    Reverse the letters k d s a.               no (random letters)
    yesno    one answer    Is a tiger a fruit?                        yes: 240 facts (see below)
    list     open-ended    Name 4 birds.                              yes: 84 prompts, countless answers
    story    open-ended    Write a long story about Anna the baker.   no (480 prompts, hash-split)
    encode   open-ended    Encode the letters k d s a.                no (random letters)
                           mixture of styles: "Copy: k d s a." | "Reverse: a s d k." |
                           "Shift: l e t b." | "Reverse shift: b t e l." (one picked at random per example)

Splits are disjoint by prompt where that still asks something training taught (antonym, reverse, story, encode:
a stable hash of the instruction picks the split). Facts are different: a held-out yes/no prompt would ask about a
fact that training never states in that form ("Is a heron a bird?" is the only yes-question about herons), so add
and yesno repeat prompts across splits, as facts do in real data, and so does list, whose 84 prompts each have
thousands of valid answers. Training lists are written alphabetically and stories in the trade's order of the day
(any order is valid): with random orders the teacher kept repeating items (measured: 20% valid lists, greedy).

`encode` is the family where reverse KL measurably beat forward KL with an under-capacity student (a prototype
measured before this task was built: a 1-layer, 16-dim student, four minutes each from its SFT start, sampled
validity 5.5-6.2% after SFT, 3.5-5.2% after KD, 9.8-12.0% after a plain MiniLLM loop, two seeds): forward KL
spreads the student over four styles it cannot all finish, reverse KL lets it commit to the ones it can. Responses run from 3 words (reverse) to 54 (long stories).

Tokenizer. GPT-2 checkpoints use tiktoken's `gpt2` encoding. The built-in task uses its own tiktoken Encoding
built here with no download: the 256 byte values, every word of the world as one token (with and without a
leading space), and <|endoftext|>. Digits and single letters are separate tokens, so arithmetic is digit by digit
and a reversed string is one token per letter; anything outside the world falls back to bytes. Word-level
sequences are about a quarter as long as byte-level ones, and the teacher trains on several times more examples per
second (`python eval.py --bench tokenizers`; the measurement is in the README).
"""
import argparse
import functools
import hashlib
import json
import os
import random
import re
import time
import unicodedata
import zlib

import numpy as np
import torch

# -----------------------------------------------------------------------------
# The built-in world

CATEGORIES = {  # name: (singular with article, plural, nouns)
    "animal": ("an animal", "animals", "cat dog horse cow pig sheep goat tiger lion bear wolf fox rabbit mouse deer "
                                       "zebra camel monkey elephant giraffe"),
    "fruit": ("a fruit", "fruits", "apple pear plum peach cherry grape lemon lime banana mango melon kiwi apricot "
                                   "fig date papaya coconut berry guava quince"),
    "vegetable": ("a vegetable", "vegetables", "carrot potato onion garlic pepper tomato cabbage lettuce turnip "
                                               "radish pea bean leek celery spinach pumpkin cucumber beet corn kale"),
    "tool": ("a tool", "tools", "hammer saw drill wrench chisel shovel rake axe knife screwdriver trowel clamp crowbar "
                                "mallet spade hoe sickle awl vise pliers"),
    "vehicle": ("a vehicle", "vehicles", "car bus truck bicycle train tram boat ship plane van taxi tractor scooter "
                                         "motorbike canoe yacht jeep wagon sled rocket"),
    "instrument": ("an instrument", "instruments", "piano guitar violin drum flute trumpet harp cello banjo organ oboe "
                                                   "clarinet tuba trombone saxophone bell lute lyre harmonica accordion"),
    "furniture": ("a piece of furniture", "pieces of furniture", "chair table sofa bed desk shelf stool bench cabinet "
                                                                 "dresser couch wardrobe cupboard armchair crib hammock "
                                                                 "ottoman bookcase mirror lamp"),
    "flower": ("a flower", "flowers", "rose tulip daisy lily orchid poppy violet iris lotus peony daffodil sunflower "
                                      "dahlia jasmine lilac marigold carnation magnolia aster begonia"),
    "bird": ("a bird", "birds", "eagle owl crow robin sparrow parrot pigeon swan duck goose hawk falcon raven penguin "
                                "ostrich heron stork gull finch wren"),
    "clothing": ("a piece of clothing", "pieces of clothing", "shirt coat dress skirt jacket scarf hat glove sock shoe "
                                                              "boot sweater vest cap belt tie sandal blouse cloak hood"),
    "tree": ("a tree", "trees", "oak pine maple birch elm willow cedar ash beech spruce fir poplar palm cypress alder "
                                "larch yew hazel sycamore chestnut"),
    "metal": ("a metal", "metals", "iron copper gold silver tin lead zinc nickel steel bronze brass platinum cobalt "
                                   "chrome titanium mercury aluminum tungsten pewter uranium"),
}
NOUN_CATEGORY = {n: c for c, (_, _, nouns) in CATEGORIES.items() for n in nouns.split()}
assert len(NOUN_CATEGORY) == 240, "every noun belongs to exactly one category"
NOUNS = sorted(NOUN_CATEGORY)

ANTONYM_PAIRS = ("hot cold, big small, fast slow, happy sad, light dark, up down, young old, open closed, rich poor, "
                 "early late, strong weak, loud quiet, hard soft, wet dry, full empty, clean dirty, thick thin, "
                 "high low, near far, first last, good bad, true false, inside outside, above below, push pull, "
                 "win lose, buy sell, give take, begin end, day night, black white, sweet sour, sharp dull, "
                 "deep shallow, wide narrow, long short, laugh cry, love hate, north south, east west")
ANTONYM = {}
for pair in ANTONYM_PAIRS.split(", "):
    a, b = pair.split()
    ANTONYM[a], ANTONYM[b] = b, a
assert len(ANTONYM) == 80, "every antonym word appears in exactly one pair"

TRADES = {  # each hero's story uses only their own trade's actions, in this (the working day's) order
    "baker": "opened the shop|mixed the dough|lit the big oven|baked fresh bread|iced a cake|sold sweet cakes|"
             "counted the coins|swept the floor",
    "farmer": "fed the pigs|milked the cows|fixed the fence|drove the tractor|planted new seeds|picked ripe corn|"
              "sold some eggs|locked the barn",
    "sailor": "checked the ropes|raised the sail|steered the ship|cast a net|tied a strong knot|scrubbed the deck|"
              "watched the waves|lowered the sail",
    "doctor": "washed her hands|read a chart|checked a sick child|listened to a heart|gave a shot|wrote a note|"
              "called a nurse|closed the office",
    "painter": "bought a canvas|mixed some paint|drew a bird|painted a wall|hung a picture|sold a painting|"
               "cleaned the brushes|closed the studio",
    "teacher": "rang the bell|planned a lesson|wrote on the board|read a book aloud|helped a pupil|gave a test|"
               "graded the tests|locked the school",
    "miner": "lit a lamp|climbed a ladder|dug a tunnel|broke a rock|found some gold|pushed a cart|"
             "washed the gold|hung up the helmet",
    "cook": "set the table|chopped an onion|boiled the soup|fried an egg|tasted the sauce|served the guests|"
            "washed the pans|turned off the stove",
    "pilot": "read the map|checked the wings|talked to the tower|flew the plane|fixed a radio|landed the plane|"
             "wrote a report|parked the plane",
    "gardener": "watered the roses|pulled the weeds|cut the grass|planted a tree|picked a flower|raked the leaves|"
                "fed the birds|closed the gate",
    "builder": "read the plans|carried the planks|mixed the cement|laid the bricks|built a wall|fixed the roof|"
               "painted the door|cleaned the tools",
    "fisher": "baited a hook|rowed the boat|cast a line|caught a fish|mended a net|cleaned the catch|"
              "sold the fish|tied up the boat",
}
TRADE_ACTIONS = {t: a.split("|") for t, a in TRADES.items()}
HEROES = {"Tom": "he", "Anna": "she", "Ben": "he", "Lucy": "she", "Max": "he", "Mia": "she", "Sam": "he",
          "Lily": "she", "Jack": "he", "Emma": "she", "Leo": "he", "Zoe": "she", "Noah": "he", "Ella": "she",
          "Finn": "he", "Ruby": "she", "Owen": "he", "Ivy": "she", "Hugo": "he", "Nora": "she"}
WORKPLACE = {"baker": "bakery", "farmer": "farm", "sailor": "harbor", "doctor": "hospital", "painter": "studio",
             "teacher": "school", "miner": "mine", "cook": "kitchen", "pilot": "airport", "gardener": "park",
             "builder": "building site", "fisher": "lake"}
STORY_LENGTH = {"short": 3, "long": 6}  # number of actions in the story
CONNECTORS = ["First", "Then", "Next", "After that", "Later", "Finally"]  # by position; short: First, Then, Finally

LETTERS = "abcdefghijklmnopqrstuvwxyz"
STYLES = ["Copy", "Reverse", "Shift", "Reverse shift"]  # the mixture-of-styles family `encode`

FAMILIES = ["add", "antonym", "reverse", "yesno", "list", "story", "encode"]
SINGLE_ANSWER = {"add", "antonym", "reverse", "yesno"}  # exact match is meaningful for these
REPEATING = {"add", "yesno", "list"}  # facts to memorize or few prompts: repeat across splits, as in real data


def article(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def shift(letters):
    return [LETTERS[(LETTERS.index(c) + 1) % 26] for c in letters]


def encode_styles(letters):
    """The four valid answers of `encode`, in STYLES order."""
    return [letters, letters[::-1], shift(letters), shift(letters)[::-1]]

# -----------------------------------------------------------------------------
# Generating examples (one function per family, each returns instruction and one valid response)


def make_example(family, rng):
    if family == "add":
        a, b = rng.randrange(16), rng.randrange(16)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if family == "antonym":
        ws = rng.sample(sorted(ANTONYM), rng.randint(3, 6))
        return f"Give the opposite of each word: {' '.join(ws)}.", f"{' '.join(ANTONYM[w] for w in ws)}."
    if family == "reverse":
        s = [rng.choice(LETTERS) for _ in range(rng.randint(3, 7))]
        return f"Reverse the letters {' '.join(s)}.", f"{' '.join(s[::-1])}."
    if family == "yesno":
        noun = rng.choice(NOUNS)
        truth = NOUN_CATEGORY[noun]
        cat = truth if rng.random() < 0.5 else rng.choice(sorted(set(CATEGORIES) - {truth}))
        q = f"Is {article(noun)} {CATEGORIES[cat][0]}?"
        if cat == truth:
            return q, f"Yes, {article(noun)} is {CATEGORIES[cat][0]}."
        return q, f"No, {article(noun)} is {CATEGORIES[truth][0]}."
    if family == "list":
        cat, k = rng.choice(sorted(CATEGORIES)), rng.randint(2, 8)
        items = sorted(rng.sample(CATEGORIES[cat][2].split(), k))  # written alphabetically; any order is valid
        return f"Name {k} {CATEGORIES[cat][1]}.", ", ".join(items) + "."
    if family == "story":
        name, trade, length = rng.choice(sorted(HEROES)), rng.choice(sorted(TRADES)), rng.choice(["short", "long"])
        chosen = set(rng.sample(TRADE_ACTIONS[trade], STORY_LENGTH[length]))
        actions = [a for a in TRADE_ACTIONS[trade] if a in chosen]  # written in the day's order; any order is valid
        return f"Write a {length} story about {name} the {trade}.", story(name, trade, actions)
    if family == "encode":
        s = [rng.choice(LETTERS) for _ in range(rng.randint(4, 6))]
        style = rng.randrange(4)
        return f"Encode the letters {' '.join(s)}.", f"{STYLES[style]}: {' '.join(encode_styles(s)[style])}."
    raise ValueError(f"unknown family {family!r}")


def story(name, trade, actions):
    pronoun = HEROES[name]
    connectors = CONNECTORS if len(actions) == 6 else ["First", "Then", "Finally"]
    sentences = [f"Once there was a {trade} named {name}.", f"{pronoun.capitalize()} worked at the {WORKPLACE[trade]}."]
    sentences += [f"{c} {pronoun} {a}." for c, a in zip(connectors, actions)]
    sentences.append(f"In the end {name} went home and was happy.")
    return " ".join(sentences)

# -----------------------------------------------------------------------------
# Validity: the task's precision. Single-answer families must match exactly; open-ended ones are parsed.


def is_valid(example, response):
    """True if `response` correctly answers the built-in `example` (a dict with instruction and category)."""
    family, instr, resp = example["category"], example["instruction"], response.strip()
    if family == "add":
        a, b = map(int, re.fullmatch(r"What is (\d+) plus (\d+)\?", instr).groups())
        return resp == f"{a} plus {b} is {a + b}."
    if family == "antonym":
        ws = re.fullmatch(r"Give the opposite of each word: ([a-z ]+)\.", instr).group(1).split()
        return resp == f"{' '.join(ANTONYM[w] for w in ws)}."
    if family == "reverse":
        s = re.fullmatch(r"Reverse the letters ([a-z ]+)\.", instr).group(1).split()
        return resp == f"{' '.join(s[::-1])}."
    if family == "yesno":
        noun, cat = re.fullmatch(r"Is an? (\w+) (?:an?|a piece of) (\w+)\?", instr).groups()
        truth = NOUN_CATEGORY[noun]
        if truth == cat:
            return resp == f"Yes, {article(noun)} is {CATEGORIES[cat][0]}."
        return resp == f"No, {article(noun)} is {CATEGORIES[truth][0]}."
    if family == "list":
        k, plural = re.fullmatch(r"Name (\d+) (.+)\.", instr).groups()
        cat = next(c for c, (_, p, _) in CATEGORIES.items() if p == plural)
        if not resp.endswith("."):
            return False
        items = resp[:-1].split(", ")
        return len(items) == int(k) == len(set(items)) and all(NOUN_CATEGORY.get(i) == cat for i in items)
    if family == "story":
        length, name, trade = re.fullmatch(r"Write a (\w+) story about (\w+) the (\w+)\.", instr).groups()
        k = STORY_LENGTH[length]
        action = f"(?:{'|'.join(CONNECTORS)}) (?:he|she) ([a-z ]+)"  # captures the action
        frame = ([f"Once there was a {trade} named {name}", r"\w+ worked at the [a-z ]+"] + [action] * k
                 + [f"In the end {name} went home and was happy"])
        m = re.fullmatch(r"\. ".join(frame) + r"\.", resp)
        if m is None or len(set(m.groups())) != k or not set(m.groups()) <= set(TRADE_ACTIONS[trade]):
            return False
        return resp == story(name, trade, list(m.groups()))  # connectors and pronoun exactly right
    if family == "encode":
        s = re.fullmatch(r"Encode the letters ([a-z ]+)\.", instr).group(1).split()
        return resp in {f"{st}: {' '.join(a)}." for st, a in zip(STYLES, encode_styles(s))}
    raise ValueError(f"is_valid: unknown family {family!r}")


_scorer = None  # Rouge-L, the paper's metric on any data (is_valid above: the built-in task's own)


def rouge_l(prediction, references):
    """Rouge-L F-measure x 100 of one response, the maximum over its references: the paper's metric, from the
    rouge-score package (RougeScorer(['rougeL'], use_stemmer=True))."""
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer  # imported here: only evaluation needs it
        _scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return 100 * max(_scorer.score(ref, prediction)["rougeL"].fmeasure for ref in references)

# -----------------------------------------------------------------------------
# Splits: disjoint by prompt where the family's prompt space allows it (a stable hash of the instruction picks the
# split: 10% test, 10% valid, 80% train); families in REPEATING draw prompts freely, as real data repeats facts.

def prompt_split(instruction):
    bucket = zlib.crc32(instruction.encode()) % 10
    return "test" if bucket == 0 else "valid" if bucket == 1 else "train"


def make_builtin(n_train=100000, n_valid=500, n_test=500, seed=1337):
    """Returns {split: [example dicts in the dolly schema]}; families interleaved round robin."""
    rng = random.Random(seed)
    want = {"train": n_train, "valid": n_valid, "test": n_test}
    out = {s: [] for s in want}
    for split, n in reversed(want.items()):  # test first: its examples do not depend on n_train
        for i in range(n):
            family = FAMILIES[i % len(FAMILIES)]
            while True:
                instruction, response = make_example(family, rng)
                if family in REPEATING or prompt_split(instruction) == split:
                    break
            out[split].append({"instruction": instruction, "context": "", "response": response, "category": family})
    return out


def pretrain_documents(rng):
    """Yields plain-text documents about the same world, without the instruction template (for L_PT)."""
    while True:
        sentences = []
        for _ in range(rng.randint(4, 10)):
            kind = rng.randrange(5)
            if kind == 0:
                noun = rng.choice(NOUNS)
                sentences.append(f"{article(noun).capitalize()} is {CATEGORIES[NOUN_CATEGORY[noun]][0]}.")
            elif kind == 1:
                w = rng.choice(sorted(ANTONYM))
                sentences.append(f"{w.capitalize()} is the opposite of {ANTONYM[w]}.")
            elif kind == 2:
                a, b = rng.randrange(16), rng.randrange(16)
                sentences.append(f"{a} plus {b} is {a + b}.")
            elif kind == 3:
                cat = rng.choice(sorted(CATEGORIES))
                items = rng.sample(CATEGORIES[cat][2].split(), 3)
                sentences.append(f"The {items[0]}, the {items[1]} and the {items[2]} are {CATEGORIES[cat][1]}.")
            else:
                name, trade = rng.choice(sorted(HEROES)), rng.choice(sorted(TRADES))
                sentences.append(f"{name} the {trade} {rng.choice(TRADE_ACTIONS[trade])}.")
        yield " ".join(sentences)

# -----------------------------------------------------------------------------
# Tokenizers (tiktoken)

EOT = "<|endoftext|>"
# GPT-2's split pattern, except that digits split one by one (arithmetic is digit by digit)
PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
BUILTIN_TEMPLATE = "Instruction: {instruction}\nResponse:\n"  # short: the built-in task is read by small models
DOLLY_TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                  "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
DOLLY_TEMPLATE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                        "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                        "{instruction}\n\n### Input:\n{context}\n\n### Response:\n")


def world_words():
    """The words of the built-in task: its word lists plus a large fixed sample of every generator (a word this
    missed would still encode, as bytes). Deterministic, so the vocabulary is the same on every machine."""
    rng, words = random.Random(0), set("Instruction Response".split()) | set(LETTERS)
    text = [" ".join(CONNECTORS + STYLES + list(HEROES) + list(TRADES) + list(WORKPLACE.values()))]
    text += [w for c in CATEGORIES.values() for w in c] + list(TRADES.values())
    for family in FAMILIES:
        text += [s for _ in range(3000) for s in make_example(family, rng)]
    docs = pretrain_documents(rng)
    text += [next(docs) for _ in range(3000)]
    for t in text:
        words |= set(re.findall(r"[A-Za-z]+", t))
    return sorted(words)


@functools.lru_cache(maxsize=None)
def builtin_encoding(word_level=True):
    """The built-in task's tiktoken Encoding: 256 bytes (+ the world's words as single tokens) + <|endoftext|>."""
    ranks = {bytes([i]): i for i in range(256)}
    if word_level:
        pieces = [p for w in world_words() for p in (w, " " + w) if len(p) > 1]
        pieces += [" " + str(d) for d in range(10)] + [". ", ", ", ".\n", ":\n", "?\n", ", "]
        for p in dict.fromkeys(pieces):  # ordered, unique
            ranks[p.encode()] = len(ranks)
    name = "minillm-builtin-words" if word_level else "minillm-builtin-bytes"
    return _tiktoken().Encoding(name, pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={EOT: len(ranks)})


def _tiktoken():
    import tiktoken  # imported here so that `import data` stays fast
    return tiktoken


def get_encoding(spec):
    """A tokenizer from what a checkpoint carries: 'builtin' (no download), a tiktoken name such as 'gpt2'
    (downloaded once by tiktoken, then cached), or a Hugging Face checkpoint's tokenizer (a dict: hf_tokenizer)."""
    if isinstance(spec, dict):
        return hf_encoding(spec)
    name = spec
    if name == "builtin":
        return builtin_encoding()
    if name == "builtin-bytes":
        return builtin_encoding(word_level=False)
    tiktoken = _tiktoken()
    if name not in tiktoken.list_encoding_names():
        raise DataError(f"tokenizer {name}: unknown (builtin, or a tiktoken encoding: "
                        f"{', '.join(tiktoken.list_encoding_names())})")
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # offline before tiktoken has cached the file
        raise DataError(f"tokenizer {name}: tiktoken fetches its file once from the internet and could not "
                        f"({type(e).__name__}): run once with the network (it is then cached), or use "
                        "--tokenizer builtin for small experiments offline") from None


def tokenizer_name(spec):
    return spec if isinstance(spec, str) else spec["name"]


def same_tokenizer(a, b):
    """Whether two checkpoints' tokenizers (names or Hugging Face dicts) tokenize alike, by content."""
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    return fingerprint(get_encoding(a)) == fingerprint(get_encoding(b))


def fingerprint(enc):
    """What a tokenizer does, as a short digest: every token's bytes in id order, its EOS and BOS. Two checkpoints share
    a tokenizer when these agree, whatever their names (Qwen2.5-0.5B's and Qwen2.5-7B's do)."""
    h = hashlib.sha256(f"{enc.n_vocab} {enc.eot_token}{' bos %d' % enc.bos if bos_ids(enc) else ''}".encode())
    for i in range(enc.n_vocab):
        try:
            h.update(enc.decode_single_token_bytes(i) + b"\0")
        except KeyError:  # an id no token has
            h.update(b"\1")
    return h.hexdigest()[:16]

# -----------------------------------------------------------------------------
# Tokenizers of Hugging Face checkpoints. A byte-level BPE (GPT-2, OPT, Llama-3, Qwen2/2.5/3) becomes a tiktoken
# Encoding: its ranks are the token ids, its split pattern is read from tokenizer.json (the families differ), its
# special tokens are tokenizer.json's added tokens. Anything else (the SentencePiece-style BPE of LLaMA, Llama-2 and
# Mistral v0.1) goes through the `tokenizers` library behind the same surface (HFTokenizer).

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""  # ByteLevel's own


def byte_decoder():
    """GPT-2's byte-level alphabet: the printable character that stands for each byte in tokenizer.json -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {b: b for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b], n = 256 + n, n + 1
    return {chr(c): b for b, c in chars.items()}


def hf_tokenizer(folder):
    """The tokenizer of a Hugging Face model folder, as our checkpoints carry it: {name, json (tokenizer.json's
    text; GPT-2-style vocab.json + merges.txt, as OPT ships, are converted to it), eos_token_id}; None if the
    folder has none. EOS: tokenizer_config.json's eos_token (an instruct model's end of turn), else
    generation_config.json's or config.json's eos_token_id (the first of a list). BOS: as transformers decides,
    tokenizer.json's post-processor (template_bos); vocab.json + merges.txt: tokenizer_config.json's add_bos_token
    and bos_token, written into the converted file as that post-processor."""
    path = lambda f: os.path.join(folder, f)
    configs = {}
    for f in ("tokenizer_config.json", "generation_config.json", "config.json"):
        try:
            with open(path(f), encoding="utf-8") as fh:
                configs[f] = json.load(fh)
        except (OSError, ValueError):
            configs[f] = {}
    if os.path.isfile(path("tokenizer.json")):
        with open(path("tokenizer.json"), encoding="utf-8") as f:
            text = f.read()
    elif os.path.isfile(path("vocab.json")) and os.path.isfile(path("merges.txt")):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
        tok = Tokenizer(models.BPE.from_file(path("vocab.json"), path("merges.txt")))
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        made = set(byte_decoder()) | {"".join(m.split(" ", 1) if isinstance(m, str) else m)  # (lists in newer
                                      for m in json.loads(tok.to_str())["model"]["merges"]}  # files, "a b" in older)
        tok.add_special_tokens([t for t in tok.get_vocab() if t not in made])  # <s>, </s>, <pad>, <unk>: specials
        bos = configs["tokenizer_config.json"].get("bos_token")
        bos = bos["content"] if isinstance(bos, dict) else bos
        if configs["tokenizer_config.json"].get("add_bos_token") and tok.token_to_id(bos or "") is not None:
            tok.post_processor = processors.TemplateProcessing(  # (OPT: </s> before every text)
                single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
        text = tok.to_str()
    else:
        return None
    try:
        parsed = json.loads(text)
        vocab = {**parsed["model"]["vocab"], **{t["content"]: t["id"] for t in parsed.get("added_tokens", [])}}
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path('tokenizer.json')}: not a tokenizer file this reads ({type(e).__name__}: {e})") from None
    eos = configs["tokenizer_config.json"].get("eos_token")
    eos = vocab.get(eos["content"] if isinstance(eos, dict) else eos) if eos else None
    for f in ("generation_config.json", "config.json"):
        ids = configs[f].get("eos_token_id")
        if eos is None and ids is not None:
            eos = ids[0] if isinstance(ids, list) else ids
    if eos is None:
        raise DataError(f"{folder}: no EOS token (tokenizer_config.json eos_token, or eos_token_id in "
                        "generation_config.json or config.json)")
    name = os.path.basename(os.path.normpath(folder))  # (our export, out/kd/hf: kd/hf)
    name = os.path.join(os.path.basename(os.path.dirname(os.path.abspath(folder))), name) if name == "hf" else name
    return {"name": name, "json": text, "eos_token_id": int(eos)}


def template_bos(parsed):
    """The token a tokenizer.json's post-processor puts before every text, or None: Llama-3's <|begin_of_text|>,
    LLaMA / Llama-2 / Mistral's <s>, OPT's </s> (a TemplateProcessing whose single-text template starts with a
    special token); GPT-2 and Qwen put none."""
    post = parsed.get("post_processor") or {}
    for p in post.get("processors", []) if post.get("type") == "Sequence" else [post]:
        first = (p.get("single") or [{}])[0] if p.get("type") == "TemplateProcessing" else {}
        if "SpecialToken" in first:
            return p["special_tokens"][first["SpecialToken"]["id"]]["ids"][0]
    return None


def bos_ids(enc):
    """[BOS] for a tokenizer that starts every text with one (a Hugging Face checkpoint's, template_bos), else []."""
    return [enc.bos] if getattr(enc, "bos", None) is not None else []


def tiktoken_json(enc):
    """tokenizer.json for a tiktoken Encoding (the built-in tokenizers, tiktoken's gpt2), laid out as Llama-3's and
    Qwen2's are: the split pattern, then byte-level BPE. A piece of text that is one token is taken whole
    (ignore_merges, as tiktoken does: the built-in words have no merges that make them); the merges are every split
    of a token into two tokens, in the order of the token's rank (tiktoken merges the pair whose result ranks
    lowest)."""
    ranks, char = enc._mergeable_ranks, {b: c for c, b in byte_decoder().items()}
    text = lambda b: "".join(char[x] for x in b)  # bytes -> the byte-level alphabet of tokenizer.json
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for s, i in enc._special_tokens.items()],
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": enc._pat_str},
                                                                 "behavior": "Isolated", "invert": False}, byte_level]},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {text(b): i for b, i in ranks.items()},
                  "merges": [f"{text(a)} {text(b)}" for a, b in every_split(ranks)]}})


def every_split(ranks):
    """Every split of a token into two tokens, [(left bytes, right bytes)], in the order tiktoken merges them: by the
    rank of the token they make (then of the left and right parts)."""
    return [m[2:] for m in sorted((i, ranks[b[:k]], b[:k], b[k:]) for b, i in ranks.items() for k in range(1, len(b))
                                  if b[:k] in ranks and b[k:] in ranks)]


def write_hf_tokenizer(spec, folder):
    """tokenizer.json and tokenizer_config.json in an export folder, for every tokenizer a checkpoint carries (a
    Hugging Face one as it came; a tiktoken one converted, tiktoken_json): transformers' AutoTokenizer loads them."""
    enc = get_encoding(spec)
    eos = enc.decode([enc.eot_token])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "clean_up_tokenization_spaces": False}
    files = {"tokenizer.json": spec["json"] if isinstance(spec, dict) else tiktoken_json(enc),
             "tokenizer_config.json": json.dumps(config)}
    for name, text in files.items():
        with open(os.path.join(folder, name + ".tmp"), "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(os.path.join(folder, name + ".tmp"), os.path.join(folder, name))


_HF_ENCODINGS = {}


def hf_encoding(spec):
    """tiktoken Encoding (byte-level BPE) or HFTokenizer (anything else) for a hf_tokenizer dict; made once."""
    key = hashlib.sha256(spec["json"].encode()).hexdigest() + str(spec["eos_token_id"])
    if key not in _HF_ENCODINGS:
        t = json.loads(spec["json"])
        model, pre, norm = t["model"], t.get("pre_tokenizer") or {}, t.get("normalizer")
        steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
        pattern = None
        if steps[-1].get("type") == "ByteLevel" and not steps[-1].get("add_prefix_space"):
            if len(steps) == 1 and steps[0].get("use_regex", True):
                pattern = GPT2_PATTERN
            elif (len(steps) == 2 and steps[0].get("type") == "Split" and "Regex" in steps[0]["pattern"]
                  and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
                  and not steps[1].get("use_regex", True)):
                pattern = steps[0]["pattern"]["Regex"]
        ranks = byte_level_ranks(model, t.get("added_tokens", [])) if pattern else None
        if ranks is not None and (norm is None or norm.get("type") == "NFC"):
            specials = {a["content"]: a["id"] for a in t.get("added_tokens", [])}
            enc = hf_encoding_class()(spec["name"], pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials,
                                      eos=spec["eos_token_id"], nfc=norm is not None, bos=template_bos(t))
        else:
            enc = HFTokenizer(spec, bos=template_bos(t))
        _HF_ENCODINGS[key] = enc
    return _HF_ENCODINGS[key]


def byte_level_ranks(model, added):
    """tokenizer.json's BPE vocabulary as tiktoken's ranks (token bytes -> id), or None where tiktoken would not
    tokenize as it does: tiktoken merges the pair whose result has the lowest id, so the ids must rise with the
    merges' order, above the single bytes (or, with ignore_merges, the merges must be every_split of the tokens:
    tiktoken_json's files)."""
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") or \
            model.get("end_of_word_suffix") or model.get("dropout"):
        return None
    dec, vocab, specials = byte_decoder(), model["vocab"], {a["id"] for a in added}
    try:
        ranks = {bytes(dec[c] for c in token): i for token, i in vocab.items() if i not in specials}
    except KeyError:  # a character outside the byte-level alphabet
        return None
    pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]  # ("a b" in older files)
    if model.get("ignore_merges") and all(c in dec for a, b in pairs for c in a + b) and [
            (bytes(dec[c] for c in a), bytes(dec[c] for c in b)) for a, b in pairs] == every_split(ranks):
        return ranks
    merged = [vocab.get(a + b) for a, b in pairs]
    single = [i for b, i in ranks.items() if len(b) == 1]
    if (len(single) < 256 or len(ranks) != 256 + len(merged) or None in merged or merged != sorted(merged)
            or max(single) > min(merged, default=256)):  # (and every token is a byte or a merge's result)
        return None
    return ranks


@functools.lru_cache(maxsize=None)
def hf_encoding_class():
    """tiktoken's Encoding with a checkpoint's EOS (an instruct model's end of turn need not be <|endoftext|>), its
    BOS (bos_ids) and, where tokenizer.json asks for it (Qwen2), NFC-normalized text. (Made on first use: tiktoken
    loads lazily.)"""
    class HFEncoding(_tiktoken().Encoding):
        def __init__(self, *args, eos, nfc, bos, **kwargs):
            super().__init__(*args, **kwargs)
            self.eos, self.nfc, self.bos = eos, nfc, bos

        @property
        def eot_token(self):
            return self.eos

        def encode_ordinary(self, text):
            return super().encode_ordinary(unicodedata.normalize("NFC", text) if self.nfc else text)

        def encode(self, text, **kwargs):
            return super().encode(unicodedata.normalize("NFC", text) if self.nfc else text, **kwargs)
    return HFEncoding


class HFTokenizer:
    """A Hugging Face `tokenizers` Tokenizer with the surface of tiktoken's Encoding that this code uses: for
    tokenizers tiktoken cannot express (SentencePiece-style BPE with byte fallback: LLaMA, Llama-2, Mistral v0.1).
    Text is encoded without the BOS or other tokens the tokenizer's template adds (bos_ids puts BOS where it
    belongs)."""

    def __init__(self, spec, bos):
        from tokenizers import Tokenizer
        self.tok, self.name, self.eot_token = Tokenizer.from_str(spec["json"]), spec["name"], spec["eos_token_id"]
        self.bos = bos
        self.n_vocab = max(self.tok.get_vocab(with_added_tokens=True).values()) + 1

    def encode_ordinary(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode(self, text, allowed_special=(), disallowed_special=()):
        return self.encode_ordinary(text)

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def decode_single_token_bytes(self, i):
        token = self.tok.id_to_token(i)
        if token is None:
            raise KeyError(i)
        return token.encode()

# -----------------------------------------------------------------------------
# Loading instruction data: builtin, dolly (Hugging Face hub or a local copy), or the user's own files


class DataError(Exception):
    """Bad input data. The message is one line naming the file, the line and the problem."""


FIELDS = ("instruction", "context", "response")


def check_example(row, where, skip, skipped):
    """Validates one dolly-schema row; returns it normalized, or None if skipped (counted in `skipped`)."""
    problem = None
    if not isinstance(row, dict):
        problem = f"expected a JSON object, got {type(row).__name__}"
    else:
        for field in ("instruction", "response"):
            if not isinstance(row.get(field), str):
                problem = f"missing or non-string field {field!r}"
                break
        else:
            if not row["response"].strip():
                problem = "empty response"
            elif not row["instruction"].strip():
                problem = "empty instruction"
    if problem:
        if skip:
            skipped.append(f"{where}: {problem}")
            return None
        raise DataError(f"{where}: {problem}")
    return {"instruction": row["instruction"], "context": row.get("context") or "", "response": row["response"],
            "category": row.get("category") or ""}


def read_examples(path, skip_bad=False, skipped=None):
    """Reads a local .jsonl (one object per line) or .json (a list of objects) file in the dolly schema.
    Read by hand rather than through `datasets` so that every problem names its line."""
    skipped = [] if skipped is None else skipped
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    rows = []
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects")
        items = [(f"{path}: item {i}", row) for i, row in enumerate(data)]
    else:
        items = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                if not skip_bad:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                skipped.append(f"{path}:{lineno}: not valid JSON")
    for where, row in items:
        ex = check_example(row, where, skip_bad, skipped)
        if ex is not None:
            rows.append(ex)
    if not rows:
        raise DataError(f"{path}: no usable examples")
    return rows


def split_examples(rows, n_valid, n_test, seed=1337):
    """Deterministic shuffle, then test / valid / train (the paper's dolly split: 500 test, 1,000 valid)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_test, n_valid = min(n_test, len(rows) // 4), min(n_valid, len(rows) // 4)  # small files keep half for training
    return {"test": rows[:n_test], "valid": rows[n_test:n_test + n_valid], "train": rows[n_test + n_valid:]}


def hf_dataset(name_or_path, streaming):
    """The train split of a Hugging Face dataset: a hub name, a local folder, or a local .json/.jsonl file."""
    from datasets import load_dataset  # imported here: `datasets` takes seconds to import
    try:
        if name_or_path.endswith((".jsonl", ".json")):
            if not os.path.isfile(name_or_path):
                raise DataError(f"{name_or_path}: no such file")
            return load_dataset("json", data_files=name_or_path, split="train", streaming=streaming)
        return load_dataset(name_or_path, split="train", streaming=streaming)
    except DataError:
        raise
    except Exception as e:  # offline, unknown name, unreadable files: one line, not a traceback
        raise DataError(f"{name_or_path}: could not load ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def load_dolly(name_or_path="databricks/databricks-dolly-15k", skip_bad=False, skipped=None):
    """databricks-dolly-15k through `datasets` (the hub name, or a local folder or file holding the same rows)."""
    ds = hf_dataset(name_or_path, streaming=False)
    skipped = [] if skipped is None else skipped
    rows = [check_example(r, f"{name_or_path}: row {i}", skip_bad, skipped) for i, r in enumerate(ds)]
    return split_examples([r for r in rows if r is not None], n_valid=1000, n_test=500)


def load_instructions(spec, n_train=100000, n_valid=500, n_test=500, seed=1337, skip_bad=False, cache_dir="builtin_data"):
    """--data: 'builtin' | 'dolly' | a .jsonl/.json file (split here) | a folder with train/valid/test files.
    Returns ({split: rows}, skipped) where skipped lists the bad rows that were skipped (only if skip_bad). The
    built-in task is written to cache_dir once (None: made in memory, nothing written; as quick)."""
    skipped = []
    if spec == "builtin" and cache_dir is None:
        return make_builtin(n_train, n_valid, n_test, seed), skipped
    if spec == "builtin":
        folder = os.path.join(cache_dir, f"builtin-{n_train}-{n_valid}-{n_test}-{seed}")
        if not all(os.path.isfile(os.path.join(folder, f"{s}.jsonl")) for s in ("train", "valid", "test")):
            write_jsonl_splits(make_builtin(n_train, n_valid, n_test, seed), folder)
        spec = folder
    if spec == "dolly":
        return load_dolly(skip_bad=skip_bad, skipped=skipped), skipped
    if os.path.isdir(spec):
        splits = {}
        for s in ("train", "valid", "test"):
            path = next((os.path.join(spec, s + ext) for ext in (".jsonl", ".json")
                         if os.path.isfile(os.path.join(spec, s + ext))), None)
            if path is None:
                raise DataError(f"{spec}: expected {s}.jsonl (or {s}.json) in this folder")
            splits[s] = read_examples(path, skip_bad, skipped)
        return splits, skipped
    if os.path.isfile(spec):
        return split_examples(read_examples(spec, skip_bad, skipped), n_valid, n_test, seed), skipped
    raise DataError(f"{spec}: --data must be builtin, dolly, a .jsonl/.json file or a folder")


def write_jsonl_splits(splits, folder):
    os.makedirs(folder, exist_ok=True)
    for split, rows in splits.items():
        tmp = os.path.join(folder, f"{split}.jsonl.{os.getpid()}.tmp")  # (torchrun: every process may write it)
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(tmp, os.path.join(folder, f"{split}.jsonl"))  # atomic: a crash never leaves half a file

# -----------------------------------------------------------------------------
# Tokenizing: [BOS] + prompt + response + EOS, prompt tokens masked out of the loss (label -100)


def prompt_text(example, template):
    if template == "builtin":
        return BUILTIN_TEMPLATE.format(**example)
    return (DOLLY_TEMPLATE_INPUT if example["context"] else DOLLY_TEMPLATE).format(**example)


def encode_prompts(rows, enc, template, longest=None):
    """(rows, prompts): each row's prompt as a token list (after the tokenizer's BOS if it has one, as the model was
    trained: bos_ids), without the rows whose prompt is longer than `longest` tokens (one that leaves no room for a
    response in the context)."""
    pairs = [(r, bos_ids(enc) + enc.encode_ordinary(prompt_text(r, template))) for r in rows]
    pairs = [(r, p) for r, p in pairs if longest is None or len(p) <= longest]
    return [r for r, _ in pairs], [p for _, p in pairs]


def tokenize(rows, enc, template, max_length, max_prompt_length):
    """Returns (list of (prompt_ids, response_ids)), n_dropped. Response ids end with EOS and are cut so that
    prompt + response <= max_length; prompts longer than max_prompt_length are dropped (and counted)."""
    eot, out, dropped = enc.eot_token, [], 0
    for ex in rows:
        prompt = bos_ids(enc) + enc.encode_ordinary(prompt_text(ex, template))
        if len(prompt) > max_prompt_length or len(prompt) >= max_length:
            dropped += 1
            continue
        response = (enc.encode_ordinary(ex["response"]) + [eot])[:max_length - len(prompt)]
        out.append((prompt, response))
    return out, dropped


def collate(pairs, pad_id):
    """Right-padded (B, T) inputs and targets; targets are -100 on the prompt and the padding."""
    T = max(len(p) + len(r) for p, r in pairs) - 1
    x = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    y = torch.full((len(pairs), T), -100, dtype=torch.long)
    for i, (p, r) in enumerate(pairs):
        seq = torch.tensor(p + r)
        x[i, :len(seq) - 1] = seq[:-1]
        y[i, len(p) - 1:len(seq) - 1] = seq[len(p):]  # predict the response (and EOS) only
    return x, y


def batches(pairs, batch_size, seed, bucket=64, skip=0):
    """Endless shuffled epochs of collated batches: yields (epoch, x, y). Within each window of `bucket` batches
    the examples are sorted by length before they are cut into batches, so that a batch pads little (on the
    built-in task this halves the tokens a step computes); the batches are then shuffled. skip: start after that
    many batches (a resumed run), exactly where a run that used them would be."""
    rng, epoch = random.Random(seed), 0
    while True:
        order = list(range(len(pairs)))
        rng.shuffle(order)
        order = order[:len(order) - len(order) % batch_size]  # whole batches only
        chunks = []
        for i in range(0, len(order), batch_size * bucket):
            window = sorted(order[i:i + batch_size * bucket], key=lambda j: len(pairs[j][0]) + len(pairs[j][1]))
            chunks += [window[k:k + batch_size] for k in range(0, len(window), batch_size)]
        rng.shuffle(chunks)
        for chunk in chunks:
            if skip:
                skip -= 1
                continue
            yield (epoch, *collate([pairs[j] for j in chunk], pad_id=0))
        epoch += 1

# -----------------------------------------------------------------------------
# The pretraining stream for L_PT: documents joined with EOS (each after a BOS where the tokenizer has one), packed
# into chunks of block + 1 tokens


def pretrain_texts(spec, seed):
    """--pt_data: 'builtin' | 'openwebtext' | a .txt file (one document per blank-line-separated block) |
    a .jsonl file or a folder readable by `datasets` with a 'text' field."""
    if spec == "builtin":
        yield from pretrain_documents(random.Random(seed))
        return
    if spec.endswith(".txt"):
        if not os.path.isfile(spec):
            raise DataError(f"{spec}: no such file")
        with open(spec, encoding="utf-8") as f:
            docs = [d.strip() for d in f.read().split("\n\n") if d.strip()]
        if not docs:
            raise DataError(f"{spec}: file is empty")
        while True:
            yield from docs
    ds = hf_dataset("Skylion007/openwebtext" if spec == "openwebtext" else spec, streaming=True)
    while True:
        n = 0
        for i, row in enumerate(ds):
            if not isinstance(row.get("text"), str):
                raise DataError(f"{spec}: row {i} has no string field 'text'")
            n += 1
            yield row["text"]
        if n == 0:
            raise DataError(f"{spec}: no documents")


def pretrain_batches(spec, enc, batch_size, block, seed, skip=0):
    """Endless (x, y) batches of packed pretraining text, (B, block) each; skip: start after that many."""
    buf, docs, n = [], pretrain_texts(spec, seed), batch_size * (block + 1)
    while True:
        while len(buf) < n:
            buf += bos_ids(enc) + enc.encode_ordinary(next(docs)) + [enc.eot_token]
        chunk, buf = buf[:n], buf[n:]
        if skip:
            skip -= 1
            continue
        chunk = torch.tensor(chunk).view(batch_size, block + 1)
        yield chunk[:, :-1], chunk[:, 1:]

if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.split("\n")[1]).parse_args()  # (--help)
    t0 = time.time()
    splits, _ = load_instructions("builtin")
    enc = get_encoding("builtin")
    print(f"built-in task in {time.time() - t0:.1f}s; vocabulary {enc.n_vocab} tokens")
    for s, rows in splits.items():
        pairs, _ = tokenize(rows, enc, "builtin", 512, 256)
        words = [len(r["response"].split()) for r in rows]
        print(f"{s:>5}: {len(rows)} examples, response words min {min(words)} mean {np.mean(words):.1f} "
              f"max {max(words)}, tokens/example mean {np.mean([len(p) + len(r) for p, r in pairs]):.1f}")
    for ex in splits["train"][:len(FAMILIES)]:
        print(f"[{ex['category']}] {ex['instruction']} -> {ex['response']}")
