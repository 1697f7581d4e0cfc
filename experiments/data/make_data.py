"""Generate the small synthetic datasets shipped in experiments/data (deterministic).

    python experiments/data/make_data.py [--out experiments/data] [--train 800] [--test 200]

No hub download is possible where gpupack runs its demo, so the plan's data sets are
imitated by templates over small word lists, each with a signal a tiny model can learn and
that is not a pure bag of words:

- sst2    binary sentiment; "but" makes the second clause decide, "not" flips an adjective,
          5% label noise.
- agnews  4 topics from topic words, with a distractor word of another topic in a third of
          the headlines, 3% label noise.
- trec    6 question types (TREC coarse classes), decided by the question's form; "what"
          starts questions of every type and "what is the name of the" four of them; 5%
          label noise.
- xsum    a 3-5 sentence news document and a one-sentence summary that is not a sentence of
          the document (a past participle where the document has a past tense), in one of two
          phrasings drawn at random, one of which combines facts of two sentences.

Written: <task>/{train,test}.jsonl ({"text", "label"} or {"document", "summary"}),
tasks.json (labels, verbalizers and prompt of each task) and vocab.txt (every word of the
data and prompts, one per line after the special tokens). The same arguments always give
the same bytes; tests/test_experiments.py checks the shipped files against this script.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable
from pathlib import Path

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[BOS]", "[EOS]"]

TASKS: dict[str, dict[str, object]] = {
    "sst2": {
        "kind": "classification",
        "labels": ["negative", "positive"],
        "prompt": "review : {text} . sentiment :",
    },
    "agnews": {
        "kind": "classification",
        "labels": ["world", "sports", "business", "technology"],
        "prompt": "headline : {text} . topic :",
    },
    "trec": {
        "kind": "classification",
        "labels": ["abbreviation", "entity", "description", "person", "location", "number"],
        "prompt": "question : {text} answer type :",
    },
    "xsum": {"kind": "summarization", "prompt": "summarize : {text}"},
}

# --- sst2 -------------------------------------------------------------------------------
POS = "good great wonderful delightful moving charming brilliant funny beautiful superb warm clever gripping fresh engaging".split()
NEG = "bad dull boring awful tedious bland clumsy weak messy stale lifeless predictable shallow tiresome forgettable".split()
NOUNS = "film movie story plot script cast ending performance dialogue soundtrack direction pacing humor visuals premise".split()
ADVS = "really very quite truly rather surprisingly genuinely oddly".split()
FILLER = ["frankly", "honestly", "overall", "in the end", "for a sequel", "at two hours", "after all"]


def _sst2(rng: random.Random) -> tuple[str, int]:
    label = rng.randrange(2)
    good, bad = (POS, NEG) if label else (NEG, POS)
    n1, n2 = rng.sample(NOUNS, 2)
    form = rng.randrange(5)
    if form == 0:
        text = f"the {n1} is {rng.choice(ADVS)} {rng.choice(good)}"
    elif form == 1:
        text = f"the {n1} is {rng.choice(bad)} but the {n2} is {rng.choice(good)}"
    elif form == 2:
        text = f"the {n1} is not {rng.choice(bad)}"
    elif form == 3:
        text = f"a {rng.choice(good)} {n1} with a {rng.choice(ADVS)} {rng.choice(good)} {n2}"
    else:
        text = f"{rng.choice(FILLER)} , i found the {n1} {rng.choice(good)} and not {rng.choice(bad)}"
    if rng.random() < 0.05:
        label = 1 - label
    return text, label


# --- agnews -----------------------------------------------------------------------------
TOPIC_WORDS = [
    "minister election government embassy treaty parliament protest ceasefire summit refugees president diplomats".split(),
    "team match coach season league striker tournament championship goal playoffs olympic quarterback".split(),
    "shares profit market investors bank merger earnings stocks quarter revenue economy inflation".split(),
    "software internet computer chip researchers startup smartphone satellite robot network data browser".split(),
]
AG_VERBS = "reports announces faces expects plans rejects backs delays wins loses unveils debates".split()
AG_PLACES = "london paris tokyo berlin brazil india chicago".split()


def _agnews(rng: random.Random) -> tuple[str, int]:
    label = rng.randrange(4)
    words = rng.sample(TOPIC_WORDS[label], 2)
    if rng.random() < 0.33:
        other = rng.choice([t for t in range(4) if t != label])
        words.append(rng.choice(TOPIC_WORDS[other]))
    rng.shuffle(words)
    place = rng.choice(AG_PLACES)
    text = f"{words[0]} {rng.choice(AG_VERBS)} new {words[1]} in {place}"
    if len(words) > 2:
        text += f" amid {words[2]} talk"
    if rng.random() < 0.03:
        label = rng.randrange(4)
    return text, label


# --- trec -------------------------------------------------------------------------------
ACRONYMS = "nasa nato unesco fbi laser radar scuba dna html gps".split()
THINGS = ["the telescope", "the telephone", "the vaccine", "the airplane", "penicillin", "the printing press", "the bicycle", "jazz"]
PLACES = ["mount everest", "the nile", "the eiffel tower", "lake victoria", "the sahara", "timbuktu", "the great wall"]
ANIMALS = "animal bird fish flower fruit color instrument sport".split()
CONCEPTS = ["gravity", "inflation", "democracy", "photosynthesis", "irony", "a rainbow", "a volcano", "an eclipse"]

TREC_FORMS: list[list[Callable[[random.Random], str]]] = [
    [  # abbreviation
        lambda r: f"what does {r.choice(ACRONYMS)} stand for ?",
        lambda r: f"what is the full form of {r.choice(ACRONYMS)} ?",
        lambda r: f"what is {r.choice(ACRONYMS)} short for ?",
    ],
    [  # entity
        lambda r: f"what {r.choice(ANIMALS)} is found in {r.choice(PLACES)} ?",
        lambda r: f"what kind of {r.choice(ANIMALS)} is named after {r.choice(THINGS)} ?",
        lambda r: f"what is the name of the {r.choice(ANIMALS)} found in {r.choice(PLACES)} ?",
    ],
    [  # description
        lambda r: f"why does {r.choice(CONCEPTS)} happen ?",
        lambda r: f"what is the meaning of {r.choice(CONCEPTS)} ?",
        lambda r: f"how does {r.choice(THINGS)} work ?",
    ],
    [  # person
        lambda r: f"who invented {r.choice(THINGS)} ?",
        lambda r: f"what person first visited {r.choice(PLACES)} ?",
        lambda r: f"what is the name of the man who invented {r.choice(THINGS)} ?",
    ],
    [  # location
        lambda r: f"where is {r.choice(PLACES)} ?",
        lambda r: f"what country is {r.choice(PLACES)} in ?",
        lambda r: f"what is the name of the city near {r.choice(PLACES)} ?",
    ],
    [  # number
        lambda r: f"how many people visit {r.choice(PLACES)} ?",
        lambda r: f"what year was {r.choice(THINGS)} invented ?",
        lambda r: f"when did {r.choice(ACRONYMS)} start ?",
        lambda r: f"what is the age of {r.choice(PLACES)} ?",
    ],
]


def _trec(rng: random.Random) -> tuple[str, int]:
    label = rng.randrange(6)
    text = rng.choice(TREC_FORMS[label])(rng)
    if rng.random() < 0.05:
        label = rng.randrange(6)
    return text, label


# --- xsum -------------------------------------------------------------------------------
SUBJECTS = "mayor council university hospital police club company charity".split()
EVENTS = [("opened", "opened", "new"), ("closed", "closed", "old"), ("sold", "sold", "historic"), ("rebuilt", "rebuilt", "damaged")]
OBJECTS = "bridge library stadium school museum factory park station".split()
TOWNS = "leeds cardiff bristol glasgow belfast york swansea dundee".split()
DAYS = "monday tuesday wednesday thursday friday".split()
XSUM_FILLER = [
    "local people had mixed views on the plans",
    "the work is expected to cost millions of pounds",
    "a spokesperson declined to comment further",
    "the decision follows a long public consultation",
    "traffic in the area was disrupted for several hours",
    "campaigners said they would keep a close watch",
]


def _xsum(rng: random.Random) -> tuple[str, str]:
    subject = rng.choice(SUBJECTS)
    past, participle, adj = rng.choice(EVENTS)
    obj, town, day = rng.choice(OBJECTS), rng.choice(TOWNS), rng.choice(DAYS)
    years = rng.randrange(2, 20)
    facts = [
        f"the {subject} {past} the {adj} {obj} in {town} on {day}",
        f"officials said the {obj} had been discussed for {years} years",
    ]
    sentences = facts + rng.sample(XSUM_FILLER, rng.randrange(1, 4))
    rng.shuffle(sentences)
    document = " . ".join(sentences) + " ."
    if rng.random() < 0.5:
        summary = f"the {adj} {obj} in {town} has been {participle} by the {subject} ."
    else:  # a second phrasing, drawn at random: no model can know which, as in real XSUM
        summary = f"{town} {obj} {participle} after {years} years of talks ."
    return document, summary


GENERATORS: dict[str, Callable[[random.Random], tuple[str, object]]] = {
    "sst2": _sst2,
    "agnews": _agnews,
    "trec": _trec,
    "xsum": _xsum,
}


def generate(out: Path, train: int = 800, test: int = 200) -> list[Path]:
    """Write every task's splits, tasks.json and vocab.txt under out; return the paths."""
    written: list[Path] = []
    words: set[str] = set()
    for task, gen in GENERATORS.items():
        sizes = {"train": train, "test": test} if task != "xsum" else {"train": train // 2, "test": test // 4}
        for split, n in sizes.items():
            rng = random.Random(f"{task}-{split}")
            rows = []
            for _ in range(n):
                a, b = gen(rng)
                row = {"document": a, "summary": b} if task == "xsum" else {"text": a, "label": b}
                rows.append(row)
                words.update(_words(a) + (_words(b) if isinstance(b, str) else []))
            path = out / task / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
            written.append(path)
    for spec in TASKS.values():
        words.update(_words(str(spec["prompt"]).replace("{text}", "")))
        words.update(str(label) for label in spec.get("labels", []))  # type: ignore[union-attr]
    (out / "tasks.json").write_text(json.dumps(TASKS, indent=2, sort_keys=True) + "\n")
    (out / "vocab.txt").write_text("\n".join(SPECIAL_TOKENS + sorted(words)) + "\n")
    return written + [out / "tasks.json", out / "vocab.txt"]


def _words(text: str) -> list[str]:
    # The same split as the tokenizer's Whitespace pre-tokenizer: words and punctuation runs.
    return re.findall(r"\w+|[^\w\s]+", text.lower())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--train", type=int, default=800, help="training rows per classification task")
    parser.add_argument("--test", type=int, default=200, help="test rows per classification task")
    args = parser.parse_args(argv)
    for path in generate(args.out, args.train, args.test):
        print(path)


if __name__ == "__main__":
    main()
