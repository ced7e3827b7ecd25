"""Writes examples/data/shapes/*.png and examples/data/shapes_vl.json: small generated pictures of coloured
shapes with questions and answers about them, a multimodal sft dataset in LLaMA-Factory's format (sharegpt
``messages`` with ``<image>`` placeholders, an ``images`` column of paths relative to dataset_dir).

    python examples/data/make_shapes.py      # deterministic: the same files every time
"""

import json
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).parent
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
SHAPES = ("square", "circle", "triangle")


def draw(shape: str, colour: str, size=(112, 84)) -> Image.Image:
    img = Image.new("RGB", size, (245, 245, 245))
    d = ImageDraw.Draw(img)
    w, h = size
    box = (w // 2 - 28, h // 2 - 28, w // 2 + 28, h // 2 + 28)
    fill = COLOURS[colour]
    if shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "circle":
        d.ellipse(box, fill=fill)
    else:
        d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fill)
    return img


def main() -> None:
    (HERE / "shapes").mkdir(exist_ok=True)
    rows = []
    pairs = [(s, c) for s in SHAPES for c in COLOURS]
    for shape, colour in pairs:
        name = f"shapes/{colour}_{shape}.png"
        draw(shape, colour).save(HERE / name, optimize=True)
        rows.append({"messages": [{"role": "user", "content": "<image>What is in this picture?"},
                                  {"role": "assistant", "content": f"A {colour} {shape} on a light grey background."}],
                     "images": [name]})
    for (s1, c1), (s2, c2) in zip(pairs[::2], pairs[1::2]):
        rows.append({"messages": [{"role": "user", "content": "<image><image>Which colours do the two shapes have?"},
                                  {"role": "assistant", "content": f"The {s1} is {c1} and the {s2} is {c2}."}],
                     "images": [f"shapes/{c1}_{s1}.png", f"shapes/{c2}_{s2}.png"]})
    (HERE / "shapes_vl.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
