"""The concept world: concepts with synonyms, caption templates and a deterministic renderer.

Every image is fully described by a :class:`Scene` (shape, colour, texture, background, position,
size, rotation), so a caption can be checked against what is drawn and a judge can be trained on
exact labels. Synonyms such as "circle" / "round disc" give paraphrases that share no token with
the concept name, which is what Facilitated Transport has to cope with.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

KINDS: tuple[str, ...] = ("shape", "colour", "texture")


@dataclass(frozen=True)
class Concept:
    """One concept of the world; ``synonyms[0]`` is the concept's own name."""

    name: str
    kind: str
    synonyms: tuple[str, ...]


SHAPES: tuple[Concept, ...] = (
    Concept("circle", "shape", ("circle", "round disc", "disk")),
    Concept("square", "shape", ("square", "box", "block")),
    Concept("triangle", "shape", ("triangle", "wedge", "three-sided figure")),
    Concept("star", "shape", ("star", "five-pointed star", "pentagram")),
    Concept("cross", "shape", ("cross", "plus sign", "plus")),
    Concept("crescent", "shape", ("crescent", "moon shape", "sickle")),
)
COLOURS: tuple[Concept, ...] = (
    Concept("red", "colour", ("red", "crimson", "scarlet")),
    Concept("orange", "colour", ("orange", "tangerine", "amber")),
    Concept("yellow", "colour", ("yellow", "golden", "lemon")),
    Concept("green", "colour", ("green", "emerald", "jade")),
    Concept("blue", "colour", ("blue", "azure", "cobalt")),
    Concept("purple", "colour", ("purple", "violet", "lilac")),
)
TEXTURES: tuple[Concept, ...] = (
    Concept("solid", "texture", ("solid", "plain", "filled")),
    Concept("striped", "texture", ("striped", "stripy", "banded")),
    Concept("dotted", "texture", ("dotted", "spotted", "polka-dot")),
)
ALL_CONCEPTS: tuple[Concept, ...] = SHAPES + COLOURS + TEXTURES

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 30),
    "orange": (250, 135, 10),
    "yellow": (240, 225, 35),
    "green": (35, 175, 45),
    "blue": (35, 75, 225),
    "purple": (140, 40, 190),
}
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "black": (12, 12, 12),
    "grey": (95, 95, 95),
    "white": (245, 245, 245),
}

# Caption grammar: an outer template around a noun phrase. The noun phrase names the shape (or
# just "shape" when the shape is not named) with optional colour and texture adjectives.
OUTER_TEMPLATES: tuple[str, ...] = (
    "a {np}",
    "a photo of a {np}",
    "a picture of a {np}",
    "an image of a {np}",
    "a drawing of a {np}",
    "{np}",
    "a {np} on a {bg} background",
)
NP_FORMS: tuple[str, ...] = (
    "{c} {t} {s}",
    "{t} {c} {s}",
    "{t} {s} in {c}",
    "{c} {s} that is {t}",
)
_HELD_OUT_MODULUS = 5


@dataclass(frozen=True)
class Scene:
    """Everything that determines one render."""

    shape: str
    colour: str
    texture: str
    background: str
    cx: float
    cy: float
    radius: float
    angle: float


@dataclass(frozen=True)
class Caption:
    """A caption and the attributes it names (``None`` = not named, drawn at random)."""

    text: str
    shape: str | None
    colour: str | None
    texture: str | None
    held_out: bool = False

    def named(self) -> dict[str, str]:
        """The attributes this caption names, by kind."""
        return {k: v for k, v in zip(KINDS, (self.shape, self.colour, self.texture)) if v is not None}


@dataclass(frozen=True)
class CaptionChoice:
    """The grammar choices behind a full caption; the held-out split is a rule on them."""

    outer: int
    np_form: int
    shape_syn: int
    colour_syn: int
    texture_syn: int

    @property
    def held_out(self) -> bool:
        """About one combination in five is held out; every template and synonym stays in training."""
        key = 7 * self.outer + 3 * self.np_form + 5 * self.shape_syn + 11 * self.colour_syn
        return (key + 13 * self.texture_syn) % _HELD_OUT_MODULUS == 0


