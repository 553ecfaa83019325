"""Write data/tiny_vision/: a tiny image-text dataset of coloured shapes, for the vision models' quickstarts and tests.

Files (image paths are relative to data/tiny_vision/):
  images/000.png … images/159.png
      56 × 56 RGB PNGs: one shape (circle, square or triangle; red, green, blue or yellow), 16–18 px, on a
      white or light-grey background, on the left, on the right, at the top, at the bottom or in the centre;
      about a third also hold a second, small (10 px) shape of another kind or colour somewhere else.
  captions.jsonl (images 000–139) and captions_eval.jsonl (images 140–159)
      {"image": "images/NNN.png", "prefix": "caption en", "suffix": CAPTION}, one row per image, with
      CAPTION = "a red circle on the left", or with a second shape
      "a red circle on the left and a small blue square at the top".
  vqa.jsonl (images 000–139)
      chat rows with image parts, the Hugging Face convention:
      {"messages": [{"role": "user", "content": [{"type": "image", "image": "images/NNN.png"},
                                                 {"type": "text", "text": "What colour is the shape?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]}
      three rows per image: "What colour is the shape?" -> "red", "What shape is it?" -> "circle",
      "Where is the shape?" -> "on the left" ("the big shape" where there are two); then 10 rows with two
      images, "Image A: " image " Image B: " image "Which image has a circle?" -> "Image A" (or "Image B";
      the shape asked for is in exactly one of the two).
Deterministic (seed 0, Pillow only): `python scripts/make_tiny_vision_data.py` always writes the same files.
"""

import itertools
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parents[1] / "data" / "tiny_vision"
SEED = 0
NUM_IMAGES, NUM_TRAIN, NUM_PAIRS = 160, 140, 10
CANVAS = 56
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
BACKGROUNDS = ((255, 255, 255), (225, 225, 225))
# centre of each position, and how a caption says it; 16 px apart, so that a big shape (half-size ≤ 9,
# moved by ≤ 1 px) and a small one (half-size 5) at two positions never overlap
POSITIONS = {"left": ((12, 28), "on the left"), "right": ((44, 28), "on the right"), "top": ((28, 12), "at the top"),
             "bottom": ((28, 44), "at the bottom"), "centre": ((28, 28), "in the centre")}


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: str, centre: tuple[int, int], half: int) -> None:
    """A filled `shape` of side (or diameter) 2·half around `centre`; a triangle points up."""
    x, y = centre
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((x - half, y - half, x + half, y + half), fill=fill)
    elif shape == "square":
        draw.rectangle((x - half, y - half, x + half, y + half), fill=fill)
    else:
        draw.polygon(((x, y - half), (x + half, y + half), (x - half, y + half)), fill=fill)


def make_scenes(rng: random.Random) -> list[dict]:
    """NUM_IMAGES scenes: every (shape, colour, position) about equally often, in a shuffled order."""
    combos = list(itertools.product(SHAPES, COLOURS, POSITIONS))
    chosen = []
    while len(chosen) < NUM_IMAGES:
        chosen += rng.sample(combos, len(combos))
    scenes = []
    for shape, colour, position in chosen[:NUM_IMAGES]:
        scene = {"shape": shape, "colour": colour, "position": position, "half": rng.randint(8, 9),
                 "shift": (rng.randint(-1, 1), rng.randint(-1, 1)), "background": rng.choice(BACKGROUNDS),
                 "second": None}
        if rng.random() < 0.33:
            others = [(s, c) for s, c in itertools.product(SHAPES, COLOURS) if (s, c) != (shape, colour)]
            small_shape, small_colour = rng.choice(others)
            scene["second"] = {"shape": small_shape, "colour": small_colour,
                               "position": rng.choice([p for p in POSITIONS if p != position])}
        scenes.append(scene)
    return scenes


def render(scene: dict) -> Image.Image:
    image = Image.new("RGB", (CANVAS, CANVAS), scene["background"])
    draw = ImageDraw.Draw(image)
    (x, y), _ = POSITIONS[scene["position"]]
    dx, dy = scene["shift"]
    draw_shape(draw, scene["shape"], scene["colour"], (x + dx, y + dy), scene["half"])
    if scene["second"]:
        second = scene["second"]
        draw_shape(draw, second["shape"], second["colour"], POSITIONS[second["position"]][0], 5)
    return image


def caption(scene: dict) -> str:
    text = f"a {scene['colour']} {scene['shape']} {POSITIONS[scene['position']][1]}"
    if scene["second"]:
        second = scene["second"]
        text += f" and a small {second['colour']} {second['shape']} {POSITIONS[second['position']][1]}"
    return text


def image_path(index: int) -> str:
    return f"images/{index:03d}.png"


def chat(content: list[dict], answer: str) -> dict:
    return {"messages": [{"role": "user", "content": content},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}


def vqa_rows(index: int, scene: dict) -> list[dict]:
    """Colour, shape and position questions about the (big) shape of one image."""
    which = "the big shape" if scene["second"] else "the shape"
    questions = [(f"What colour is {which}?", scene["colour"]),
                 ("What shape is it?" if not scene["second"] else "What shape is the big shape?", scene["shape"]),
                 (f"Where is {which}?", POSITIONS[scene["position"]][1])]
    return [chat([{"type": "image", "image": image_path(index)}, {"type": "text", "text": question}], answer)
            for question, answer in questions]


def shapes_in(scene: dict) -> set[str]:
    return {scene["shape"]} | ({scene["second"]["shape"]} if scene["second"] else set())


def pair_rows(rng: random.Random, scenes: list[dict]) -> list[dict]:
    """NUM_PAIRS two-image questions "Which image has a SHAPE?", the SHAPE in exactly one image; answers alternate."""
    rows = []
    while len(rows) < NUM_PAIRS:
        a, b = rng.sample(range(NUM_TRAIN), 2)
        answer = "Image A" if len(rows) % 2 == 0 else "Image B"
        has, lacks = (a, b) if answer == "Image A" else (b, a)
        only = sorted(shapes_in(scenes[has]) - shapes_in(scenes[lacks]))
        if not only:
            continue
        shape = rng.choice(only)
        content = [{"type": "text", "text": "Image A: "}, {"type": "image", "image": image_path(a)},
                   {"type": "text", "text": " Image B: "}, {"type": "image", "image": image_path(b)},
                   {"type": "text", "text": f"Which image has a {shape}?"}]
        rows.append(chat(content, answer))
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def main() -> None:
    rng = random.Random(SEED)
    scenes = make_scenes(rng)
    (OUT / "images").mkdir(parents=True, exist_ok=True)
    for index, scene in enumerate(scenes):
        render(scene).save(OUT / image_path(index), optimize=True)
    captions = [{"image": image_path(i), "prefix": "caption en", "suffix": caption(s)} for i, s in enumerate(scenes)]
    write_jsonl(OUT / "captions.jsonl", captions[:NUM_TRAIN])
    write_jsonl(OUT / "captions_eval.jsonl", captions[NUM_TRAIN:])
    vqa = [row for i in range(NUM_TRAIN) for row in vqa_rows(i, scenes[i])]
    write_jsonl(OUT / "vqa.jsonl", vqa + pair_rows(rng, scenes))


if __name__ == "__main__":
    main()
