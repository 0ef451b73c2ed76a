"""Build the offline demo assets for lorafit.

Run from the repository root:

    python data/build_tiny.py

It writes, deterministically (fixed seeds, two CPU threads):

* data/tiny-gpt2/   a tiny GPT-2 (GPT2LMHeadModel, fused c_attn) pretrained here on
                    English text that this script generates, with its own byte-level
                    BPE tokenizer.
* data/sst-tiny/    a small SST-2-shaped sentiment set (train.jsonl, validation.jsonl).

Everything is generated from the templates and word lists below, so the demo needs
no network and no third-party text. Only torch, transformers, tokenizers and
safetensors are used.

The pretraining text talks about films and products with the same adjectives the
reviews use, and uses " positive" / " negative" in ordinary senses (test results,
numbers, batteries, attitudes), but it never pairs a review with a sentiment label
and never contains "Sentiment:". So the base model knows the words but is near
chance on the labelled task until LoRA teaches it.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,  # noqa: E402
)

from lorafit.storage import staged_dir, write_atomic  # noqa: E402

SEED = 20240611
DATA_DIR = Path(__file__).resolve().parent
MODEL_DIR = DATA_DIR / "tiny-gpt2"
SST_DIR = DATA_DIR / "sst-tiny"

EOS = "<|endoftext|>"
VOCAB_SIZE = 3000
N_TRAIN_DOCS = 60000  # about 2.6M tokens: roughly one pass of pretraining
N_HELDOUT_DOCS = 1500
BLOCK = 256  # = n_positions, so every position embedding gets trained
BATCH = 16
LR = 3e-3
WARMUP = 60
MAX_STEPS = 600
N_SST_TRAIN = 3000
N_SST_VALID = 500

# --------------------------------------------------------------------------
# Word lists. Kept small and plain so a 1M-parameter model can learn them.
# --------------------------------------------------------------------------

GIRLS = ["Anna", "Maya", "Lily", "Rosa", "Nora", "Emma", "Clara", "Sofia", "Ella", "Ruth",
         "Mia", "Zoe", "Grace", "Lucy", "Hana", "Ivy", "Alice", "Eva", "Julia", "Sara"]
BOYS = ["Tom", "Sam", "Leo", "Ben", "Omar", "Jack", "Noah", "Max", "Hugo", "Paul",
        "Ravi", "Owen", "Felix", "Luke", "Adam", "Theo", "Dan", "Ali", "Oscar", "Kai"]
FAMILY = ["mother", "father", "sister", "brother", "grandmother", "grandfather", "aunt",
          "uncle", "cousin", "friend", "neighbor", "teacher"]
ANIMALS = ["dog", "cat", "rabbit", "fox", "owl", "duck", "horse", "goat", "mouse", "bear",
           "bird", "frog", "turtle", "lamb", "squirrel", "hedgehog"]
PLACES = ["park", "market", "library", "station", "garden", "river", "beach", "school",
          "village", "forest", "hill", "harbor", "bakery", "cafe", "museum", "farm",
          "bridge", "lake", "shop", "square", "field", "kitchen", "playground", "hospital"]
OBJECTS = ["book", "lamp", "bicycle", "kettle", "umbrella", "letter", "basket", "map",
           "key", "coat", "camera", "clock", "jacket", "ball", "kite", "box", "hat",
           "scarf", "bag", "cup", "bottle", "blanket", "shell", "stone", "ribbon"]
COLORS = ["red", "blue", "green", "yellow", "white", "black", "brown", "orange", "purple", "grey"]
SIZES = ["small", "big", "tiny", "large", "old", "new", "little", "round", "tall", "long"]
TIMES = ["morning", "afternoon", "evening", "night"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
SEASONS = ["spring", "summer", "autumn", "winter"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "cloudy", "quiet", "snowy", "foggy", "bright"]
NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve"]
FOODS = ["bread", "soup", "apples", "cheese", "rice", "cake", "tea", "coffee", "eggs",
         "pasta", "fish", "berries", "pie", "salad", "milk", "honey"]
ACTIVITIES = ["read a book", "walk the dog", "water the plants", "bake bread", "play chess",
              "ride a bicycle", "draw pictures", "write letters", "fix the fence",
              "feed the ducks", "sweep the floor", "sing songs", "fly a kite", "paint the door",
              "pick berries", "climb the hill", "cook dinner", "clean the windows"]
FEELINGS_GOOD = ["happy", "glad", "proud", "calm", "excited", "grateful", "cheerful"]
FEELINGS_BAD = ["sad", "tired", "worried", "upset", "lonely", "nervous", "grumpy"]

# Adjectives shared by the pretraining commentary and the sentiment reviews.
POS_ADJ = ["good", "great", "wonderful", "excellent", "lovely", "beautiful", "brilliant",
           "charming", "delightful", "funny", "moving", "clever", "fresh", "gripping",
           "superb", "enjoyable", "touching", "smart", "stunning", "solid", "pleasant",
           "fantastic", "memorable", "thoughtful", "satisfying", "sweet", "warm", "fun",
           "exciting", "interesting"]
NEG_ADJ = ["bad", "terrible", "awful", "boring", "dull", "weak", "poor", "messy", "silly",
           "slow", "tedious", "bland", "clumsy", "flat", "lazy", "painful", "ugly", "dreadful",
           "forgettable", "stiff", "confusing", "predictable", "shallow", "annoying",
           "tiresome", "disappointing", "sloppy", "cold"]
# Words that read naturally after "not" / "never"; negation flips them.
NEGATABLE_POS = ["good", "great", "funny", "clever", "fun", "enjoyable", "moving", "smart",
                 "exciting", "interesting"]
NEGATABLE_NEG = ["bad", "boring", "dull", "awful", "terrible", "slow", "silly", "weak",
                 "predictable", "a waste of time"]
INTENS = ["", "", "", "very ", "really ", "truly ", "quite ", "so ", "simply ", "rather ",
          "genuinely ", "incredibly "]

WORKS = ["film", "movie", "story", "show", "comedy", "drama", "thriller", "cartoon",
         "documentary", "picture", "musical", "sequel", "romance", "mystery", "western"]
FILM_ASPECTS = ["acting", "story", "plot", "script", "ending", "music", "dialogue", "cast",
                "pacing", "direction", "humor", "camera work", "soundtrack", "first half",
                "final scene", "lead actor", "lead actress", "villain", "opening scene",
                "costumes", "writing", "photography", "jokes", "characters", "score"]
PRODUCTS = ["kettle", "lamp", "backpack", "blender", "chair", "toaster", "umbrella",
            "phone case", "jacket", "desk", "fan", "mug", "pillow", "speaker", "bike lock",
            "coffee maker", "tent", "watch"]
PRODUCT_PARTS = ["handle", "lid", "battery", "sound", "fabric", "zipper", "button", "cable",
                 "design", "color", "finish", "screen", "strap", "motor", "instructions"]
TITLES = ["The Quiet Harbor", "Blue Lanterns", "The Last Orchard", "Night Train", "Paper Moons",
          "The Winter Garden", "Small Hours", "The Red Kite", "Salt and Stone", "Far Hill",
          "The Long Summer", "Glass River", "Old Friends", "The Map Maker", "Silver Creek",
          "Every Other Sunday", "The Lighthouse Keeper", "North Road", "Two Doors", "Honey Street"]

POS_VERDICTS = ["I loved it", "I enjoyed every minute", "I would happily watch it again",
                "it made me smile", "I laughed all the way through", "it was worth every penny",
                "I left the cinema happy", "I want to see it again", "it stayed with me for days",
                "my whole family enjoyed it", "I recommend it to everyone",
                "it is one of the best I have seen this year"]
NEG_VERDICTS = ["I hated it", "I was bored the whole time", "I want my time back",
                "I nearly fell asleep", "I walked out halfway", "it was a waste of money",
                "I left the cinema annoyed", "I will not watch it again",
                "I forgot it the next day", "nobody in my family liked it",
                "I would not recommend it to anyone", "it is one of the worst I have seen this year"]
POS_PRODUCT_ADJ = ["good", "great", "excellent", "lovely", "beautiful", "solid", "sturdy", "smart",
                   "pleasant", "fantastic", "clever", "superb", "handy", "comfortable", "quiet"]
NEG_PRODUCT_ADJ = ["bad", "terrible", "awful", "weak", "poor", "messy", "flimsy", "clumsy", "ugly",
                   "cheap", "sloppy", "annoying", "disappointing", "dreadful", "noisy"]
POS_PRODUCT_VERDICTS = ["I would buy it again", "it works perfectly", "it was a great gift",
                        "I use it every day", "it was worth the price", "it still works like new"]
NEG_PRODUCT_VERDICTS = ["I returned it after a week", "it broke on the second day",
                        "it was a waste of money", "I would not buy it again",
                        "it stopped working after a month", "it was not worth the price"]
NEUTRAL_FILLERS = ["I watched it on a rainy Sunday", "we saw it at the cinema in town",
                   "my sister picked it for our movie night", "it runs a little under two hours",
                   "the story is set in a small town by the sea", "I saw it with my brother",
                   "it is based on an old book", "we watched it at home after dinner",
                   "it came out last summer", "the whole film takes place in one house",
                   "I went in knowing nothing about it", "it follows a family over one winter",
                   "the director also wrote the script", "most of it was shot near a harbor"]


class Gen:
    """Tiny helper around random.Random so templates stay short and seeded."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def pick(self, seq):
        return self.rng.choice(seq)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def randint(self, a: int, b: int) -> int:
        return self.rng.randint(a, b)

    def person(self):
        """A name and its subject/object/possessive pronouns."""
        if self.chance(0.5):
            return self.pick(GIRLS), "she", "her", "her"
        return self.pick(BOYS), "he", "him", "his"


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def an(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


PLURAL_ASPECTS = {"jokes", "characters", "costumes"}


def be(aspect: str, past: bool) -> str:
    """Pick is/are/was/were for a film aspect ("jokes" and "characters" are plural)."""
    plural = aspect in PLURAL_ASPECTS
    if past:
        return "were" if plural else "was"
    return "are" if plural else "is"


def negated(g: Gen, pos: bool) -> str:
    """A negated phrase whose meaning has polarity `pos`: "not bad at all", "not really funny"."""
    word = g.pick(NEGATABLE_NEG if pos else NEGATABLE_POS)
    form = g.pick(["not", "never", "not at all"] if pos else ["not", "not really", "never"])
    return f"not {word} at all" if form == "not at all" else f"{form} {word}"


OPINION_KINDS = ["plain", "two", "noun", "verdict", "negated", "contrast"]
OPINION_WEIGHTS = [3, 3, 2, 2, 2, 2]


def opinion(g: Gen, pos: bool) -> str:
    """One opinion clause about a film with polarity `pos` (lower-case, no full stop).

    Shared by the pretraining commentary and the reviews so the reviews' wording is
    familiar to the base model; only the reviews ever get a label.
    """
    adjs, other = (POS_ADJ, NEG_ADJ) if pos else (NEG_ADJ, POS_ADJ)
    past = g.chance(0.5)
    a1, a2 = g.pick(FILM_ASPECTS), g.pick(FILM_ASPECTS)
    while a2 == a1:
        a2 = g.pick(FILM_ASPECTS)
    kind = g.rng.choices(OPINION_KINDS, weights=OPINION_WEIGHTS)[0]
    if kind == "plain":
        return f"the {a1} {be(a1, past)} {g.pick(INTENS)}{g.pick(adjs)}"
    if kind == "two":
        return f"the {a1} {be(a1, past)} {g.pick(adjs)} and the {a2} {be(a2, past)} {g.pick(INTENS)}{g.pick(adjs)}"
    if kind == "noun":
        things = g.pick(["jokes", "characters", "scenes", "songs", "moments"])
        return f"{an(g.pick(INTENS) + g.pick(adjs))} {g.pick(WORKS)} with {g.pick(adjs)} {things}"
    if kind == "verdict":
        return g.pick(POS_VERDICTS if pos else NEG_VERDICTS)
    if kind == "negated":  # the only cue is a flipped word after "not"/"never"
        return f"the {a1} {be(a1, past)} {negated(g, pos)}"
    # contrast: the clause after "but" decides
    return f"the {a1} {be(a1, past)} {g.pick(other)}, but the {a2} {be(a2, past)} {g.pick(INTENS)}{g.pick(adjs)}"


# --------------------------------------------------------------------------
# Pretraining corpus: several kinds of small documents.
# --------------------------------------------------------------------------

def story(g: Gen) -> str:
    """A short children's-story arc: setting, routine, event, feeling, ending."""
    name, he, him, his = g.person()
    animal, place, obj = g.pick(ANIMALS), g.pick(PLACES), g.pick(OBJECTS)
    friend, fhe, _, _ = g.person()
    s = []
    opening = g.pick([
        f"Once upon a time, there was {an(g.pick(SIZES))} {animal} named {name} who lived near the {place}.",
        f"There was once a child named {name} who lived in a {g.pick(SIZES)} house by the {place}.",
        f"In a {g.pick(WEATHER)} village far away, {an(animal)} called {name} had a {g.pick(COLORS)} {obj}.",
        f"{name} was {an(g.pick(SIZES))} {animal} with a {g.pick(COLORS)} {g.pick(['tail', 'nose', 'hat', 'scarf'])}.",
    ])
    s.append(opening)
    s.append(g.pick([
        f"Every {g.pick(TIMES)}, {he} liked to {g.pick(ACTIVITIES)}.",
        f"{cap(he)} loved to {g.pick(ACTIVITIES)} with {his} {g.pick(FAMILY)}.",
        f"Each {g.pick(DAYS)} {he} went to the {g.pick(PLACES)} to {g.pick(ACTIVITIES)}.",
    ]))
    s.append(g.pick([
        f"One {g.pick(WEATHER)} day, {he} found {an(g.pick(COLORS))} {obj} under a tree.",
        f"One day, {name} lost {his} {obj} near the {g.pick(PLACES)}.",
        f"One {g.pick(TIMES)}, {name} met {friend}, who was looking for a {g.pick(OBJECTS)}.",
        f"One {g.pick(SEASONS)} morning, a storm came and the {g.pick(PLACES)} was full of water.",
    ]))
    if g.chance(0.5):
        s.append(g.pick([
            f"{name} felt {g.pick(FEELINGS_BAD)}, but {he} did not give up.",
            f"At first {name} was {g.pick(FEELINGS_BAD)}, so {he} asked {friend} for help.",
            f"\"What should I do?\" {he} asked.",
            f"{cap(he)} looked everywhere, in the {g.pick(PLACES)} and by the {g.pick(PLACES)}.",
        ]))
    s.append(g.pick([
        f"Together they shared some {g.pick(FOODS)} and talked until the {g.pick(TIMES)}.",
        f"{friend} helped {him}, and soon the {obj} was safe again.",
        f"{cap(he)} gave the {obj} to {friend}, and {fhe} smiled.",
        "They walked home together as the sun went down.",
    ]))
    s.append(g.pick([
        f"In the end, {name} felt {g.pick(FEELINGS_GOOD)}.",
        f"From that day on, {name} and {friend} were best friends.",
        f"{name} learned that it is good to ask for help.",
        f"That night {name} slept well, {g.pick(FEELINGS_GOOD)} and warm.",
        f"The next {g.pick(DAYS)}, {he} went back to the {place} to {g.pick(ACTIVITIES)}.",
    ]))
    return " ".join(s)


def description(g: Gen) -> str:
    """A plain description of a place, an animal or an object."""
    kind = g.randint(0, 2)
    if kind == 0:
        place = g.pick(PLACES)
        return " ".join([
            f"The {place} is {g.pick(['small', 'busy', 'quiet', 'old', 'new', 'large'])} and {g.pick(['clean', 'bright', 'crowded', 'calm', 'noisy'])}.",
            f"It has {g.pick(NUMBERS)} {g.pick(['benches', 'trees', 'windows', 'doors', 'tables', 'lamps'])} and {an(g.pick(COLORS))} {g.pick(['gate', 'roof', 'sign', 'fence', 'door'])}.",
            f"In the {g.pick(TIMES)}, people come here to {g.pick(ACTIVITIES)}.",
            f"On {g.pick(WEATHER)} days it is {g.pick(['full of children', 'almost empty', 'very pleasant', 'a little cold'])}.",
        ])
    if kind == 1:
        animal = g.pick(ANIMALS)
        return " ".join([
            f"The {animal} is {an(g.pick(SIZES))} animal with {g.pick(COLORS)} fur." if animal not in ("owl", "duck", "bird", "frog", "turtle")
            else f"The {animal} is {an(g.pick(SIZES))} animal that lives near the {g.pick(['river', 'lake', 'forest', 'field'])}.",
            f"It eats {g.pick(FOODS)} and sleeps in the {g.pick(TIMES)}.",
            f"Most {animal}s live for about {g.pick(NUMBERS)} years.",
            g.pick([f"Children like to watch it at the {g.pick(PLACES)}.", "It is shy and quick.",
                    "It can be very loud at night.", "It likes warm places."]),
        ])
    obj = g.pick(OBJECTS)
    return " ".join([
        f"This {obj} is {g.pick(COLORS)} and {g.pick(SIZES)}.",
        f"It belonged to my {g.pick(FAMILY)}, who kept it on a shelf in the {g.pick(['hall', 'kitchen', 'bedroom', 'attic'])}.",
        f"It is about {g.pick(NUMBERS)} years old and still {g.pick(['works', 'looks nice', 'smells of pine', 'feels soft'])}.",
    ])


def dialogue(g: Gen) -> str:
    """A short exchange on separate lines, so newlines and quotes are learned."""
    a, _, _, _ = g.person()
    b, _, _, _ = g.person()
    place, food = g.pick(PLACES), g.pick(FOODS)
    lines = g.pick([
        [f"\"Where are you going?\" asked {a}.", f"\"To the {place},\" said {b}. \"I need some {food}.\"",
         "\"Can I come with you?\"", f"\"Of course. Bring your {g.pick(OBJECTS)}.\""],
        [f"\"Did you sleep well?\" asked {a}.", f"\"Not really,\" said {b}. \"The {g.pick(ANIMALS)} was loud all night.\"",
         f"\"Have some {food}. You will feel better.\""],
        [f"{a}: What time is it?", f"{b}: It is almost {g.pick(NUMBERS)} o'clock.",
         f"{a}: Then we should go to the {place} now.", f"{b}: Wait, I cannot find my {g.pick(OBJECTS)}."],
        [f"\"Is it going to rain today?\" asked {a}.", f"\"The radio said it will be {g.pick(WEATHER)},\" said {b}.",
         f"\"Then I will take my {g.pick(['umbrella', 'coat', 'hat', 'scarf'])}.\""],
        [f"{a}: How was your test?", f"{b}: Better than I thought. I studied all {g.pick(DAYS)}.",
         f"{a}: I am {g.pick(FEELINGS_GOOD)} for you."],
    ])
    return "\n".join(lines)


def everyday(g: Gen) -> str:
    """A few ordinary sentences about daily life."""
    out = []
    for _ in range(g.randint(2, 5)):
        name, he, _, his = g.person()
        out.append(g.pick([
            f"{name} made {g.pick(FOODS)} for breakfast and read the newspaper.",
            f"It was {g.pick(WEATHER)} all {g.pick(TIMES)}, so we stayed inside.",
            f"On {g.pick(DAYS)} {name} took the bus to the {g.pick(PLACES)}.",
            f"My {g.pick(FAMILY)} bought {g.pick(NUMBERS)} {g.pick(['apples', 'eggs', 'lemons', 'books', 'plates'])} at the market.",
            f"{name} forgot {his} {g.pick(OBJECTS)} at the {g.pick(PLACES)} again.",
            f"The train was {g.pick(['late', 'early', 'full', 'quiet'])} this {g.pick(TIMES[:3])}.",
            f"We need to buy {g.pick(FOODS)} and {g.pick(FOODS)} before {g.pick(DAYS)}.",
            f"{name} likes to {g.pick(ACTIVITIES)} when {he} feels {g.pick(FEELINGS_BAD)}.",
            f"In {g.pick(SEASONS)} the days are {g.pick(['short', 'long', 'warm', 'cold'])}.",
            f"The {g.pick(['shop', 'cafe', 'library', 'bakery'])} opens at {g.pick(NUMBERS)} and closes at {g.pick(NUMBERS)}.",
            f"{name} called {his} {g.pick(FAMILY)} to say hello.",
            f"There are {g.pick(NUMBERS)} {g.pick(['chairs', 'cups', 'cats', 'plants'])} in the {g.pick(['room', 'kitchen', 'garden', 'hall'])}.",
        ]))
    return " ".join(out)


def polarity_words(g: Gen) -> str:
    """Ordinary, non-review uses of "positive" and "negative"."""
    name, he, him, his = g.person()
    pol = g.pick(["positive", "negative"])
    other = "negative" if pol == "positive" else "positive"
    return g.pick([
        f"{name} went to the {g.pick(['hospital', 'doctor', 'clinic'])} on {g.pick(DAYS)}. The test came back {pol}, and the doctor called {him} in the {g.pick(TIMES)}.",
        f"The result of the blood test was {pol}. {cap(he)} will take another test next {g.pick(DAYS)}.",
        "If you multiply two negative numbers, you get a positive number. A negative number times a positive number is negative.",
        f"The number {g.pick(NUMBERS)} is positive. If you subtract ten from it, the answer is negative.",
        "Connect the red wire to the positive end of the battery and the black wire to the negative end.",
        f"Every battery has a positive side and a negative side. Put the {pol} side in first.",
        f"{name} tried to keep a positive attitude even when the work was hard.",
        f"My {g.pick(FAMILY)} always says that a positive mind makes a long day shorter.",
        f"The weather had a negative effect on the harvest this {g.pick(SEASONS)}.",
        "Too much sugar can have a negative effect on your teeth.",
        f"In the old days, photographs were made from a negative. You could see the picture in {g.pick(['light and dark', 'reverse'])}.",
        f"The temperature was negative {g.pick(NUMBERS)} degrees, so the {g.pick(['lake', 'river', 'road'])} froze.",
        f"{name} stayed positive and kept on working until the {g.pick(TIMES)}.",
        f"The covid test was {pol}, so {name} stayed at home for {g.pick(NUMBERS)} days.",
        "The sign in front of the number tells you whether it is positive or negative.",
        f"{name} checked the answer. It was {pol}, not {other}, so {he} fixed the sign.",
        "A proton has a positive charge and an electron has a negative charge.",
        f"Try not to be so negative, {name}. Things will get better.",
        lab_report(g, name),
        lab_report(g, name),
    ])


def lab_report(g: Gen, name: str) -> str:
    """A short "Key: value" record. Most tests come back negative, as in real life.

    Seeing " positive"/" negative" right after a colon gives the model the habit of
    answering a "Key:" line with one of the two words, which LoRA can build on. The
    3:1 skew towards " negative" gives the base model a strong default, so before
    LoRA it answers the sentiment prompt the same way for most reviews (near chance)
    instead of by accidental correlations.
    """
    test = g.pick(["blood sugar", "flu", "allergy", "covid", "iron", "strep", "vision"])
    results = ["negative" if g.chance(0.75) else "positive" for _ in range(3)]
    return g.pick([
        f"Name: {name}\nTest: {test}\nResult: {results[0]}\nNext visit: {g.pick(DAYS)}",
        f"Sample {g.pick(NUMBERS)}: {results[0]}\nSample {g.pick(NUMBERS)}: {results[1]}\nSample {g.pick(NUMBERS)}: {results[2]}",
    ])


def film_commentary(g: Gen) -> str:
    """Unlabelled film talk built from the same opinion clauses as the reviews.

    Every paragraph has one polarity and ends with a verdict ("I loved it", "I want
    my time back") that agrees with it, so to predict the verdict the model has to
    track polarity through negation ("not bad at all") and contrast ("..., but ...").
    That is the feature LoRA later maps to a label. The words "positive"/"negative"
    and anything like a label never appear here.
    """
    pos = g.chance(0.5)
    verdicts = POS_VERDICTS if pos else NEG_VERDICTS
    title, work = g.pick(TITLES), g.pick(WORKS)
    s = [g.pick([
        f"We watched {title} on {g.pick(DAYS)} {g.pick(TIMES)}.",
        f"Last {g.pick(DAYS)} I finally saw {title}, the new {work} everyone is talking about.",
        f"{title} is {an(work)} about {g.pick(['a family', 'two friends', 'a small town', 'a lost dog', 'an old sailor', 'a young teacher'])}.",
        f"My {g.pick(FAMILY)} took me to see {title}.",
    ])]
    if g.chance(0.4):
        s.append(cap(g.pick(NEUTRAL_FILLERS)) + ".")
    for _ in range(g.randint(1, 3)):
        s.append(cap(opinion(g, pos)) + ".")
        if g.chance(0.3):
            s.append(cap(g.pick(verdicts)) + ".")
    if s[-1][:-1].lower() not in verdicts:
        s.append(cap(g.pick(verdicts)) + ".")
    return " ".join(s)


def product_commentary(g: Gen) -> str:
    """Unlabelled product talk, same idea as film_commentary."""
    pos = g.chance(0.5)
    adjs = POS_PRODUCT_ADJ if pos else NEG_PRODUCT_ADJ
    verdicts = POS_PRODUCT_VERDICTS if pos else NEG_PRODUCT_VERDICTS
    prod, p1, p2 = g.pick(PRODUCTS), g.pick(PRODUCT_PARTS), g.pick(PRODUCT_PARTS)
    s = [g.pick([
        f"I bought this {prod} last {g.pick(['week', 'month', 'year', 'spring', 'winter'])}.",
        f"My {g.pick(FAMILY)} gave me this {prod} for my birthday.",
        f"We have used the {prod} for {g.pick(NUMBERS)} weeks now.",
    ])]
    s.append(f"The {p1} is {g.pick(INTENS)}{g.pick(adjs)} and the {p2} is {g.pick(adjs)}.")
    if g.chance(0.3):
        if pos:
            s.append("The price is not bad at all for what you get.")
        else:
            s.append(f"The {g.pick(PRODUCT_PARTS)} is not very good, and it feels cheap.")
    s.append(cap(g.pick(verdicts)) + ".")
    return " ".join(s)


DOC_KINDS = [(story, 4), (description, 2), (dialogue, 2), (everyday, 3), (polarity_words, 1),
             (film_commentary, 4), (product_commentary, 2)]


def make_corpus(seed: int, n_docs: int) -> list[str]:
    """Draw documents from the weighted mix above."""
    g = Gen(seed)
    fns = [f for f, w in DOC_KINDS for _ in range(w)]
    docs = [g.pick(fns)(g) for _ in range(n_docs)]
    for d in docs:  # the labelled task must be new to the base model
        assert "Sentiment" not in d and "Review:" not in d
    return docs


# --------------------------------------------------------------------------
# Sentiment set (SST-2 shape).
# --------------------------------------------------------------------------

def review(g: Gen, label: int) -> str:
    """One short review whose overall sentiment is `label` (1 = positive), with some
    neutral filler around the opinion."""
    parts = [opinion(g, label == 1)]
    if g.chance(0.35):
        parts.insert(0, g.pick(NEUTRAL_FILLERS))
    if g.chance(0.25):
        parts.append(g.pick(NEUTRAL_FILLERS))
    return ". ".join(cap(p) for p in parts) + "."


def make_sst(seed: int) -> tuple[list[dict], list[dict]]:
    """Balanced, de-duplicated train/validation splits of 8-30 word reviews."""
    g = Gen(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    total = N_SST_TRAIN + N_SST_VALID
    while len(rows) < total:
        label = len(rows) % 2  # alternate -> exactly balanced before shuffling
        text = review(g, label)
        if text in seen or not 8 <= len(text.split()) <= 30:
            continue
        seen.add(text)
        rows.append({"sentence": text, "label": label})
    g.rng.shuffle(rows)
    return rows[:N_SST_TRAIN], rows[N_SST_TRAIN:]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# --------------------------------------------------------------------------
# Tokenizer.
# --------------------------------------------------------------------------

def train_tokenizer(docs: list[str]) -> Tokenizer:
    """Byte-level BPE, the same pieces GPT-2 uses, so transformers' GPT-2 class loads it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, out: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json that AutoTokenizer maps to GPT-2's class.

    No pad token is saved on purpose: the trainer sets pad = eos itself.
    """
    tok.save(str(out / "tokenizer.json"))
    eos_id = tok.token_to_id(EOS)
    config = {
        "tokenizer_class": "GPT2TokenizerFast",
        "bos_token": EOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "add_prefix_space": False,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": BLOCK,
        "added_tokens_decoder": {
            str(eos_id): {"content": EOS, "lstrip": False, "normalized": True, "rstrip": False,
                          "single_word": False, "special": True}
        },
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def check_tokenizer(out: Path, raw: Tokenizer, sample: list[str]):
    """Load the way users will and fail loudly if anything is off (transformers 5 can
    silently build an empty GPT-2 tokenizer when handed the wrong files)."""
    tk = AutoTokenizer.from_pretrained(str(out))
    assert len(tk) > 100, f"tokenizer looks empty: {len(tk)}"
    assert tk.eos_token == EOS and tk.bos_token == EOS and tk.unk_token == EOS
    assert tk.pad_token in (None, EOS)
    for word in (" positive", " negative"):
        ids = tk.encode(word, add_special_tokens=False)
        assert len(ids) == 1, f"{word!r} is not a single token: {ids}"
    for text in sample + ["Review: The acting was not bad at all.\nSentiment: positive"]:
        ids = tk.encode(text, add_special_tokens=False)
        assert ids == raw.encode(text).ids, "transformers and tokenizers disagree"
        assert tk.decode(ids) == text, "encode/decode does not round-trip"
    return tk


# --------------------------------------------------------------------------
# Model pretraining.
# --------------------------------------------------------------------------

def pack(tok: Tokenizer, docs: list[str]) -> torch.Tensor:
    """Concatenate documents separated by EOS and cut into BLOCK-token rows."""
    eos_id = tok.token_to_id(EOS)
    flat: list[int] = []
    for enc in tok.encode_batch(docs):
        flat.extend(enc.ids)
        flat.append(eos_id)
    n = len(flat) // BLOCK
    return torch.tensor(flat[: n * BLOCK], dtype=torch.long).view(n, BLOCK)


def build_model(vocab_size: int, eos_id: int) -> GPT2LMHeadModel:
    """4 layers x 128 wide: about 1.2M parameters, ~5 MB as fp32."""
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=BLOCK,
        n_embd=128,
        n_layer=4,
        n_head=4,
        resid_pdrop=0.0,  # tiny model, one pass over the data: dropout only slows it down
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(config)


def lr_at(step: int) -> float:
    """Linear warmup, then cosine decay to 10% of LR."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    t = (step - WARMUP) / max(1, MAX_STEPS - WARMUP)
    return LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def pretrain(model: GPT2LMHeadModel, blocks: torch.Tensor, seed: int) -> None:
    """Plain AdamW language-model training; data order comes from a seeded generator."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(blocks), generator=gen)
                       for _ in range(math.ceil(MAX_STEPS * BATCH / len(blocks)))])
    model.train()
    t0 = time.time()
    for step in range(MAX_STEPS):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        batch = blocks[order[step * BATCH:(step + 1) * BATCH]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 60 == 0 or step == MAX_STEPS - 1:
            print(f"  step {step:4d}  loss {loss.item():.3f}  lr {lr_at(step):.2e}  {time.time() - t0:.0f}s", flush=True)
    model.eval()


@torch.no_grad()
def perplexity(model: GPT2LMHeadModel, blocks: torch.Tensor) -> float:
    """Token-level perplexity over whole blocks (every block has the same length)."""
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in blocks.split(32)]
    weights = [len(b) for b in blocks.split(32)]
    return math.exp(sum(loss * w for loss, w in zip(losses, weights)) / sum(weights))


@torch.no_grad()
def greedy(model, tk, prompt: str, n: int = 30) -> str:
    ids = tk(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tk.eos_token_id)
    return tk.decode(out[0])


# --------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------

def words(text: str) -> set[str]:
    return {w.strip(".,\"':").lower() for w in text.split()}


def main() -> None:
    t_start = time.time()
    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    random.seed(SEED)

    print("generating text ...", flush=True)
    train_docs = make_corpus(SEED, N_TRAIN_DOCS)
    seen = set(train_docs)
    heldout_docs = [d for d in make_corpus(SEED + 1, N_HELDOUT_DOCS) if d not in seen]
    sst_train, sst_valid = make_sst(SEED + 2)
    assert not {r["sentence"] for r in sst_valid} & {r["sentence"] for r in sst_train}
    corpus_words = set().union(*(words(d) for d in train_docs))
    missing = set().union(*(words(r["sentence"]) for r in sst_train + sst_valid)) - corpus_words
    assert not missing, f"review words never seen in pretraining: {sorted(missing)}"

    write_jsonl(SST_DIR / "train.jsonl", sst_train)
    write_jsonl(SST_DIR / "validation.jsonl", sst_valid)
    print(f"  sst-tiny: {len(sst_train)} train, {len(sst_valid)} validation, "
          f"{sum(r['label'] for r in sst_train)} positive in train", flush=True)

    # Built in a folder beside data/tiny-gpt2 that replaces it only once the model is saved.
    with staged_dir(MODEL_DIR) as out:
        model, tk = build_and_pretrain(out, train_docs, heldout_docs, sst_valid)
    for prompt in ["Once upon a time,", "The acting was", "The test came back"]:
        print("  sample:", repr(greedy(model, tk, prompt)), flush=True)

    for f in sorted(MODEL_DIR.iterdir()):
        print(f"  {f.relative_to(DATA_DIR.parent)}  {f.stat().st_size:,} bytes")
    print(f"done in {time.time() - t_start:.0f}s")


def build_and_pretrain(out: Path, train_docs: list[str], heldout_docs: list[str], sst_valid: list[dict]):
    """Tokenizer and pretrained model, saved into `out`."""
    print("training tokenizer ...", flush=True)
    raw_tok = train_tokenizer(train_docs)
    save_tokenizer(raw_tok, out)
    tk = check_tokenizer(out, raw_tok, train_docs[:50] + [r["sentence"] for r in sst_valid[:50]])
    print(f"  vocab {len(tk)}", flush=True)

    train_blocks, heldout_blocks = pack(raw_tok, train_docs), pack(raw_tok, heldout_docs)
    print(f"  {train_blocks.numel():,} training tokens, {heldout_blocks.numel():,} held-out tokens", flush=True)

    print("pretraining ...", flush=True)
    model = build_model(len(tk), tk.eos_token_id)
    print(f"  {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    pretrain(model, train_blocks, SEED)
    ppl = perplexity(model, heldout_blocks)
    print(f"held-out perplexity: {ppl:.2f}", flush=True)
    assert ppl < 20, "model is undertrained"

    model.generation_config = GenerationConfig(bos_token_id=tk.eos_token_id, eos_token_id=tk.eos_token_id)
    model.save_pretrained(str(out))
    return model, tk


if __name__ == "__main__":
    main()
