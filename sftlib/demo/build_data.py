"""Writes the bundled demo dataset: short product reviews and their sentiment, in ShareGPT form.

    python -m sftlib.demo.build_data          # rewrites reviews.jsonl (deterministic)

Written by the sftlib authors for the CPU demo: a task a model of a few hundred thousand
parameters can learn in a minute, with held-out rows that are new combinations of the same words,
so that a before/after accuracy means something.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "reviews.jsonl"

SUBJECTS = [
    "the soup", "the hotel room", "this phone", "the movie", "the service", "my new chair",
    "the concert", "the book", "the coffee", "the train ride", "the museum", "this laptop",
    "the garden", "the pizza", "the game", "the show", "the bike", "the lamp", "the class",
    "the trip", "the bread", "the jacket", "the song", "the app", "the room", "the tea",
]
POSITIVE = [
    "wonderful", "great", "lovely", "excellent", "delightful", "fantastic", "superb",
    "pleasant", "brilliant", "charming", "perfect", "amazing",
]
NEGATIVE = [
    "terrible", "awful", "boring", "disappointing", "dreadful", "rude", "broken",
    "horrible", "dull", "poor", "useless", "bad",
]
FRAMES = [
    "{S} was {a}.",
    "I think {s} is {a}.",
    "Honestly, {s} felt {a} and {b}.",
    "We tried {s} today. It was {a}.",
    "{S} is {a}, really {b}.",
    "My friend said {s} was {a}.",
]
PROMPTS = [
    "Review: {r}\nIs this review positive or negative?",
    "Classify the sentiment of this review: {r}",
    "{r}\nPositive or negative?",
]
SYSTEM = "You label the sentiment of product reviews."


def make_row(rng: random.Random) -> dict:
    positive = rng.random() < 0.5
    words = POSITIVE if positive else NEGATIVE
    a, b = rng.sample(words, 2)
    s = rng.choice(SUBJECTS)
    review = rng.choice(FRAMES).format(s=s, S=s[0].upper() + s[1:], a=a, b=b)
    turns = []
    if rng.random() < 0.3:
        turns.append({"from": "system", "value": SYSTEM})
    turns.append({"from": "human", "value": rng.choice(PROMPTS).format(r=review)})
    turns.append({"from": "gpt", "value": f"The review is {'positive' if positive else 'negative'}."})
    return {"conversations": turns}


def build(n: int = 1200, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        row = make_row(rng)
        key = json.dumps(row, sort_keys=True)
        if key not in seen:  # held-out rows must be unseen conversations
            seen.add(key)
            rows.append(row)
    return rows


def render_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


if __name__ == "__main__":
    OUT.write_text(render_jsonl(build()), encoding="utf-8")
    print(f"wrote {OUT}")