def _polygon_inside(x: np.ndarray, y: np.ndarray, vertices: Sequence[tuple[float, float]]) -> np.ndarray:
    """Inside test for a polygon that is star-shaped around the origin (triangle, square, star)."""
    theta = np.arctan2(y, x)
    rho = np.hypot(x, y)
    verts = np.asarray(vertices, dtype=np.float64)
    angles = np.arctan2(verts[:, 1], verts[:, 0])
    order = np.argsort(angles)
    verts, angles = verts[order], angles[order]
    inside = np.zeros_like(rho, dtype=bool)
    n = len(verts)
    for i in range(n):
        p1, p2 = verts[i], verts[(i + 1) % n]
        a1, a2 = angles[i], angles[(i + 1) % n]
        span = (a2 - a1) % (2 * math.pi)
        in_sector = ((theta - a1) % (2 * math.pi)) <= span
        edge = p2 - p1
        cross_p1 = p1[0] * edge[1] - p1[1] * edge[0]
        cross_dir = np.cos(theta) * edge[1] - np.sin(theta) * edge[0]
        with np.errstate(divide="ignore", invalid="ignore"):
            boundary = np.where(np.abs(cross_dir) > 1e-9, cross_p1 / cross_dir, np.inf)
        inside |= in_sector & (rho <= boundary)
    return inside


