"""The experiment's tasks: small text tasks made procedurally, each a function from a seeded random generator to one
example {"input": str, "target": str}.

Six training tasks get an expert each; two held-out tasks get none, but each resembles one of them (subtraction is
addition's neighbour, lowercasing is uppercasing's). Inputs end in "Answer:" and targets start with a space, so
that `tok(input) + tok(target)` is how the tokenizer would split the whole text. Answers are a few tokens long, so
greedy decoding of a handful of tokens decides exact match.
"""

import random

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
WORDS = ["apple", "river", "stone", "cloud", "green", "music", "table", "light", "horse", "paper", "dream", "glass",
         "tiger", "ocean", "bread", "chair", "smile", "train", "house", "plant", "night", "sugar", "field", "queen"]
NOUNS = ["movie", "meal", "book", "hotel", "concert", "game", "phone", "trip", "show", "coffee", "class", "car"]
GOOD = ["wonderful", "great", "excellent", "delightful", "fantastic", "lovely", "superb", "brilliant"]
BAD = ["terrible", "awful", "boring", "horrible", "dreadful", "disappointing", "poor", "miserable"]


ADVERBS = ["really", "very", "quite", "truly", "so", "rather"]


def spelled(number):
    """English words for 0 <= number < 1000 ("three hundred forty-seven")."""
    hundreds, rest = divmod(number, 100)
    if hundreds:
        return ONES[hundreds] + " hundred" + ("" if rest == 0 else " " + spelled(rest))
    if number < 20:
        return ONES[number]
    tens, ones = divmod(number, 10)
    return TENS[tens] + ("" if ones == 0 else "-" + ONES[ones])


def _words(rng, low=3, high=4):
    return rng.sample(WORDS, rng.randint(low, high))


def add(rng):
    a, b = rng.randint(10, 49), rng.randint(10, 49)
    return {"input": f"Add the numbers. {a} + {b}\nAnswer:", "target": f" {a + b}"}


def spell(rng):
    n = rng.randint(0, 999)
    return {"input": f"Write the number in words. {n}\nAnswer:", "target": f" {spelled(n)}"}


def reverse_words(rng):
    words = _words(rng)
    return {"input": f"Reverse the order of the words. {' '.join(words)}\nAnswer:", "target": " " + " ".join(words[::-1])}


def uppercase(rng):
    words = _words(rng, 2, 3)
    return {"input": f"Convert to upper case. {' '.join(words)}\nAnswer:", "target": " " + " ".join(words).upper()}


def sentiment(rng):
    positive = rng.random() < 0.5
    adjective = rng.choice(GOOD if positive else BAD)
    return {"input": f"Is the review positive or negative? The {rng.choice(NOUNS)} was {rng.choice(ADVERBS)} {adjective}.\nAnswer:",
            "target": " positive" if positive else " negative"}


def sort_numbers(rng):
    numbers = rng.sample(range(1, 60), rng.randint(3, 4))
    return {"input": f"Sort the numbers from smallest to largest. {' '.join(map(str, numbers))}\nAnswer:",
            "target": " " + " ".join(map(str, sorted(numbers)))}


def subtract(rng):
    a, b = rng.randint(50, 99), rng.randint(10, 49)
    return {"input": f"Subtract the numbers. {a} - {b}\nAnswer:", "target": f" {a - b}"}


def lowercase(rng):
    words = _words(rng, 2, 3)
    return {"input": f"Convert to lower case. {' '.join(words).upper()}\nAnswer:", "target": " " + " ".join(words)}


TRAINING = {"add": add, "spell": spell, "reverse_words": reverse_words, "uppercase": uppercase, "sentiment": sentiment,
            "sort_numbers": sort_numbers}
HELD_OUT = {"subtract": subtract, "lowercase": lowercase}
RELATED = {"subtract": "add", "lowercase": "uppercase"}  # the training task each held-out task resembles


def examples(task, count, split):
    """`count` examples of `task`, the same on every run: the generator is seeded by the task's name and the split,
    and test examples whose input occurs in the training split are skipped."""
    make = {**TRAINING, **HELD_OUT}[task]
    rng = random.Random(f"{task}/{split}")
    excluded = set()
    if split == "test":
        excluded = {example["input"] for example in examples(task, TRAIN_SIZE, "train")}
    result, seen = [], set()
    for _ in range(100 * count):
        if len(result) == count:
            break
        example = make(rng)
        if example["input"] in excluded or (split == "test" and example["input"] in seen):
            continue
        seen.add(example["input"])
        result.append(example)
    if len(result) < count:
        raise ValueError(f"{task}: found only {len(result)} distinct {split} examples, expected {count}")
    return result


TRAIN_SIZE = 400
