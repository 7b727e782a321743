"""Build the bundled example preference data from Debian fortunes, ordered by VADER sentiment.

    python examples/make_prefs.py            # writes examples/data/prefs.{train,test}.jsonl

Each pair is two fortunes of the same category answering "Tell me something about
<topic>."; the more positive one (VADER compound score, a gold sentiment oracle) is
``chosen``. Deterministic: same fortunes package, same files. Needs the Debian package
``fortunes`` (make install) and the PyPI package ``vaderSentiment``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

FORTUNES = Path("/usr/share/games/fortunes")
TOPICS = {
    "computers": "computers", "education": "education", "food": "food", "love": "love",
    "literature": "books and writers", "medicine": "medicine", "people": "people",
    "politics": "politics", "science": "science", "sports": "sports", "wisdom": "life",
    "work": "work",
}
MIN_CHARS, MAX_CHARS = 40, 280
MIN_SENTIMENT_GAP = 0.5  # pairs closer than this are too ambiguous to be a preference
PAIRS_PER_TOPIC = 40
TEST_SHARE = 0.2


def read_fortunes(category: str) -> list[str]:
    text = (FORTUNES / category).read_text(encoding="utf-8", errors="replace")
    out = []
    for chunk in text.split("\n%\n"):
        line = re.sub(r"\s+", " ", chunk).strip()
        if MIN_CHARS <= len(line) <= MAX_CHARS and "%" not in line:
            out.append(line)
    return sorted(set(out))


def topic_pairs(category: str, analyzer: SentimentIntensityAnalyzer, rng: random.Random) -> list[dict]:
    fortunes = read_fortunes(category)
    rng.shuffle(fortunes)
    scored = [(analyzer.polarity_scores(f)["compound"], f) for f in fortunes]
    pairs = []
    for (score_a, a), (score_b, b) in zip(scored[0::2], scored[1::2], strict=False):
        if abs(score_a - score_b) < MIN_SENTIMENT_GAP:
            continue
        chosen, rejected = (a, b) if score_a > score_b else (b, a)
        pairs.append({
            "prompt": f"Tell me something about {TOPICS[category]}.",
            "chosen": chosen, "rejected": rejected, "domain": category,
            "sentiment_gap": round(abs(score_a - score_b), 4),
        })
        if len(pairs) == PAIRS_PER_TOPIC:
            break
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    analyzer = SentimentIntensityAnalyzer()
    rng = random.Random(args.seed)
    train, test = [], []
    for category in sorted(TOPICS):
        pairs = topic_pairs(category, analyzer, rng)
        cut = int(round(len(pairs) * (1 - TEST_SHARE)))
        train += pairs[:cut]
        test += pairs[cut:]
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("prefs.train.jsonl", train), ("prefs.test.jsonl", test)):
        with open(args.out / name, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{args.out / name}: {len(rows)} pairs")


if __name__ == "__main__":
    main()
