"""Synthetic MVTec-layout datasets: the embedded default data of every notebook's `smoke` profile.

Two disjoint groups of classes are written, each as its own MVTec-layout dataset:

    <root>/synth-aux/<class>/...     auxiliary classes (training of AnomalyCLIP-style methods)
    <root>/synth-target/<class>/...  target classes (zero-shot testing)

with `train/good/*.png`, `test/good/*.png`, `test/<defect>/*.png` and
`ground_truth/<defect>/<stem>_mask.png`. Each group holds textures (periodic or noise patterns filling the
frame) and objects (a shape on a plain background). An anomalous image is a normal image of its class with
one defect painted in (scratch, hole, stain, crack, missing piece); its mask is exactly the set of pixels
whose value changed (0/255, L mode). Defects on objects stay on the object; a missing piece of an object
shows the background behind it.

Generation uses numpy and Pillow only and is deterministic: the same seed gives byte-identical PNGs, and an
image depends only on (seed, class, split, defect, index), not on the order of classes.

Example:
    >>> roots = make_synthetic("/tmp/zsad-synth")  # doctest: +SKIP
    >>> from zsadkit.data import read_mvtec
    >>> samples = read_mvtec(roots["synth-target"], dataset="synth-target")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from zsadkit.data.errors import LayoutError

__all__ = [
    "add_defect",
    "AUX_DATASET",
    "DEFECT_PAINTERS",
    "DEFECTS",
    "GENERATOR_VERSION",
    "make_synthetic",
    "STAMP_NAME",
    "SYNTHETIC_CLASSES",
    "SyntheticConfig",
    "TARGET_DATASET",
]

GENERATOR_VERSION = 1
STAMP_NAME = "synthetic.json"
AUX_DATASET = "synth-aux"
TARGET_DATASET = "synth-target"
DEFECTS = ("scratch", "hole", "stain", "crack", "missing_piece")

# (height, width, 3) float image in [0, 255]; (height, width) bool object mask (None for textures);
# background behind the object (None for textures)
Rendered = tuple[np.ndarray, np.ndarray | None, np.ndarray | None]


@dataclass(frozen=True)
class SyntheticConfig:
    """What `make_synthetic` writes.

    Attributes:
        seed: master seed; every image is a function of (seed, class, split, defect, index).
        image_size: side of the square images, in pixels.
        n_train_normal: normal images per class in train/good.
        n_test_normal: normal images per class in test/good.
        n_test_anomalous: anomalous images per class, spread over `defects` in turn.
        aux_classes: classes of the auxiliary group (names from `SYNTHETIC_CLASSES`).
        target_classes: classes of the target group, disjoint from `aux_classes`.
        defects: defect types to draw (from `DEFECTS`).
    """

    seed: int = 0
    image_size: int = 128
    n_train_normal: int = 16
    n_test_normal: int = 10
    n_test_anomalous: int = 10
    aux_classes: tuple[str, ...] = ("fabric", "marble", "washer", "nut")
    target_classes: tuple[str, ...] = ("planks", "mesh", "coin", "bolt")
    defects: tuple[str, ...] = DEFECTS

    def __post_init__(self) -> None:
        for name in ("aux_classes", "target_classes", "defects"):
            if isinstance(getattr(self, name), str):
                raise ValueError(f"SyntheticConfig.{name} must be a sequence of names, not a string")
            object.__setattr__(self, name, tuple(getattr(self, name)))
        unknown = [c for c in self.aux_classes + self.target_classes if c not in SYNTHETIC_CLASSES]
        if unknown:
            raise ValueError(
                f"SyntheticConfig: unknown classes {unknown}; expected names from {sorted(SYNTHETIC_CLASSES)}"
            )
        shared = sorted(set(self.aux_classes) & set(self.target_classes))
        if shared:
            raise ValueError(
                f"SyntheticConfig: aux_classes and target_classes must be disjoint, both hold {shared}"
            )
        for name in ("aux_classes", "target_classes", "defects"):
            values = getattr(self, name)
            if not values or len(set(values)) != len(values):
                raise ValueError(f"SyntheticConfig.{name} must be non-empty without repeats, got {values}")
        bad_defects = [d for d in self.defects if d not in DEFECTS]
        if bad_defects:
            raise ValueError(f"SyntheticConfig: unknown defects {bad_defects}; expected names from {DEFECTS}")
        if self.image_size < 32:
            raise ValueError(f"SyntheticConfig.image_size must be >= 32, got {self.image_size}")
        for name in ("n_train_normal", "n_test_normal", "n_test_anomalous"):
            if getattr(self, name) < 1:
                raise ValueError(f"SyntheticConfig.{name} must be >= 1, got {getattr(self, name)}")


# --- class renderers -------------------------------------------------------------------------------------


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) coordinates in [0, 1), each (size, size)."""
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size
    return np.meshgrid(coords, coords, indexing="ij")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a `cells` x `cells` random grid upsampled bicubically to (size, size)."""
    coarse = Image.fromarray(rng.random((cells, cells)).astype(np.float32), mode="F")
    return np.clip(np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64), 0, 1)


def _jitter_colour(rng: np.random.Generator, colour: tuple[int, int, int], spread: float = 18) -> np.ndarray:
    return np.clip(np.asarray(colour, dtype=np.float64) + rng.normal(0, spread, 3), 0, 255)


def _blend(value: np.ndarray, dark: np.ndarray, light: np.ndarray) -> np.ndarray:
    """Map a (H, W) value in [0, 1] onto the colour ramp dark -> light, (H, W, 3)."""
    return dark + value[..., None] * (light - dark)


def _fabric(rng: np.random.Generator, size: int) -> Rendered:
    """Woven texture: alternating warp and weft threads on a checker of cells, with fibre noise."""
    rows, cols = _grid(size)
    freq = rng.uniform(10, 14)
    warp = 0.5 + 0.5 * np.sin(2 * np.pi * freq * 2 * cols + rng.uniform(0, 2 * np.pi))
    weft = 0.5 + 0.5 * np.sin(2 * np.pi * freq * 2 * rows + rng.uniform(0, 2 * np.pi))
    checker = (np.floor(freq * rows) + np.floor(freq * cols)) % 2 == 0
    value = 0.65 * np.where(checker, warp, weft) + 0.35 * rng.random((size, size))
    colour = _jitter_colour(rng, (70, 90, 150))
    return _blend(value, colour * 0.45, np.minimum(colour * 1.5, 255)), None, None


def _marble(rng: np.random.Generator, size: int) -> Rendered:
    """Marble: light stone with dark veins, a sine pattern bent by smooth noise."""
    rows, cols = _grid(size)
    angle = rng.uniform(0, np.pi)
    along = rows * np.cos(angle) + cols * np.sin(angle)
    veins = np.abs(np.sin(2 * np.pi * 2.5 * along + 7 * _smooth_noise(rng, size, 5)))
    value = 0.75 * veins**0.35 + 0.15 * _smooth_noise(rng, size, 12) + 0.1 * rng.random((size, size))
    return (
        _blend(value, _jitter_colour(rng, (70, 70, 80)), _jitter_colour(rng, (235, 230, 220), 8)),
        None,
        None,
    )


def _planks(rng: np.random.Generator, size: int) -> Rendered:
    """Wood planks: horizontal growth rings with grain noise and dark joints between planks."""
    rows, cols = _grid(size)
    rings = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(14, 20) * (rows + 0.04 * _smooth_noise(rng, size, 6)))
    value = 0.55 * rings + 0.25 * _smooth_noise(rng, size, 20) + 0.2 * rng.random((size, size))
    plank_height = size // 4
    joints = (np.arange(size) + int(rng.integers(plank_height))) % plank_height < 2
    value[joints, :] *= 0.3
    return (
        _blend(value, _jitter_colour(rng, (80, 45, 20), 10), _jitter_colour(rng, (200, 150, 95), 10)),
        None,
        None,
    )


def _mesh(rng: np.random.Generator, size: int) -> Rendered:
    """Wire mesh: a regular grid of bright wires over a dark, noisy backing."""
    period = int(rng.integers(9, 13))
    offset_rows, offset_cols = rng.integers(period, size=2)
    index = np.arange(size)
    wire_rows = (index + offset_rows) % period < 2
    wire_cols = (index + offset_cols) % period < 2
    wires = wire_rows[:, None] | wire_cols[None, :]
    value = np.where(wires, 0.85, 0.15) + 0.15 * rng.random((size, size))
    return (
        _blend(
            np.clip(value, 0, 1),
            _jitter_colour(rng, (25, 30, 35), 6),
            _jitter_colour(rng, (200, 205, 210), 10),
        ),
        None,
        None,
    )


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Plain studio background: a soft gradient with sensor noise, (size, size, 3)."""
    rows, cols = _grid(size)
    shade = 0.85 + 0.15 * (rows * rng.uniform(-1, 1) + cols * rng.uniform(-1, 1))
    base = _jitter_colour(rng, (150, 155, 150), 12)
    return np.clip(base * shade[..., None] + rng.normal(0, 3, (size, size, 1)), 0, 255)


