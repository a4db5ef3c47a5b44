"""Writes the bundled preference pairs of the demo: the reviews of the SFT demo, answered as a judgement.

    python -m sftlib.demo.build_pairs         # rewrites preferences.jsonl (deterministic)

Written by the sftlib authors for the CPU preference demo, in the OpenAI-messages pair layout. The SFT
demo teaches "The review is positive."; these pairs prefer the reply that marks itself as a judgement,
"The review is positive, I think.", over that sentence (70% of the pairs) and over the same words with the
wrong label (30%, so the label stays learned). A model tuned on the SFT demo ends its reply after the label,
so it starts out preferring the rejected replies: the held-out preference accuracy starts low and has room
to rise, and the preferred replies share the SFT replies' words, so the tuned model still answers sanely.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from sftlib.demo.build_data import FRAMES, NEGATIVE, POSITIVE, PROMPTS, SUBJECTS, SYSTEM

HERE = Path(__file__).parent
OUT = HERE / "preferences.jsonl"


def make_pair(rng: random.Random) -> dict:
    positive = rng.random() < 0.5
    a, b = rng.sample(POSITIVE if positive else NEGATIVE, 2)
    s = rng.choice(SUBJECTS)
    review = rng.choice(FRAMES).format(s=s, S=s[0].upper() + s[1:], a=a, b=b)
    label, other = ("positive", "negative") if positive else ("negative", "positive")
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.3 else []
    messages.append({"role": "user", "content": rng.choice(PROMPTS).format(r=review)})
    rejected = f"The review is {label}." if rng.random() < 0.7 else f"The review is {other}, I think."
    return {"messages": messages, "chosen": {"role": "assistant", "content": f"The review is {label}, I think."},
            "rejected": {"role": "assistant", "content": rejected}}


def build(n: int = 400, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        row = make_pair(rng)
        key = json.dumps(row["messages"], sort_keys=True)
        if key not in seen:  # held-out pairs must be unseen prompts
            seen.add(key)
            rows.append(row)
    return rows


if __name__ == "__main__":
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in build()), encoding="utf-8")
    print(f"wrote {OUT}")