def _regular(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
    return [(radius * math.cos(phase + 2 * math.pi * k / n), radius * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


_STAR = [
    v
    for k in range(5)
    for v in (
        _regular(5, 1.05, math.pi / 2)[k],
        (0.45 * math.cos(math.pi / 2 + math.pi / 5 + 2 * math.pi * k / 5), 0.45 * math.sin(math.pi / 2 + math.pi / 5 + 2 * math.pi * k / 5)),
    )
]
_TRIANGLE = [(0.0, 1.0), (-1.0, -0.72), (1.0, -0.72)]
_SQUARE = [(0.82, 0.82), (-0.82, 0.82), (-0.82, -0.82), (0.82, -0.82)]


def shape_mask(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Inside test in shape coordinates (unit radius, y up)."""
    if shape == "circle":
        return x * x + y * y <= 0.92
    if shape == "square":
        return _polygon_inside(x, y, _SQUARE)
    if shape == "triangle":
        return _polygon_inside(x, y, _TRIANGLE)
    if shape == "star":
        return _polygon_inside(x, y, _STAR)
    if shape == "cross":
        return ((np.abs(x) <= 0.3) & (np.abs(y) <= 0.95)) | ((np.abs(y) <= 0.3) & (np.abs(x) <= 0.95))
    if shape == "crescent":
        return (x * x + y * y <= 0.95) & ((x - 0.45) ** 2 + (y - 0.15) ** 2 > 0.55)
    raise ValueError(f"unknown shape {shape!r}")


@dataclass
class ConceptWorld:
    """A world made of a subset of the concepts; the default is the full world.

    Tests use a reduced world (fewer shapes, colours and textures) so that training is quick.
    """

    shapes: tuple[str, ...] = tuple(c.name for c in SHAPES)
    colours: tuple[str, ...] = tuple(c.name for c in COLOURS)
    textures: tuple[str, ...] = tuple(c.name for c in TEXTURES)
    backgrounds: tuple[str, ...] = tuple(BACKGROUND_RGB)
    image_size: int = 32
    supersample: int = 2
    _by_name: dict[str, Concept] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {c.name: c for c in ALL_CONCEPTS}
        for name in (*self.shapes, *self.colours, *self.textures):
            if name not in self._by_name:
                raise ValueError(f"unknown concept {name!r}")
        for name in self.backgrounds:
            if name not in BACKGROUND_RGB:
                raise ValueError(f"unknown background {name!r}")

    # ----------------------------------------------------------------- concepts
    def names(self, kind: str) -> tuple[str, ...]:
        """Concept names of one kind, in label order."""
        return {"shape": self.shapes, "colour": self.colours, "texture": self.textures}[kind]

    @property
    def concepts(self) -> tuple[Concept, ...]:
        """All concepts of this world: shapes, then colours, then textures."""
        return tuple(self._by_name[n] for kind in KINDS for n in self.names(kind))

    def concept(self, name: str) -> Concept:
        """Look a concept up by its name (not by a synonym)."""
        if name not in (*self.shapes, *self.colours, *self.textures):
            raise KeyError(f"{name!r} is not a concept of this world")
        return self._by_name[name]

    def label(self, kind: str, name: str) -> int:
        """The class index of a concept for the judge head of its kind."""
        return self.names(kind).index(name)

    # ------------------------------------------------------------------ scenes
    def sample_scene(self, rng: np.random.Generator, **fixed: str) -> Scene:
        """A random scene; ``fixed`` pins any of shape / colour / texture / background."""
        pick = {
            "shape": self.shapes,
            "colour": self.colours,
            "texture": self.textures,
            "background": self.backgrounds,
        }
        attrs = {k: fixed.get(k) or options[rng.integers(len(options))] for k, options in pick.items()}
        radius = float(rng.uniform(0.42, 0.62))
        margin = radius * 0.9
        return Scene(
            **attrs,
            cx=float(rng.uniform(-1 + margin, 1 - margin)),
            cy=float(rng.uniform(-1 + margin, 1 - margin)),
            radius=radius,
            angle=float(rng.uniform(-0.25, 0.25)),
        )

    def render(self, scene: Scene) -> np.ndarray:
        """Render a scene to an (H, W, 3) float32 array in [0, 1]; pure function of the scene."""
        n = self.image_size * self.supersample
        coords = (np.arange(n) + 0.5) / n * 2 - 1
        gx, gy = np.meshgrid(coords, -coords)
        cos_a, sin_a = math.cos(scene.angle), math.sin(scene.angle)
        dx, dy = gx - scene.cx, gy - scene.cy
        sx = (cos_a * dx + sin_a * dy) / scene.radius
        sy = (-sin_a * dx + cos_a * dy) / scene.radius
        outer = shape_mask(scene.shape, sx, sy)
        outline_px = 1.1 * 2 / self.image_size / scene.radius
        inner = shape_mask(scene.shape, sx / (1 - outline_px), sy / (1 - outline_px))

        colour = np.asarray(COLOUR_RGB[scene.colour], dtype=np.float32) / 255
        tint = 0.38 * colour + 0.62
        px, py = (gx + 1) / 2 * self.image_size, (1 - gy) / 2 * self.image_size
        if scene.texture == "solid":
            pattern = np.ones_like(gx, dtype=bool)
        elif scene.texture == "striped":
            pattern = ((px + py) / 3.0).astype(int) % 2 == 0
        elif scene.texture == "dotted":
            period = 5.0
            ox, oy = px % period - period / 2, py % period - period / 2
            pattern = ox * ox + oy * oy <= 1.15**2
        else:
            raise ValueError(f"unknown texture {scene.texture!r}")

        image = np.empty((n, n, 3), dtype=np.float32)
        image[:] = np.asarray(BACKGROUND_RGB[scene.background], dtype=np.float32) / 255
        fill = np.where(pattern[..., None], colour, tint)
        image[inner] = fill[inner]
        image[outer & ~inner] = colour
        s = self.supersample
        return image.reshape(self.image_size, s, self.image_size, s, 3).mean(axis=(1, 3))

    def render_batch(self, scenes: Sequence[Scene]) -> np.ndarray:
        """Render several scenes to an (N, H, W, 3) float32 array."""
        return np.stack([self.render(s) for s in scenes])

    # ---------------------------------------------------------------- captions
    def caption_choices(self, held_out: bool | None = None) -> list[CaptionChoice]:
        """All grammar choices for a full caption; ``held_out`` filters to one split."""
        n_syn = len(SHAPES[0].synonyms)
        out = [
            CaptionChoice(o, f, a, b, c)
            for o in range(len(OUTER_TEMPLATES))
            for f in range(len(NP_FORMS))
            for a in range(n_syn)
            for b in range(n_syn)
            for c in range(n_syn)
        ]
        return [ch for ch in out if held_out is None or ch.held_out == held_out]

    def format_caption(
        self,
        choice: CaptionChoice,
        shape: str | None,
        colour: str | None,
        texture: str | None,
        background: str = "black",
    ) -> Caption:
        """Build a caption; an attribute given as ``None`` is left out of the text."""
        s = self._by_name[shape].synonyms[choice.shape_syn] if shape else "shape"
        c = self._by_name[colour].synonyms[choice.colour_syn] if colour else ""
        t = self._by_name[texture].synonyms[choice.texture_syn] if texture else ""
        form = NP_FORMS[choice.np_form]
        if not colour:
            form = form.replace(" in {c}", "")
        if not texture:
            form = form.replace(" that is {t}", "")
        noun_phrase = " ".join(form.format(s=s, c=c, t=t).split())
        text = OUTER_TEMPLATES[choice.outer].format(np=noun_phrase, bg=background)
        text = re.sub(r"\ba ([aeiou])", r"an \1", text)
        full = shape is not None and colour is not None and texture is not None
        return Caption(text, shape, colour, texture, held_out=full and choice.held_out)

    def sample_caption(
        self,
        scene: Scene,
        rng: np.random.Generator,
        split: str = "train",
        drop_prob: float = 0.0,
    ) -> Caption:
        """A caption for ``scene`` from the given split ("train", "heldout" or "any").

        With ``drop_prob`` > 0 each attribute is left out with that probability, which teaches the
        model that unnamed attributes are free. Partial captions always count as training captions.
        """
        named = [None if rng.random() < drop_prob else v for v in (scene.shape, scene.colour, scene.texture)]
        full = all(v is not None for v in named)
        pool_split = {"train": False, "heldout": True, "any": None}[split]
        if split == "heldout" and not full:
            named = [scene.shape, scene.colour, scene.texture]
            full = True
        choices = self._choice_cache(pool_split if full else None)
        choice = choices[rng.integers(len(choices))]
        return self.format_caption(choice, *named, background=scene.background)

    def _choice_cache(self, held_out: bool | None) -> list[CaptionChoice]:
        cache = self.__dict__.setdefault("_choices", {})
        if held_out not in cache:
            cache[held_out] = self.caption_choices(held_out)
        return cache[held_out]

    def parse(self, text: str) -> dict[str, str]:
        """The concepts a caption names, by kind (longest synonym wins: "plus sign" before "plus")."""
        found: dict[str, str] = {}
        lowered = f" {text.lower()} "
        candidates = sorted(
            ((syn, c) for c in self.concepts for syn in c.synonyms), key=lambda item: -len(item[0])
        )
        for syn, concept in candidates:
            match = re.search(rf"(?<![\w-]){re.escape(syn)}(?![\w-])", lowered)
            if match and concept.kind not in found:
                found[concept.kind] = concept.name
                lowered = lowered[: match.start()] + " " * len(syn) + lowered[match.end() :]
        return found

    def prompts_naming(
        self,
        concept: str,
        n: int,
        rng: np.random.Generator,
        split: str = "heldout",
        avoid: Sequence[str] = (),
    ) -> list[tuple[Caption, Scene]]:
        """``n`` full captions that name ``concept`` (any synonym), with the scene each asks for.

        The other attributes are random but never one of ``avoid`` (e.g. other erased concepts).
        """
        kind = self.concept(concept).kind
        out = []
        for _ in range(n):
            fixed = {kind: concept}
            for other in KINDS:
                if other != kind:
                    options = [x for x in self.names(other) if x not in avoid]
                    fixed[other] = options[rng.integers(len(options))]
            scene = self.sample_scene(rng, **fixed)
            out.append((self.sample_caption(scene, rng, split=split), scene))
        return out
