"""Generated text and how it is judged: batched decoding (greedy, sampled, beam search), metrics that score it
against references (BLEU, chrF, ROUGE-L, exact match), and the evaluation that writes predictions.jsonl."""
