"""Generated text against references, every metric on a 0-100 scale, each prompt with all of its references.

* bleu: sacrebleu's corpus BLEU (13a tokenization, closest reference length, no smoothing at corpus level),
  the metric of e2e-metrics' BLEU column (mteval-v13a) computed by a maintained library.
* chrf: sacrebleu's corpus chrF (character 6-grams, beta 2); a sentence's statistics are those of its best reference.
* rouge_l: ROUGE-L as e2e-metrics (through pycocoevalcap) computes it: per prompt, the longest common subsequence
  with each reference gives a precision and a recall; the largest precision and the largest recall over the
  references (each may come from a different one) make an F-measure with beta = 1.2; averaged over prompts.
  Words are sacrebleu's 13a tokens without punctuation tokens (e2e-metrics takes PTB tokens, also without them).
* exact_match: the share of prompts whose prediction equals one of its references once both are stripped and
  every run of whitespace is one space.

`lowercase` makes all four case-insensitive (e2e-metrics lowercases before every metric).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from lorafit.errors import LorafitError

ROUGE_BETA = 1.2
# The tokens pycocoevalcap's PTB tokenizer drops before ROUGE-L (its PUNCTUATIONS), as 13a writes them too.
PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                         "--", "...", ";"])
NEEDS_SACREBLEU = ("bleu", "chrf", "rouge_l")  # rouge_l for its tokenizer


def require_sacrebleu(metrics: list[str]) -> None:
    """Refuse, before any work, metrics whose library is not installed."""
    wanted = [name for name in metrics if name in NEEDS_SACREBLEU]
    if wanted and importlib.util.find_spec("sacrebleu") is None:
        raise LorafitError(f"[eval] metrics {', '.join(wanted)} need the sacrebleu package: "
                           "pip install 'lorafit[eval]' (or pip install sacrebleu)")


def score(predictions: list[str], references: list[list[str]], metrics: list[str], *,
          lowercase: bool = False) -> dict[str, float]:
    """{metric: value} in the order asked for; `references[i]` holds every reference of prediction i."""
    if len(predictions) != len(references) or any(not refs for refs in references):
        raise ValueError("every prediction needs at least one reference")
    return {name: SCORERS[name](predictions, references, lowercase) for name in metrics}


def reference_streams(references: list[list[str]]) -> list[list[str | None]]:
    """sacrebleu's layout: stream k holds every prompt's k-th reference, None where a prompt has fewer."""
    most = max((len(refs) for refs in references), default=0)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(most)]


def bleu(predictions: list[str], references: list[list[str]], lowercase: bool = False) -> float:
    from sacrebleu.metrics import BLEU

    return BLEU(lowercase=lowercase).corpus_score(predictions, reference_streams(references)).score


def chrf(predictions: list[str], references: list[list[str]], lowercase: bool = False) -> float:
    from sacrebleu.metrics import CHRF

    return CHRF(lowercase=lowercase).corpus_score(predictions, reference_streams(references)).score


def words(text: str, lowercase: bool = False) -> list[str]:
    """13a tokens of `text` without punctuation tokens: what ROUGE-L compares."""
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    text = text.lower() if lowercase else text
    return [token for token in Tokenizer13a()(text).split() if token not in PUNCTUATION]


def longest_common_subsequence(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_sentence(candidate: list[str], references: list[list[str]], beta: float = ROUGE_BETA) -> float:
    """ROUGE-L of one tokenized candidate against its references, 0-1: max precision and max recall, then F_beta."""
    if not candidate:
        return 0.0
    common = [longest_common_subsequence(candidate, ref) for ref in references]
    precision = max(lcs / len(candidate) for lcs in common)
    recall = max((lcs / len(ref) for lcs, ref in zip(common, references) if ref), default=0.0)
    if precision == 0 or recall == 0:
        return 0.0
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def rouge_l(predictions: list[str], references: list[list[str]], lowercase: bool = False) -> float:
    scores = [rouge_l_sentence(words(prediction, lowercase), [words(ref, lowercase) for ref in refs])
              for prediction, refs in zip(predictions, references)]
    return 100.0 * sum(scores) / max(len(scores), 1)


def normalized(text: str, lowercase: bool = False) -> str:
    """exact_match's normalisation: stripped, whitespace runs as one space, lowercased when asked."""
    text = " ".join(text.split())
    return text.lower() if lowercase else text


def exact_match(predictions: list[str], references: list[list[str]], lowercase: bool = False) -> float:
    hits = sum(normalized(prediction, lowercase) in {normalized(ref, lowercase) for ref in refs}
               for prediction, refs in zip(predictions, references))
    return 100.0 * hits / max(len(predictions), 1)


SCORERS: dict[str, Callable[[list[str], list[list[str]], bool], float]] = {
    "bleu": bleu, "chrf": chrf, "rouge_l": rouge_l, "exact_match": exact_match,
}
