"""Build data/e2e-tiny, a small offline data-to-text set in the shape of E2E NLG (run from the repository root):

    python data/build_e2e.py

Each row pairs a meaning representation, `name[The Old Mill], eatType[pub], food[Italian], ...`, with one human-style
description of it, as the hub's e2e_nlg does (fields `meaning_representation`, `human_reference`); a meaning
representation has one to four rows, each with another wording, so evaluation groups them into one prompt with
several references. The descriptions come from the phrasings below; the attribute values are E2E's, the
restaurant names made up.

* data/e2e-tiny/train.jsonl       about 1,200 rows of 500 meaning representations
* data/e2e-tiny/validation.jsonl  60 meaning representations, 2 to 4 rows each

Deterministic (a fixed seed); only the standard library is used.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent / "e2e-tiny"
NAMES = ["The Old Mill", "The Copper Kettle", "Green Lantern", "Saffron House", "The Wheatsheaf", "Blue Harbour",
         "The Olive Tree", "Little Lotus", "The Red Fox", "Maple Corner", "The Brass Bell", "Silver Spoon",
         "The Rose Garden", "Golden Gate", "The Lamb Inn", "Cotton Club"]
VALUES = {
    "eatType": ["restaurant", "pub", "coffee shop"],
    "food": ["Chinese", "English", "French", "Indian", "Italian", "Japanese", "fast food"],
    "priceRange": ["cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"],
    "customer rating": ["low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"],
    "area": ["city centre", "riverside"],
    "familyFriendly": ["yes", "no"],
}
PRICE = {"cheap": "cheap", "moderate": "moderately priced", "high": "expensive", "less than £20": "cheap",
         "£20-25": "moderately priced", "more than £30": "expensive"}
# Each attribute's clauses; a description takes one of each attribute it states, in the order of its shape.
CLAUSES = {
    "food": ["serves {food} food", "offers {food} food", "has {food} food on the menu"],
    "priceRange": ["has a {price} price range", "is {adjective}", "has prices in the {price} range"],
    "customer rating": ["has a {rating} customer rating", "is rated {rating} by customers"],
    "area": ["is in the {area}", "is located in the {area}", "can be found in the {area}"],
    "familyFriendly": ["is {family}", "is {kids}"],
    "near": ["is near {near}", "is close to {near}"],
}


def meaning(rng: random.Random) -> dict[str, str]:
    """A name, an eatType, and two to five more attributes."""
    attributes = {"name": rng.choice(NAMES), "eatType": rng.choice(VALUES["eatType"])}
    for key in rng.sample(["food", "priceRange", "customer rating", "area", "familyFriendly", "near"], rng.randint(2, 5)):
        attributes[key] = rng.choice([n for n in NAMES if n != attributes["name"]]) if key == "near" else rng.choice(VALUES[key])
    return attributes


def representation(attributes: dict[str, str]) -> str:
    return ", ".join(f"{key}[{value}]" for key, value in attributes.items())


def describe(attributes: dict[str, str], rng: random.Random) -> str:
    """One wording: the name and kind of place first, the other attributes as clauses in a shuffled order."""
    words = {"food": attributes.get("food"), "price": attributes.get("priceRange"),
             "adjective": PRICE.get(attributes.get("priceRange", ""), ""), "rating": attributes.get("customer rating"),
             "area": attributes.get("area"), "near": attributes.get("near"),
             "family": "family friendly" if attributes.get("familyFriendly") == "yes" else "not family friendly",
             "kids": "good for kids" if attributes.get("familyFriendly") == "yes" else "not good for kids"}
    clauses = [rng.choice(CLAUSES[key]).format(**words) for key in attributes if key in CLAUSES]
    rng.shuffle(clauses)
    opening = rng.choice(["{name} is a {kind}", "There is a {kind} called {name}", "{name} is a {kind} that"])
    first = opening.format(name=attributes["name"], kind=attributes["eatType"])
    if first.endswith("that"):
        head, rest = f"{first} {clauses[0]}", clauses[1:]
    else:
        head, rest = first, clauses
    sentences = [head + "."]
    for start in range(0, len(rest), 2):
        pair = rest[start : start + 2]
        sentences.append("It " + " and ".join(pair) + ".")
    return " ".join(sentences)


def rows(rng: random.Random, meanings: int, least: int, most: int) -> list[dict]:
    out = []
    for _ in range(meanings):
        attributes = meaning(rng)
        wordings, count = [], rng.randint(least, most)
        while len(wordings) < count:
            text = describe(attributes, rng)
            if text not in wordings:
                wordings.append(text)
        out += [{"meaning_representation": representation(attributes), "human_reference": text} for text in wordings]
    return out


def write(path: Path, lines: list[dict]) -> None:
    path.parent.mkdir(exist_ok=True)
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")


def main() -> None:
    rng = random.Random(2017)
    write(DATA / "train.jsonl", rows(rng, 500, 1, 4))
    write(DATA / "validation.jsonl", rows(rng, 60, 2, 4))


if __name__ == "__main__":
    main()
