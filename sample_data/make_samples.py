"""Regenerate the sample data: `python sample_data/make_samples.py` (deterministic)."""

from __future__ import annotations

import random
from pathlib import Path

import polars as pl

HERE = Path(__file__).parent
OPENINGS = [
    "Arrived quickly and",
    "After two weeks of use it",
    "Out of the box it",
    "My kids say it",
    "Compared with the old one it",
    "For the price it",
    "Honestly it",
    "Right away it",
]
VERDICTS = {
    "positive": [
        "works perfectly",
        "exceeded what I hoped",
        "is sturdy and well made",
        "was worth every cent",
    ],
    "negative": [
        "broke on the second day",
        "stopped charging",
        "feels cheap and flimsy",
        "never worked at all",
    ],
    "neutral": [
        "does what the box says",
        "is fine, nothing special",
        "works, though setup was slow",
        "is average",
    ],
}
PRODUCTS = [
    "kettle",
    "headphones",
    "desk lamp",
    "backpack",
    "phone case",
    "blender",
    "keyboard",
    "water bottle",
]


def reviews(count: int = 200) -> pl.DataFrame:
    rng = random.Random(7)
    rows = []
    for index in range(count):
        sentiment = rng.choice(list(VERDICTS))
        product = rng.choice(PRODUCTS)
        first, second = rng.choice(VERDICTS[sentiment]), rng.choice(VERDICTS[sentiment])
        text = f"{rng.choice(OPENINGS)} {first}. The {product} {second}."
        rows.append(
            {
                "review_id": f"r{index:04d}",
                "title": f"{product.title()} review #{index}",
                "text": text,
                "stars": {"positive": 5, "neutral": 3, "negative": 1}[sentiment]
                - rng.randint(0, 1),
            }
        )
    return pl.DataFrame(rows)


def main() -> None:
    frame = reviews()
    frame.write_csv(HERE / "reviews.csv")
    frame.write_parquet(HERE / "reviews.parquet")


if __name__ == "__main__":
    main()
