"""A procedural, captioned image world for testing distillation on a CPU.

Each image is 64x64 RGB: one object with a shape, a colour, a fill pattern and a quadrant, on a
plain or checkered background. Stripes and checks are the fine structure that few-step samplers
blur away, which is what lets the world tell a distilled model from a non-distilled sampler.
Everything is a pure function of an integer seed, so the world is identical on every machine.
A palette other than "base" re-colours the backgrounds of the same scenes (a shifted world for a
"community fine-tune"); `style_score` tells its images from the base world's without the judge.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

SIZE = 64
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": ("red", "green", "blue", "yellow"),
    "shape": ("circle", "square", "triangle"),
    "pattern": ("solid", "striped"),
    "position": ("top left", "top right", "bottom left", "bottom right"),
    "background": ("plain", "checkered"),
}
RGB = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 230), "yellow": (235, 210, 40)}
BACKGROUND_RGB = {"plain": ((200, 200, 200),), "checkered": ((235, 235, 235), (150, 150, 150))}
# Background colours per palette. "base" is the world the judge, VAE and teachers were trained on;
# "dusk" tints it rose: the look of the "community fine-tune" in community.py. The tint is as strong
# as the bundled judge allows (measured on 1000 held-out images, prompt accuracy: 99.9% with this tint,
# 97.7% with a +20 red, -20 blue one, 83% with +30/-30), and object colours stay put (an orange-shifted
# object palette: 91.7%): the judge only ever saw these colours.
PALETTES = {
    "base": BACKGROUND_RGB,
    "dusk": {"plain": ((210, 186, 190),), "checkered": ((240, 216, 218), (158, 132, 142))},
}
STYLE_FRAME = 4  # pixels: the outer frame that style_match reads; the object covers at most ~22% of it
STRIPE_PERIOD = 8  # pixels; 4 on, 4 off: two latent pixels each at the VAE's 4x downsampling
CHECK_SIZE = 8
OBJECT_SIZE = (22, 28)  # side of the object's bounding box, pixels, sampled uniformly
JITTER = 3  # pixels of random offset of the object's centre around its quadrant's centre


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    pattern: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        fill = "striped " if self.pattern == "striped" else ""
        return f"a {self.color} {fill}{self.shape} at the {self.position} on a {self.background} background"

    def labels(self) -> dict[str, int]:
        return {name: ATTRIBUTES[name].index(getattr(self, name)) for name in ATTRIBUTES}


def all_scenes() -> list[Scene]:
    """Every combination of attributes, in a fixed order."""
    return [Scene(*values) for values in itertools.product(*ATTRIBUTES.values())]


def scene_from_seed(seed: int) -> Scene:
    rng = np.random.default_rng([seed, 0])
    return Scene(*(values[rng.integers(len(values))] for values in ATTRIBUTES.values()))


def _object_mask(shape: str, cx: float, cy: float, side: float) -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    h = side / 2
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= h**2
    if shape == "square":
        return (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    # An upright isosceles triangle inside the same bounding box: apex at the top.
    top, bottom = cy - h, cy + h
    half_width = h * (y - top) / side
    return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half_width)


def render(scene: Scene, seed: int, palette: str = "base") -> np.ndarray:
    """The scene as a uint8 array [64, 64, 3]; `seed` draws size, jitter and texture phase, the
    same for every palette, so a scene differs across palettes only in its background colours."""
    rng = np.random.default_rng([seed, 1])
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    colors = PALETTES[palette][scene.background]
    if scene.background == "checkered":
        ox, oy = rng.integers(CHECK_SIZE, size=2)
        checks = (((x + ox) // CHECK_SIZE + (y + oy) // CHECK_SIZE) % 2).astype(bool)
        image = np.where(checks[..., None], colors[1], colors[0])
    else:
        image = np.broadcast_to(np.array(colors[0]), (SIZE, SIZE, 3))
    image = np.array(image, dtype=np.uint8)

    side = rng.uniform(*OBJECT_SIZE)
    row, col = scene.position.split()
    cx = (0.25 if col == "left" else 0.75) * SIZE + rng.uniform(-JITTER, JITTER)
    cy = (0.25 if row == "top" else 0.75) * SIZE + rng.uniform(-JITTER, JITTER)
    mask = _object_mask(scene.shape, cx, cy, side)
    fill = np.array(RGB[scene.color], dtype=np.uint8)
    if scene.pattern == "striped":
        phase = rng.integers(STRIPE_PERIOD)
        dark = ((y + phase) % STRIPE_PERIOD) < STRIPE_PERIOD // 2
        stripes = np.where(dark[..., None], (fill * 0.35).astype(np.uint8), fill)
        image[mask] = stripes[mask]
    else:
        image[mask] = fill
    return image


def sample(seed: int, palette: str = "base") -> tuple[Scene, np.ndarray]:
    """One random scene and its image, both determined by `seed` (and the palette)."""
    scene = scene_from_seed(seed)
    return scene, render(scene, seed, palette)


def style_match(images: np.ndarray, palette: str, base: str = "base") -> np.ndarray:
    """Per image, whether its background looks like `palette` rather than `base`: a judge-free check.

    Every pixel of the outer frame votes for the palette holding the nearest background colour (RGB
    distance); the majority wins. The frame is mostly background whatever the scene, and object pixels
    are far from both palettes' greys, so they rarely tip the vote. images: uint8 [N, 64, 64, 3].
    """
    frame = np.ones((SIZE, SIZE), dtype=bool)
    frame[STYLE_FRAME:-STYLE_FRAME, STYLE_FRAME:-STYLE_FRAME] = False
    pixels = images[:, frame].astype(np.float32)  # [N, P, 3]
    distance = {name: _nearest_distance(pixels, PALETTES[name]) for name in (palette, base)}
    return (distance[palette] < distance[base]).mean(1) > 0.5


def style_score(images: np.ndarray, palette: str, base: str = "base") -> float:
    """Fraction of images whose background is closer to `palette` than to `base`."""
    return float(style_match(images, palette, base).mean())


def _nearest_distance(pixels: np.ndarray, backgrounds: dict) -> np.ndarray:
    colors = np.array([c for pair in backgrounds.values() for c in pair], dtype=np.float32)  # [C, 3]
    return np.linalg.norm(pixels[..., None, :] - colors, axis=-1).min(-1)
