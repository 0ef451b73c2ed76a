"""Generation metrics: BLEU and chrF are sacrebleu's corpus scores over each prompt's references, ROUGE-L is
e2e-metrics' variant (max precision and max recall over references, beta 1.2), exact match is normalised."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import sacrebleu
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from lorafit.errors import LorafitError
from lorafit.generation import scores
from lorafit.generation.scores import require_sacrebleu, rouge_l_sentence, score

PREDICTIONS = ["The Old Mill is a pub near the river.", "Saffron House serves Indian food, and it is cheap.",
               "It is a coffee shop."]
GROUPED = [["The Old Mill is a pub by the river.", "There is a pub called The Old Mill near the river."],
           ["Saffron House is a cheap Indian restaurant.", "Saffron House serves cheap Indian food."],
           ["Little Lotus is a coffee shop.", "There is a coffee shop called Little Lotus."]]


@pytest.mark.parametrize("lowercase", [False, True])
def test_bleu_and_chrf_equal_sacrebleus_corpus_scores_on_grouped_references(lowercase):
    streams = [[refs[k] for refs in GROUPED] for k in range(2)]  # sacrebleu's own layout, called directly
    found = score(PREDICTIONS, GROUPED, ["bleu", "chrf"], lowercase=lowercase)
    assert found["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, streams, lowercase=lowercase).score)
    assert found["chrf"] == pytest.approx(sacrebleu.metrics.CHRF(lowercase=lowercase).corpus_score(PREDICTIONS,
                                                                                                   streams).score)
    assert 0 < found["bleu"] < 100


def bleu_by_definition(predictions: list[str], references: list[list[str]]) -> float:
    """Papineni et al.: clipped n-gram precisions (n = 1..4) over the corpus, their geometric mean, and the brevity
    penalty against the reference closest in length to each prediction (the shorter on a tie); 13a tokens."""
    tokenize = Tokenizer13a()
    hits, totals, length, closest = [0] * 4, [0] * 4, 0, 0
    for prediction, refs in zip(predictions, references):
        words = tokenize(prediction).split()
        ref_words = [tokenize(ref).split() for ref in refs]
        length += len(words)
        closest += min((len(r) for r in ref_words), key=lambda n: (abs(n - len(words)), n))
        for n in range(1, 5):
            grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
            most = Counter()
            for r in ref_words:
                most |= Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            hits[n - 1] += sum(min(count, most[gram]) for gram, count in grams.items())
            totals[n - 1] += max(len(words) - n + 1, 0)
    precision = math.exp(sum(math.log(h / t) for h, t in zip(hits, totals)) / 4)
    return 100 * precision * min(1.0, math.exp(1 - closest / length))


def test_bleu_over_uneven_reference_counts_is_bleu_by_its_definition():
    uneven = [GROUPED[0][:1], GROUPED[1], [*GROUPED[2], "Little Lotus, a coffee shop."]]
    assert score(PREDICTIONS, uneven, ["bleu"])["bleu"] == pytest.approx(bleu_by_definition(PREDICTIONS, uneven))


def f_measure(precision: float, recall: float) -> float:
    return (1 + 1.2**2) * precision * recall / (recall + 1.2**2 * precision)


def test_rouge_l_equals_hand_computed_values():
    # LCS "the cat on the mat": 5 of 6 words either way
    assert rouge_l_sentence("the cat sat on the mat".split(), ["the cat is on the mat".split()]) == pytest.approx(5 / 6)
    # LCS "a c" (2): precision 2/3, recall 2/4
    assert rouge_l_sentence("a b c".split(), ["a x c y".split()]) == pytest.approx(f_measure(2 / 3, 2 / 4))
    # max precision (1, from the long reference) and max recall (1, from the short one) come from different
    # references, as pycocoevalcap's Rouge takes them
    assert rouge_l_sentence("a b c".split(), ["a b".split(), "a b c d e f".split()]) == pytest.approx(1.0)
    assert rouge_l_sentence("a b".split(), ["c d".split()]) == 0.0
    assert rouge_l_sentence([], ["a".split()]) == 0.0


def test_rouge_l_of_a_corpus_is_the_mean_over_prompts_on_words_without_punctuation():
    found = score(["The cat, on the mat.", "A dog!"], [["the cat sat on the mat"], ["a dog barks", "A dog."]],
                  ["rouge_l"], lowercase=True)["rouge_l"]
    # prompt 1: "the cat on the mat" vs "the cat sat on the mat": P 5/5, R 5/6; prompt 2: "a dog" matches "a dog"
    assert found == pytest.approx(100 * (f_measure(1.0, 5 / 6) + 1.0) / 2)


def test_exact_match_ignores_surrounding_and_repeated_whitespace_and_case_only_when_asked():
    predictions = ["  The Old  Mill is a pub. ", "the old mill is a pub.", "The Old Mill"]
    references = [["The Old Mill is a pub."]] * 3
    assert score(predictions, references, ["exact_match"])["exact_match"] == pytest.approx(100 / 3)
    assert score(predictions, references, ["exact_match"], lowercase=True)["exact_match"] == pytest.approx(200 / 3)


def test_metrics_come_back_in_the_order_asked_for():
    assert list(score(PREDICTIONS, GROUPED, ["rouge_l", "exact_match", "bleu"])) == ["rouge_l", "exact_match", "bleu"]


def test_metrics_that_need_sacrebleu_are_refused_with_the_pip_line_when_it_is_missing(monkeypatch):
    monkeypatch.setattr(scores.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LorafitError, match=r"bleu, rouge_l need the sacrebleu package: pip install 'lorafit\[eval\]'"):
        require_sacrebleu(["exact_match", "bleu", "rouge_l"])
    require_sacrebleu(["exact_match"])  # exact match needs nothing
