"""Regenerate the sample data: `python sample_data/make_samples.py` (deterministic)."""

from __future__ import annotations

import random
from pathlib import Path

import polars as pl
from PIL import Image, ImageDraw

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


def picture(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A smooth synthetic photo: gradients and a few discs, cheap to compress."""
    rng = random.Random(seed)
    image = Image.linear_gradient("L").resize((width, height)).convert(mode)
    tint = Image.new(mode, (width, height), tuple(rng.randrange(256) for _ in mode))
    image = Image.blend(image, tint, 0.5)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y, r = (
            rng.randrange(width),
            rng.randrange(height),
            rng.randrange(10, max(11, width // 5)),
        )
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in mode))
    return image


def images(folder: Path) -> pl.DataFrame:
    folder.mkdir(exist_ok=True)
    picture(640, 480, 1).save(folder / "harbour.jpg", quality=85)
    picture(400, 400, 2, "RGBA").save(folder / "logo.png")
    picture(512, 384, 3).save(folder / "meadow.webp", quality=80)
    picture(2400, 1800, 4).save(folder / "panorama.jpg", quality=80)  # resized to 1568
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    picture(600, 400, 5).save(folder / "sideways.jpg", quality=85, exif=exif)
    picture(200, 150, 6).convert("P").save(folder / "sketch.gif")  # converted to PNG
    return pl.DataFrame(
        {
            "photo_id": ["p1", "p2", "p3", "p4", "p5", "p6"],
            "photo": [
                "harbour.jpg",
                "logo.png",
                "meadow.webp",
                "panorama.jpg",
                "sideways.jpg",
                "sketch.gif",
            ],
        }
    )


def main() -> None:
    frame = reviews()
    frame.write_csv(HERE / "reviews.csv")
    frame.write_parquet(HERE / "reviews.parquet")
    images(HERE / "images").write_csv(HERE / "images.csv")


if __name__ == "__main__":
    main()