def _shaded(
    shape: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    centre: np.ndarray,
    colour: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Metallic shading of an object: a light coming from a random direction, (H, W, 3)."""
    light = rng.uniform(0, 2 * np.pi)
    facing = (rows - centre[0]) * np.sin(light) + (cols - centre[1]) * np.cos(light)
    value = 0.75 + 1.2 * facing + 0.05 * rng.standard_normal(shape.shape)
    return np.clip(colour * value[..., None], 0, 255)


def _object(
    rng: np.random.Generator,
    size: int,
    draw_shape: Callable[[ImageDraw.ImageDraw, np.ndarray, float, float], None],
    colour: tuple[int, int, int],
) -> Rendered:
    """Render an object: `draw_shape(draw, centre_px, radius_px, angle)` paints its silhouette in white."""
    rows, cols = _grid(size)
    centre = 0.5 + rng.uniform(-0.05, 0.05, 2)
    radius = size * rng.uniform(0.27, 0.33)
    silhouette = Image.new("L", (size, size), 0)
    draw_shape(ImageDraw.Draw(silhouette), centre * size, radius, rng.uniform(0, 2 * np.pi))
    shape = np.asarray(silhouette) > 0
    background = _background(rng, size)
    body = _shaded(shape, rows, cols, centre, _jitter_colour(rng, colour, 10), rng)
    return np.where(shape[..., None], body, background), shape, background


def _circle(draw: ImageDraw.ImageDraw, centre: np.ndarray, radius: float, fill: int) -> None:
    row, col = centre
    draw.ellipse((col - radius, row - radius, col + radius, row + radius), fill=fill)


def _polygon(centre: np.ndarray, radius: float, angle: float, corners: int) -> list[tuple[float, float]]:
    turns = angle + 2 * np.pi * np.arange(corners) / corners
    return [(centre[1] + radius * np.cos(t), centre[0] + radius * np.sin(t)) for t in turns]


def _washer_shape(draw: ImageDraw.ImageDraw, centre: np.ndarray, radius: float, angle: float) -> None:
    _circle(draw, centre, radius, 255)
    _circle(draw, centre, radius * 0.45, 0)


def _nut_shape(draw: ImageDraw.ImageDraw, centre: np.ndarray, radius: float, angle: float) -> None:
    draw.polygon(_polygon(centre, radius, angle, 6), fill=255)
    _circle(draw, centre, radius * 0.4, 0)


def _coin_shape(draw: ImageDraw.ImageDraw, centre: np.ndarray, radius: float, angle: float) -> None:
    _circle(draw, centre, radius, 255)
    _circle(draw, centre, radius * 0.85, 0)
    _circle(draw, centre, radius * 0.8, 255)  # a thin groove inside the rim
    draw.polygon(_polygon(centre, radius * 0.4, angle, 5), fill=0)  # a pentagonal cut-out in the face


def _bolt_shape(draw: ImageDraw.ImageDraw, centre: np.ndarray, radius: float, angle: float) -> None:
    direction = np.array([np.sin(angle), np.cos(angle)])  # (row, col) unit vector along the shaft
    normal = np.array([direction[1], -direction[0]])
    head_centre = centre - direction * radius * 0.75
    draw.polygon(_polygon(head_centre, radius * 0.4, angle, 6), fill=255)
    for step in range(9):  # threaded shaft: slightly wider crests every other step
        half_width = radius * (0.2 if step % 2 else 0.16)
        start = head_centre + direction * radius * (0.3 + 0.15 * step)
        end = start + direction * radius * 0.15
        corners = [
            start + normal * half_width,
            end + normal * half_width,
            end - normal * half_width,
            start - normal * half_width,
        ]
        draw.polygon([(c[1], c[0]) for c in corners], fill=255)


SYNTHETIC_CLASSES: dict[str, tuple[str, Callable[[np.random.Generator, int], Rendered]]] = {
    "fabric": ("texture", _fabric),
    "marble": ("texture", _marble),
    "planks": ("texture", _planks),
    "mesh": ("texture", _mesh),
    "washer": ("object", lambda rng, size: _object(rng, size, _washer_shape, (170, 170, 175))),
    "nut": ("object", lambda rng, size: _object(rng, size, _nut_shape, (120, 125, 135))),
    "coin": ("object", lambda rng, size: _object(rng, size, _coin_shape, (200, 160, 60))),
    "bolt": ("object", lambda rng, size: _object(rng, size, _bolt_shape, (110, 110, 120))),
}
"""Class name -> ("texture" or "object", renderer)."""


# --- defects ---------------------------------------------------------------------------------------------


def _random_point(rng: np.random.Generator, allowed: np.ndarray, margin: int) -> np.ndarray:
    """A random (row, col) inside `allowed`, at least `margin` pixels from the border if possible."""
    inner = allowed.copy()
    inner[:margin, :] = inner[-margin:, :] = inner[:, :margin] = inner[:, -margin:] = False
    candidates = np.argwhere(inner if inner.any() else allowed)
    return candidates[rng.integers(len(candidates))].astype(np.float64)


def _draw_region(size: int, paint: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    paint(ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 0


def _contrasting(image: np.ndarray) -> np.ndarray:
    """Per pixel, a colour far from the original: dark pixels become light and light ones dark."""
    luminance = image.mean(axis=-1, keepdims=True)
    return np.where(luminance > 110, image * 0.25, image * 0.3 + 180)


def _scratch(
    rng: np.random.Generator, image: np.ndarray, allowed: np.ndarray, background: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """A thin, slightly curved line in a contrasting colour."""
    size = image.shape[0]
    start = _random_point(rng, allowed, size // 8)
    angle = rng.uniform(0, np.pi)
    length = size * rng.uniform(0.2, 0.35)
    bend = rng.normal(0, 0.25)
    points = [
        start + length * t * np.array([np.sin(angle + bend * t), np.cos(angle + bend * t)])
        for t in np.linspace(0, 1, 6)
    ]
    width = int(rng.integers(1, 3))
    region = _draw_region(size, lambda d: d.line([(p[1], p[0]) for p in points], fill=255, width=width))
    return region & allowed, _contrasting(image)


def _hole(
    rng: np.random.Generator, image: np.ndarray, allowed: np.ndarray, background: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """A dark elliptic hole."""
    size = image.shape[0]
    centre = _random_point(rng, allowed, size // 8)
    radii = size * rng.uniform(0.035, 0.07, 2)
    box = (centre[1] - radii[1], centre[0] - radii[0], centre[1] + radii[1], centre[0] + radii[0])
    region = _draw_region(size, lambda d: d.ellipse(box, fill=255))
    depth = np.clip(15 + rng.normal(0, 4, image.shape), 0, 255)  # the dark inside of the hole
    return region & allowed, depth


def _stain(
    rng: np.random.Generator, image: np.ndarray, allowed: np.ndarray, background: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """An irregular blob tinted with the stain colour farthest from the local colour."""
    size = image.shape[0]
    centre = _random_point(rng, allowed, size // 8)
    rows, cols = _grid(size)
    distance = np.hypot(rows * size - centre[0], cols * size - centre[1]) / (size * rng.uniform(0.06, 0.11))
    region = distance + 0.6 * _smooth_noise(rng, size, 10) < 1.0
    tints = np.array([(95, 60, 20), (25, 25, 25), (150, 25, 25), (40, 90, 40)], dtype=np.float64)
    local = image[region & allowed].mean(axis=0) if (region & allowed).any() else image.mean(axis=(0, 1))
    tint = tints[np.argmax(np.abs(tints - local).sum(axis=1))]
    return region & allowed, image * 0.35 + tint * 0.65


def _crack(
    rng: np.random.Generator, image: np.ndarray, allowed: np.ndarray, background: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """A dark jagged line (random walk) with one branch."""
    size = image.shape[0]
    position = _random_point(rng, allowed, size // 8)
    heading = rng.uniform(0, 2 * np.pi)
    trunk = [position]
    for _ in range(int(rng.integers(6, 10))):
        heading += rng.normal(0, 0.6)
        position = position + size * 0.035 * np.array([np.sin(heading), np.cos(heading)])
        trunk.append(position)
    fork = trunk[len(trunk) // 2]
    branch_heading = heading + rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.2)
    branch = [fork, fork + size * 0.08 * np.array([np.sin(branch_heading), np.cos(branch_heading)])]

    def paint(draw: ImageDraw.ImageDraw) -> None:
        draw.line([(p[1], p[0]) for p in trunk], fill=255, width=2)
        draw.line([(p[1], p[0]) for p in branch], fill=255, width=1)

    return _draw_region(size, paint) & allowed, image * 0.2


def _missing_piece(
    rng: np.random.Generator, image: np.ndarray, allowed: np.ndarray, background: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """A chunk removed: the flat backing shows (textures) or a bite of the outline shows the background (objects)."""
    size = image.shape[0]
    if background is None:  # texture: the material is gone, the flat backing board shows
        centre = _random_point(rng, allowed, size // 6)
        corners = _polygon(
            centre, size * rng.uniform(0.07, 0.12), rng.uniform(0, 2 * np.pi), int(rng.integers(3, 6))
        )
        region = _draw_region(size, lambda d: d.polygon(corners, fill=255))
        backing = np.full(image.shape, 255.0 if image.mean() < 110 else 10.0)
        return region, backing
    # object: a bite taken out of its outline shows the background
    interior = allowed.copy()
    interior[1:] &= allowed[:-1]
    interior[:-1] &= allowed[1:]
    interior[:, 1:] &= allowed[:, :-1]
    interior[:, :-1] &= allowed[:, 1:]
    edge = allowed & ~interior
    centre = _random_point(rng, edge if edge.any() else allowed, size // 8)
    radius = size * rng.uniform(0.07, 0.11)
    region = _draw_region(size, lambda d: _circle(d, centre, radius, 255))
    return region & allowed, background


# painter(rng, image, allowed, background) -> (region to change (H, W) bool, new pixel values (H, W, 3))
DEFECT_PAINTERS = {
    "scratch": _scratch,
    "hole": _hole,
    "stain": _stain,
    "crack": _crack,
    "missing_piece": _missing_piece,
}


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def add_defect(
    rng: np.random.Generator,
    defect: str,
    image: np.ndarray,
    object_mask: np.ndarray | None,
    background: np.ndarray | None,
    min_pixels: int = 12,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect into a normal image.

    Args:
        rng: random generator (consumed).
        defect: one of `DEFECTS`.
        image: (H, W, 3) uint8 normal image.
        object_mask: (H, W) bool object silhouette (defects stay on it), None for textures.
        background: (H, W, 3) what lies behind the object (shown by "missing_piece"), None for textures.
        min_pixels: the defect is redrawn until at least this many pixels change.

    Returns:
        The (H, W, 3) uint8 anomalous image and its (H, W) bool mask, True exactly where a pixel changed.
    """
    allowed = np.ones(image.shape[:2], dtype=bool) if object_mask is None else object_mask
    original = image.astype(np.float64)
    for _ in range(20):
        region, new_values = DEFECT_PAINTERS[defect](rng, original, allowed, background)
        anomalous = np.where(region[..., None], _to_uint8(new_values), image)
        changed = (anomalous != image).any(axis=-1)
        if changed.sum() >= min_pixels:
            return anomalous, changed
    raise RuntimeError(f"synthetic defect {defect!r}: fewer than {min_pixels} pixels changed in 20 tries")


# --- writing the datasets --------------------------------------------------------------------------------


def _image_rng(seed: int, class_name: str, split: str, defect: str, index: int) -> np.random.Generator:
    """Generator for one image, a function of its identity only (not of the order of generation)."""
    key = [zlib.crc32(text.encode()) for text in (class_name, split, defect)]
    return np.random.default_rng([seed, *key, index])


def _render_normal(rng: np.random.Generator, class_name: str, size: int) -> Rendered:
    _, renderer = SYNTHETIC_CLASSES[class_name]
    image, object_mask, background = renderer(rng, size)
    return _to_uint8(image), object_mask, background


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", compress_level=1)  # fast; lossless all the same


def _write_class(folder: Path, class_name: str, config: SyntheticConfig) -> int:
    """Write one class in MVTec layout; returns the number of files written."""
    size, seed, count = config.image_size, config.seed, 0
    for split, n_images in (("train", config.n_train_normal), ("test", config.n_test_normal)):
        for index in range(n_images):
            image, _, _ = _render_normal(_image_rng(seed, class_name, split, "good", index), class_name, size)
            _save_png(image, folder / split / "good" / f"{index:03d}.png")
            count += 1
    for number in range(config.n_test_anomalous):
        defect = config.defects[number % len(config.defects)]
        index = number // len(config.defects)
        rng = _image_rng(seed, class_name, "test", defect, index)
        anomalous, mask = add_defect(rng, defect, *_render_normal(rng, class_name, size))
        _save_png(anomalous, folder / "test" / defect / f"{index:03d}.png")
        _save_png(mask.astype(np.uint8) * 255, folder / "ground_truth" / defect / f"{index:03d}_mask.png")
        count += 2
    return count


def _stamp(group: str, classes: tuple[str, ...], config: SyntheticConfig, n_files: int) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "group": group,
        "classes": list(classes),
        "config": asdict(config),
        "n_files": n_files,
    }


