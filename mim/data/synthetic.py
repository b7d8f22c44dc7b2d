"""The built-in synthetic image set: procedural shapes, generated on the fly, no download.

Each image is a two-colour gradient background with one large shape drawn in a third colour and
a few small distractor blobs. The background and the shape take opposite halves of the brightness
range (dark on light or light on dark), so the shape is always visible: the task is hard for a ViT
trained from scratch on a few labels, yet learnable within the demo's minutes. The label is the
shape's kind (10 classes), so the same set serves pretraining (labels ignored), classification and
the comparison demo. Image ``i`` depends only on ``(seed, i)``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ["circle", "square", "triangle", "diamond", "cross", "ring", "h-stripes", "v-stripes",
           "checker", "ellipse"]


def _draw_label(rng: np.random.Generator) -> int:
    """The first draw of an image's generator, so labels are known without drawing images."""
    return int(rng.integers(len(CLASSES)))


def synthetic_image(index: int, size: int, seed: int = 0) -> tuple[Image.Image, int]:
    rng = np.random.default_rng([seed, index])
    label = _draw_label(rng)
    dark, light = (0, 110), (150, 256)
    bg_range, fg_range = (dark, light) if rng.random() < 0.5 else (light, dark)
    c0, c1 = (rng.integers(*bg_range, 3) for _ in range(2))
    fg = rng.integers(*fg_range, 3)
    t = np.linspace(0.0, 1.0, size)[None, :, None]
    if rng.random() < 0.5:
        t = t.transpose(1, 0, 2)
    bg = (c0 * (1 - t) + c1 * t).astype(np.uint8)
    img = Image.fromarray(np.broadcast_to(bg, (size, size, 3)).copy())
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 3))):  # small distractors
        x, y = rng.integers(0, size, 2)
        r = max(1, size // 16)
        blob = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=blob)
    half = size * rng.uniform(0.3, 0.45)
    cx, cy = rng.uniform(half, size - half, 2)
    draw_shape(draw, CLASSES[label], cx, cy, half, tuple(int(v) for v in fg))
    return img, label


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, half: float,
               color: tuple[int, ...]) -> None:
    """Draw one shape of ``kind`` filling the square of half-side ``half`` around (cx, cy)."""
    box = [cx - half, cy - half, cx + half, cy + half]
    if kind == "circle":
        draw.ellipse(box, fill=color)
    elif kind == "square":
        draw.rectangle(box, fill=color)
    elif kind == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=color)
    elif kind == "diamond":
        draw.polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)],
                     fill=color)
    elif kind == "cross":
        w = half / 3
        draw.rectangle([cx - w, cy - half, cx + w, cy + half], fill=color)
        draw.rectangle([cx - half, cy - w, cx + half, cy + w], fill=color)
    elif kind == "ring":
        draw.ellipse(box, outline=color, width=max(2, int(half / 3)))
    elif kind in ("h-stripes", "v-stripes", "checker"):
        n = 4
        step = 2 * half / n
        for i in range(n):
            for j in range(n):
                on = {"h-stripes": i % 2 == 0, "v-stripes": j % 2 == 0,
                      "checker": (i + j) % 2 == 0}[kind]
                if on:
                    x0, y0 = box[0] + j * step, box[1] + i * step
                    draw.rectangle([x0, y0, x0 + step, y0 + step], fill=color)
    else:  # ellipse
        draw.ellipse([cx - half, cy - half / 2, cx + half, cy + half / 2], fill=color)


class SyntheticShapes:
    """Index -> (PIL image, label). ``size`` images of ``image_size`` pixels."""

    classes = CLASSES

    def __init__(self, size: int, image_size: int, seed: int = 0) -> None:
        self.size, self.image_size, self.seed = size, image_size, seed

    def __len__(self) -> int:
        return self.size

    def labels(self) -> list[int]:
        return [_draw_label(np.random.default_rng([self.seed, i])) for i in range(self.size)]

    def load(self, index: int) -> tuple[Image.Image, int | None, str]:
        img, label = synthetic_image(index, self.image_size, self.seed)
        return img, label, f"synthetic:{index}"
