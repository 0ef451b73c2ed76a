"""Build the small offline data sets of the README's data shapes from data/sst-tiny (run from the repository root):

    python data/build_shapes.py

* data/alpaca-tiny/train.jsonl  completion rows with named fields: {instruction, input, output}
* data/chat-tiny/train.jsonl    chat rows: {"messages": [{role, content}, ...]}, one or two exchanges each
* data/docs-tiny/train.jsonl    text rows: {"text": ...}, documents of 6 to 12 reviews, longer than max_length

Deterministic (a fixed seed); only the standard library is used.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent
WORDS = ["negative", "positive"]
ROWS = 400


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    rng = random.Random(13)
    reviews = [json.loads(line) for line in (DATA / "sst-tiny" / "train.jsonl").read_text().splitlines()]
    rng.shuffle(reviews)
    alpaca = [{"instruction": "Say whether the review is positive or negative.", "input": row["sentence"],
               "output": f"The review is {WORDS[row['label']]}."} for row in reviews[:ROWS]]
    chat = []
    for first, second in zip(reviews[ROWS : 2 * ROWS : 2], reviews[ROWS + 1 : 2 * ROWS : 2]):
        messages = [{"role": "user", "content": f"What do you think of this review? {first['sentence']}"},
                    {"role": "assistant", "content": f"It is {WORDS[first['label']]}."}]
        if rng.random() < 0.5:
            messages += [{"role": "user", "content": f"And this one? {second['sentence']}"},
                         {"role": "assistant", "content": f"It is {WORDS[second['label']]}."}]
        chat.append(messages)
    docs, rest = [], reviews[2 * ROWS :]
    while len(docs) < ROWS // 4:
        size = rng.randint(6, 12)
        docs.append({"text": " ".join(row["sentence"] for row in rest[:size])})
        rest = rest[size:]
    write(DATA / "alpaca-tiny" / "train.jsonl", alpaca)
    write(DATA / "chat-tiny" / "train.jsonl", [{"messages": messages} for messages in chat])
    write(DATA / "docs-tiny" / "train.jsonl", docs)


if __name__ == "__main__":
    main()