def _is_complete(dataset_root: Path, expected: dict) -> bool:
    stamp_path = dataset_root / STAMP_NAME
    if not stamp_path.is_file():
        return False
    try:
        stamp = json.loads(stamp_path.read_text())
    except json.JSONDecodeError:
        return False
    n_files = sum(1 for _ in dataset_root.rglob("*.png"))
    return stamp == json.loads(json.dumps(expected)) and n_files == expected["n_files"]


def _expected_files(config: SyntheticConfig, classes: tuple[str, ...]) -> int:
    return len(classes) * (config.n_train_normal + config.n_test_normal + 2 * config.n_test_anomalous)


def make_synthetic(root: str | Path, config: SyntheticConfig | None = None) -> dict[str, Path]:
    """Write (or reuse) the auxiliary and target synthetic datasets under `root`.

    A dataset folder whose stamp (`synthetic.json`) records the same config and generator version, and
    that holds all its files, is kept as is. Otherwise it is regenerated: written to a temporary folder
    beside it, then moved into place, so an interrupted run never leaves a half-written dataset behind.

    Args:
        root: parent folder; receives `synth-aux/` and `synth-target/`.
        config: what to generate (defaults to `SyntheticConfig()`).

    Returns:
        {"synth-aux": <root>/synth-aux, "synth-target": <root>/synth-target}: dataset name -> absolute
        folder; pass the name as `dataset=` to `read_mvtec`.

    Raises:
        LayoutError: a target folder exists, is not empty and is not a synthetic dataset (it is never
            overwritten).
    """
    config = config or SyntheticConfig()
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    roots: dict[str, Path] = {}
    for group, classes in ((AUX_DATASET, config.aux_classes), (TARGET_DATASET, config.target_classes)):
        dataset_root = root / group
        roots[group] = dataset_root
        expected = _stamp(group, classes, config, _expected_files(config, classes))
        if _is_complete(dataset_root, expected):
            continue
        if (
            dataset_root.exists()
            and any(dataset_root.iterdir())
            and not (dataset_root / STAMP_NAME).is_file()
        ):
            raise LayoutError(
                f"{dataset_root}: folder exists and is not a zsadkit synthetic dataset (no {STAMP_NAME}); "
                "expected an empty or synthetic folder, refusing to overwrite it"
            )
        staging = Path(tempfile.mkdtemp(prefix=f".{group}-", dir=root))
        try:
            n_files = sum(_write_class(staging / name, name, config) for name in classes)
            (staging / STAMP_NAME).write_text(
                json.dumps(_stamp(group, classes, config, n_files), indent=1) + "\n"
            )
            if _is_complete(dataset_root, expected):  # another process finished the same dataset meanwhile
                continue
            if dataset_root.exists():
                shutil.rmtree(dataset_root)
            try:
                os.replace(staging, dataset_root)
            except OSError:
                if not _is_complete(dataset_root, expected):
                    raise
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    return roots
