"""ROUGE-1, ROUGE-2 and ROUGE-L F1, computed here (no rouge_score or evaluate download).

Tokens are lower-cased runs of letters and digits, as rouge_score's default tokenizer makes
them; there is no stemming (rouge_score's use_stemmer=False). ROUGE-N is the clipped n-gram
overlap, ROUGE-L the longest common subsequence; each is the F1 of precision and recall per
pair, averaged over the corpus, which is what rouge_score and HF evaluate report.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence


def tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _f1(overlap: int, n_pred: int, n_ref: int) -> float:
    if overlap == 0:
        return 0.0
    precision, recall = overlap / n_pred, overlap / n_ref
    return 2 * precision * recall / (precision + recall)


def rouge_n(pred: list[str], ref: list[str], n: int) -> float:
    p = Counter(tuple(pred[i : i + n]) for i in range(len(pred) - n + 1))
    r = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
    return _f1(sum((p & r).values()), sum(p.values()), sum(r.values()))


def lcs_length(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: list[str], ref: list[str]) -> float:
    return _f1(lcs_length(pred, ref), len(pred), len(ref))


def score(pred: str, ref: str) -> dict[str, float]:
    p, r = tokens(pred), tokens(ref)
    return {"rouge1": rouge_n(p, r, 1), "rouge2": rouge_n(p, r, 2), "rougeL": rouge_l(p, r)}


def corpus(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Mean F1 of each ROUGE over prediction/reference pairs."""
    if len(preds) != len(refs) or not refs:
        raise ValueError(f"need as many predictions as references, at least one: {len(preds)} vs {len(refs)}")
    scores = [score(p, r) for p, r in zip(preds, refs)]
    return {k: sum(s[k] for s in scores) / len(scores) for k in ("rouge1", "rouge2", "rougeL")}
