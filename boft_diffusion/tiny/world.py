"""A tiny synthetic world of captioned shapes.

Pure and deterministic (numpy + Pillow only).  A :class:`Scene` is a background
colour plus one (mostly) or two shapes.  :func:`render` draws it as a 64x64 RGB
image, :func:`caption` describes it in a small fixed grammar::

    a red circle on a blue background
    a small green square at the top left on a yellow background
    an orange star and a white cross on a black background
    a red hexagon with white stripes on a green background

Grammar: ``<article> [small] <colour> <shape> [with <colour> stripes] [at the
<position>] on a <colour> background``; large shapes carry no size word,
centred shapes no position phrase; two-shape scenes list the left shape first
("... and ...").  The article is "an" before a vowel ("an orange circle").

Some (shape colour, shape, background colour) combinations are held out of the
pretraining distribution (:func:`is_held_out`) so that compositional
generalisation can be measured on :func:`held_out_scenes`.

Some single shapes carry diagonal stripes of a second colour, but stars,
triangles and diamonds are always solid.  The DreamBooth subjects (:data:`SUBJECTS`,
e.g. an orange star with purple stripes) are striped shapes of those classes:
every part of one is a concept the base model knows, the combination is one it has
never seen, as with a real DreamBooth subject.

World v4 (``version=4`` of :func:`training_scenes`, for the next embedded model) lets every
shape carry every pattern of :data:`PATTERNS` in any colour pair ("a red star with white
dots", "a blue cross with a yellow ring"), except the exact (shape, pattern, colour, colour2)
the caller holds out (``excluded``: ``subject_family.subject_combos()``, the DreamBooth
subjects), so that a subject is a new combination of known parts for every pattern, not only
for diagonal stripes.

World v3 trains on :func:`caption_variant`: the grammar above plus the forms people
and DreamBooth write ("a photo of star", "a picture of a sks red circle", "a
hexagon"), with attributes left out (then any value fits) and a descriptor slot
before the noun that holds, in some captions, a word from :data:`DESCRIPTOR_POOL`
(words with no visual meaning, the usual DreamBooth identifiers among them), so
the model learns to keep following the rest of a caption past an unknown word.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

IMAGE_SIZE = 64
_SS = 4  # supersampling factor used for anti-aliased rendering

#: Well separated palette (name -> RGB).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross", "hexagon")
SIZES: tuple[str, ...] = ("small", "large")
#: "center" is not mentioned in captions.
POSITIONS: tuple[str, ...] = ("center", "top left", "top right", "bottom left", "bottom right")

#: Stripe period in pixels along x (about 14 px across the diagonal stripes at
#: 64x64): 3.5 latent pixels of the tiny VAE, so stripes survive its 16x16 latents.
STRIPE_PERIOD = 20.0
#: Shapes that are never striped in the world (so the subjects stay new).
NEVER_STRIPED: tuple[str, ...] = ("star", "triangle", "diamond")
#: Two-colour patterns a DreamBooth subject may carry (``color`` is the base, ``color2`` the
#: pattern). Only "striped" (diagonal) occurs in pretraining; the others exist so that held-out
#: subjects (``subject_family.py``) test more than one kind of detail. Every feature is at least
#: 5 px wide, so it survives the tiny VAE's 4x downsampling.
PATTERNS: tuple[str, ...] = ("striped", "stripes_vertical", "stripes_horizontal", "stripes_antidiagonal", "dots",
                             "halves", "ring", "border")
#: Period of the axis-aligned stripes and of the dot lattice, in pixels: the diagonal stripes' own
#: spacing across the stripes (STRIPE_PERIOD / sqrt 2).
PATTERN_PERIOD = 14.0
#: Dot radius in pixels (a quarter of the lattice cell is dot).
DOT_RADIUS = 4.0
#: The world the embedded model was pretrained on; bumped whenever sampling, captions or rendering
#: change (pretraining caches use it).
WORLD_VERSION = 3
#: The worlds :func:`training_scenes` can sample.
WORLD_VERSIONS = (3, 4)
#: How a caption names a pattern after "with": "with white stripes", "with a white ring".
_PATTERN_PHRASES = {
    "striped": "{} stripes", "stripes_vertical": "{} vertical stripes", "stripes_horizontal": "{} horizontal stripes",
    "stripes_antidiagonal": "{} antidiagonal stripes", "dots": "{} dots", "halves": "a {} right half",
    "ring": "a {} ring", "border": "a {} border",
}

#: Openings a caption may start with ("" = none).
OPENINGS: tuple[str, ...] = ("", "a photo of", "a picture of", "an image of")
#: Identifier words DreamBooth users reach for; in a real model each is a trained token with a weak meaning.
IDENTIFIER_WORDS: tuple[str, ...] = ("sks", "ohwx", "zwx", "qwe", "xyz")
#: Words that fill the descriptor slot in pretraining and mean nothing visual: the identifiers plus
#: made-up words, so no single word is special and the model learns the slot itself.
DESCRIPTOR_POOL: tuple[str, ...] = IDENTIFIER_WORDS + (
    "bnq", "vlk", "tyr", "plo", "mfx", "kze", "drw", "jup", "wtz", "hsk",
    "ghl", "rvn", "qzx", "fyb", "lmo", "cvk", "nxp", "yrt", "bkz", "twq",
    "zub", "kip", "vor", "jat", "mek", "dax", "pum", "wib", "sor", "fen",
)
#: In the tokenizer but never in a pretraining caption: measure robustness to words outside the pool.
UNSEEN_DESCRIPTORS: tuple[str, ...] = ("gzr", "vqm", "kjh", "xtw", "pyl", "brq", "dnv", "wuk")

_POS_CENTERS = {
    "center": (32.0, 32.0),
    "top left": (17.0, 17.0),
    "top right": (47.0, 17.0),
    "bottom left": (17.0, 47.0),
    "bottom right": (47.0, 47.0),
    "left": (18.0, 32.0),
    "right": (46.0, 32.0),
}


@dataclass(frozen=True)
class Shape:
    """One object: ``kind`` in SHAPES, ``color`` in COLORS, centre (cx, cy) and
    half-extent ``radius`` in pixels of the 64x64 image; ``position`` "free"
    (anywhere, not named in the caption) is used for control data.  ``pattern`` is
    "solid", "striped" (diagonal stripes alternate ``color`` and ``color2``; the only
    pattern of pretraining) or another of :data:`PATTERNS` (subjects only)."""

    kind: str
    color: str
    size: str = "large"
    position: str = "center"
    cx: float = 32.0
    cy: float = 32.0
    radius: float = 19.0
    pattern: str = "solid"
    color2: str | None = None


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...] = field(default_factory=tuple)

    @property
    def shape(self) -> Shape:
        return self.shapes[0]


# ----------------------------------------------------------------------------
# held-out combinations


def _combo_index(color: str, kind: str, background: str) -> int:
    return COLORS.index(color) * 7 + SHAPES.index(kind) * 3 + COLORS.index(background) * 5


def is_held_out_combo(color: str, kind: str, background: str) -> bool:
    """True for the (shape colour, shape, background colour) triples kept out of
    pretraining (about 1 in 11 of the valid triples; every colour, shape, and
    every (colour, shape) / (colour, background) / (shape, background) pair is
    still seen in training)."""
    if color == background:
        return False
    return _combo_index(color, kind, background) % 11 == 0


def held_out_combos() -> list[tuple[str, str, str]]:
    return [
        (c, s, b)
        for c in COLORS
        for s in SHAPES
        for b in COLORS
        if c != b and is_held_out_combo(c, s, b)
    ]


def is_held_out(scene: Scene) -> bool:
    """True if any shape of ``scene`` uses a held-out combination."""
    return any(is_held_out_combo(s.color, s.kind, scene.background) for s in scene.shapes)


# ----------------------------------------------------------------------------
# sampling


def _rng(seed_or_rng) -> np.random.Generator:
    if isinstance(seed_or_rng, np.random.Generator):
        return seed_or_rng
    return np.random.default_rng(seed_or_rng)


def _place(rng: np.random.Generator, kind: str, color: str, size: str, position: str) -> Shape:
    cx, cy = _POS_CENTERS[position]
    if size == "large":
        radius = float(rng.uniform(17.0, 21.0))
        jitter = 3.0
    else:
        radius = float(rng.uniform(8.5, 10.5))
        jitter = 2.0 if position != "center" else 3.0
    cx += float(rng.uniform(-jitter, jitter))
    cy += float(rng.uniform(-jitter, jitter))
    return Shape(kind=kind, color=color, size=size, position=position, cx=cx, cy=cy, radius=radius)


def make_scene(
    color: str,
    kind: str,
    background: str,
    size: str = "large",
    position: str = "center",
    rng=None,
) -> Scene:
    """Scene with one shape; the exact placement is jittered by ``rng`` (seed or
    Generator; None -> no jitter and mid-range radius)."""
    if color == background:
        raise ValueError("shape colour must differ from background colour")
    if size == "large" and position != "center":
        raise ValueError("large shapes are always centred")
    if rng is None:
        cx, cy = _POS_CENTERS[position]
        radius = 19.0 if size == "large" else 9.5
        shp = Shape(kind, color, size, position, cx, cy, radius)
    else:
        shp = _place(_rng(rng), kind, color, size, position)
    return Scene(background=background, shapes=(shp,))


def sample_scene(
    seed_or_rng=None,
    *,
    p_two: float = 0.15,
    p_small: float = 0.4,
    p_patterned: float = 0.25,
    allow_held_out: bool = False,
    held_out_only: bool = False,
    version: int = WORLD_VERSION,
    excluded: Collection[tuple[str, str, str, str]] = frozenset(),
) -> Scene:
    """Sample a scene.  By default (the pretraining sampler) held-out combinations
    are never returned; ``held_out_only`` returns solid single-shape held-out
    scenes.  A fraction ``p_patterned`` of single shapes carry a second colour: diagonal
    stripes on shapes other than :data:`NEVER_STRIPED` in world v3, any pattern on any shape
    but the (shape, pattern, colour, colour2) combinations in ``excluded`` in world v4."""
    if version not in WORLD_VERSIONS:
        raise ValueError(f"unknown world version {version}; known: {WORLD_VERSIONS}")
    rng = _rng(seed_or_rng)
    for _ in range(1000):
        bg = COLORS[rng.integers(len(COLORS))]
        others = [c for c in COLORS if c != bg]
        if held_out_only or rng.random() >= p_two:
            color = others[rng.integers(len(others))]
            kind = SHAPES[rng.integers(len(SHAPES))]
            if rng.random() < p_small:
                size = "small"
                position = POSITIONS[0] if rng.random() < 0.2 else POSITIONS[1 + rng.integers(4)]
            else:
                size, position = "large", "center"
            shape = _place(rng, kind, color, size, position)
            second = [c for c in others if c != color]
            if held_out_only:
                pass
            elif version == 3 and kind not in NEVER_STRIPED and rng.random() < p_patterned:
                shape = replace(shape, pattern="striped", color2=second[rng.integers(len(second))])
            elif version == 4 and rng.random() < p_patterned:
                pattern, color2 = PATTERNS[rng.integers(len(PATTERNS))], second[rng.integers(len(second))]
                if (kind, pattern, color, color2) in excluded:
                    continue
                shape = replace(shape, pattern=pattern, color2=color2)
            scene = Scene(bg, (shape,))
        else:
            shapes = []
            for pos in ("left", "right"):
                color = others[rng.integers(len(others))]
                kind = SHAPES[rng.integers(len(SHAPES))]
                cx, cy = _POS_CENTERS[pos]
                shapes.append(
                    Shape(
                        kind,
                        color,
                        "small",
                        pos,
                        cx + float(rng.uniform(-1.5, 1.5)),
                        cy + float(rng.uniform(-4.0, 4.0)),
                        float(rng.uniform(9.0, 11.0)),
                    )
                )
            scene = Scene(bg, tuple(shapes))
        held = is_held_out(scene)
        if held_out_only:
            if held:
                return scene
            continue
        if allow_held_out or not held:
            return scene
    raise RuntimeError("could not sample a scene")  # pragma: no cover


def training_scenes(
    n: int,
    seed: int = 0,
    p_patterned: float = 0.25,
    version: int = WORLD_VERSION,
    excluded: Collection[tuple[str, str, str, str]] | None = None,
) -> list[Scene]:
    """The pretraining scenes of world ``version``.  World v4 needs ``excluded``, the patterned
    (shape, pattern, colour, colour2) combinations it never draws, so no subject is forgotten."""
    if version >= 4 and excluded is None:
        raise ValueError("world v4 needs the subjects' combinations to hold out: "
                         "excluded=subject_family.subject_combos()")
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, p_patterned=p_patterned, version=version, excluded=excluded or frozenset())
            for _ in range(n)]


def held_out_scenes(n: int, seed: int = 1234, *, single_large: bool = False) -> list[Scene]:
    """``n`` single-shape scenes whose (colour, shape, background) combination is
    held out of pretraining.  Cycles through all held-out combinations so every
    combination is covered when ``n >= len(held_out_combos())``."""
    rng = np.random.default_rng(seed)
    combos = held_out_combos()
    order = rng.permutation(len(combos))
    scenes = []
    for i in range(n):
        c, s, b = combos[order[i % len(combos)]]
        if single_large or rng.random() >= 0.4:
            size, pos = "large", "center"
        else:
            size = "small"
            pos = POSITIONS[0] if rng.random() < 0.2 else POSITIONS[1 + rng.integers(4)]
        scenes.append(Scene(b, (_place(rng, s, c, size, pos),)))
    return scenes


def free_placement_scenes(n: int, seed: int = 0, *, held_out: bool = False) -> list[Scene]:
    """``n`` single solid shapes at any position and size (position "free"), for
    control: their captions name colour, shape and background but not where the
    shape is, so only a control map can place it.  ``held_out`` draws the
    (colour, shape, background) combinations kept out of pretraining."""
    rng = np.random.default_rng(seed)
    combos = held_out_combos()
    scenes = []
    while len(scenes) < n:
        if held_out:
            color, kind, background = combos[rng.integers(len(combos))]
        else:
            background = COLORS[rng.integers(len(COLORS))]
            color = COLORS[rng.integers(len(COLORS))]
            kind = SHAPES[rng.integers(len(SHAPES))]
            if color == background or is_held_out_combo(color, kind, background):
                continue
        radius = float(rng.uniform(8.5, 20.0))
        margin = radius + 1.0
        cx, cy = (float(rng.uniform(margin, IMAGE_SIZE - margin)) for _ in range(2))
        size = "small" if radius < 13.0 else "large"
        scenes.append(Scene(background, (Shape(kind, color, size, "free", cx, cy, radius),)))
    return scenes


# ----------------------------------------------------------------------------
# captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def pattern_phrase(s: Shape) -> list[str]:
    """The words that name the shape's pattern ("with white dots"); none for a solid shape."""
    if s.pattern == "solid":
        return []
    words = _PATTERN_PHRASES[s.pattern].format(s.color2).split()
    if words[0] == "a":
        words[0] = _article(s.color2)
    return ["with", *words]


def _shape_phrase(s: Shape, with_position: bool = True) -> str:
    words = ([s.size] if s.size == "small" else []) + [s.color, s.kind] + pattern_phrase(s)
    phrase = f"{_article(words[0])} {' '.join(words)}"
    if with_position and s.position not in ("center", "left", "right", "free"):
        phrase += f" at the {s.position}"
    return phrase


def caption(scene: Scene) -> str:
    """Caption in the world's grammar (see module docstring)."""
    if len(scene.shapes) == 1:
        body = _shape_phrase(scene.shapes[0])
    else:
        shapes = sorted(scene.shapes, key=lambda s: s.cx)
        body = " and ".join(_shape_phrase(s, with_position=False) for s in shapes)
    return f"{body} on {_article(scene.background)} {scene.background} background"


def _subject_phrase(s: Shape, rng: np.random.Generator, *, color: bool, descriptor: str | None,
                    article: bool) -> str:
    words = ["small"] if s.size == "small" else []
    noun = [s.kind]
    if color:
        noun = [s.color, s.kind] + pattern_phrase(s)
    if descriptor is not None:
        # DreamBooth writes "a sks star"; people also write "a sks red star" and "a red sks star"
        at = 1 if color and rng.random() < 0.5 else 0
        noun.insert(at, descriptor)
    words += noun
    return " ".join(([_article(words[0])] if article else []) + words)


def caption_variant(
    scene: Scene,
    rng=None,
    *,
    p_opening: float = 0.5,
    p_descriptor: float = 0.25,
    p_drop_color: float = 0.15,
    p_drop_background: float = 0.15,
    p_drop_position: float = 0.1,
    descriptors: Sequence[str] = DESCRIPTOR_POOL,
) -> str:
    """A caption of ``scene`` in one of the forms people and DreamBooth write.

    An opening from :data:`OPENINGS` (after which the article is optional), a
    descriptor word before the noun (meaning nothing), and the shape colour, the
    background or the position left out, each at the given rate. A caption that
    leaves an attribute out fits any value of it. Two-shape scenes only vary the
    opening.
    """
    rng = _rng(rng)
    opening = OPENINGS[1 + rng.integers(len(OPENINGS) - 1)] if rng.random() < p_opening else ""
    if len(scene.shapes) != 1:
        return f"{opening} {caption(scene)}".strip()
    shp = scene.shape
    descriptor = descriptors[rng.integers(len(descriptors))] if rng.random() < p_descriptor else None
    article = rng.random() < (0.5 if opening else 0.9)
    phrase = _subject_phrase(shp, rng, color=rng.random() >= p_drop_color, descriptor=descriptor, article=article)
    if shp.position not in ("center", "left", "right", "free") and rng.random() >= p_drop_position:
        phrase += f" at the {shp.position}"
    if rng.random() >= p_drop_background:
        phrase += f" on {_article(scene.background)} {scene.background} background"
    return f"{opening} {phrase}".strip()


# ----------------------------------------------------------------------------
# rendering


def shape_polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon vertices (pixel coords) of a shape, or None for the circle."""
    if kind == "circle":
        return None
    if kind == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "triangle":
        # equilateral, pointing up, bbox vertically centred on cy
        h = r * 1.8
        w = h / math.sqrt(3.0)
        return [(cx, cy - h / 2), (cx + w, cy + h / 2), (cx - w, cy + h / 2)]
    if kind == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a) + r * 0.1))
        return pts
    if kind == "diamond":
        return [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)]
    if kind == "cross":
        t = r * 0.33
        e = r * 0.92
        return [
            (cx - t, cy - e), (cx + t, cy - e), (cx + t, cy - t), (cx + e, cy - t),
            (cx + e, cy + t), (cx + t, cy + t), (cx + t, cy + e), (cx - t, cy + e),
            (cx - t, cy + t), (cx - e, cy + t), (cx - e, cy - t), (cx - t, cy - t),
        ]
    if kind == "hexagon":
        return [
            (cx + r * math.cos(i * math.pi / 3), cy + r * math.sin(i * math.pi / 3)) for i in range(6)
        ]
    raise ValueError(f"unknown shape {kind!r}")


def _draw_shape_mask(draw: ImageDraw.ImageDraw, s: Shape, scale: float, fill=255) -> None:
    cx, cy, r = s.cx * scale, s.cy * scale, s.radius * scale
    poly = shape_polygon(s.kind, cx, cy, r)
    if poly is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def _shape_mask_hi(s: Shape, size: int) -> Image.Image:
    m = Image.new("L", (size, size), 0)
    _draw_shape_mask(ImageDraw.Draw(m), s, size / IMAGE_SIZE)
    return m


def _stripe_layer(s: Shape, size: int) -> Image.Image:
    """Full-canvas RGB image of diagonal stripes (colour / colour2)."""
    scale = size / IMAGE_SIZE
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / scale
    phase = ((xx + yy) / STRIPE_PERIOD) % 1.0
    a = np.array(PALETTE[s.color], np.uint8)
    b = np.array(PALETTE[s.color2 or s.color], np.uint8)
    arr = np.where((phase < 0.5)[..., None], a, b).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _second_colour_where(s: Shape, size: int) -> np.ndarray:
    """Boolean map (``size`` x ``size``) of where a non-diagonal pattern shows ``color2``.
    Periodic patterns sit on the image grid (their phase moves with the shape, as the
    diagonal stripes' does); halves, ring and border sit on the shape itself."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size / IMAGE_SIZE)
    if s.pattern == "stripes_vertical":
        return (xx / PATTERN_PERIOD) % 1.0 >= 0.5
    if s.pattern == "stripes_horizontal":
        return (yy / PATTERN_PERIOD) % 1.0 >= 0.5
    if s.pattern == "stripes_antidiagonal":
        return ((xx - yy) / STRIPE_PERIOD) % 1.0 >= 0.5
    if s.pattern == "dots":
        dx = (xx % PATTERN_PERIOD) - PATTERN_PERIOD / 2
        dy = (yy % PATTERN_PERIOD) - PATTERN_PERIOD / 2
        return dx * dx + dy * dy <= DOT_RADIUS ** 2
    if s.pattern == "halves":
        return xx >= s.cx
    if s.pattern == "ring":
        dist = np.hypot(xx - s.cx, yy - s.cy)
        return (dist >= 0.3 * s.radius) & (dist <= 0.62 * s.radius)
    if s.pattern == "border":  # the shape less a copy at 0.6 of its size: a band along the outline
        inner = replace(s, radius=0.6 * s.radius)
        return ~(np.asarray(_shape_mask_hi(inner, size)) > 127)
    raise ValueError(f"unknown pattern {s.pattern!r}; known: solid, {', '.join(PATTERNS)}")


def _pattern_layer(s: Shape, size: int) -> Image.Image:
    """Full-canvas RGB image of the shape's two-colour pattern."""
    if s.pattern == "striped":
        return _stripe_layer(s, size)
    a = np.array(PALETTE[s.color], np.uint8)
    b = np.array(PALETTE[s.color2 or s.color], np.uint8)
    return Image.fromarray(np.where(_second_colour_where(s, size)[..., None], b, a).astype(np.uint8), "RGB")


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Render ``scene`` as an anti-aliased ``size`` x ``size`` RGB image."""
    hi = size * _SS
    img = Image.new("RGB", (hi, hi), PALETTE[scene.background])
    for s in scene.shapes:
        mask = _shape_mask_hi(s, hi)
        if s.pattern != "solid":
            img.paste(_pattern_layer(s, hi), (0, 0), mask)
        else:
            img.paste(PALETTE[s.color], (0, 0, hi, hi), mask)
    return img.resize((size, size), Image.BOX)


def render_mask(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Binary ('L', values 0/255) mask of all shapes."""
    hi = size * _SS
    m = Image.new("L", (hi, hi), 0)
    d = ImageDraw.Draw(m)
    for s in scene.shapes:
        _draw_shape_mask(d, s, hi / IMAGE_SIZE)
    m = m.resize((size, size), Image.BOX)
    return m.point(lambda v: 255 if v >= 128 else 0)


def render_edges(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Edge map ('L', 0/255): 1-2 px outline of the shape mask."""
    m = render_mask(scene, size)
    dil = m.filter(ImageFilter.MaxFilter(3))
    ero = m.filter(ImageFilter.MinFilter(3))
    a = np.asarray(dil, np.int16) - np.asarray(ero, np.int16)
    return Image.fromarray(np.where(a > 0, 255, 0).astype(np.uint8), "L")


# ----------------------------------------------------------------------------
# DreamBooth subjects


def on_background(prompt: str, colour: str) -> str:
    """``prompt`` placed on a background: "a photo of sks ohwx star" -> "... on a red background"."""
    return f"{prompt} on {'an' if colour[0] in 'aeiou' else 'a'} {colour} background"


@dataclass(frozen=True)
class Subject:
    """A DreamBooth subject: a two-colour ``pattern`` (:data:`PATTERNS`) on a shape. The bundled
    ones are diagonally striped shapes of classes the world never stripes; ``subject_family.py``
    generates more."""

    name: str
    identifier: str  # two rare words, each with a learned embedding: docs/research/benchmarks_history.md, eighth round
    kind: str
    color: str
    color2: str
    description: str
    pattern: str = "striped"

    @property
    def instance_prompt(self) -> str:
        return f"a photo of {self.identifier} {self.kind}"

    @property
    def class_prompt(self) -> str:
        return f"a photo of {self.kind}"

    @property
    def backgrounds(self) -> tuple[str, ...]:
        """Backgrounds the subject stands out on (neither of its colours)."""
        return tuple(c for c in COLORS if c not in (self.color, self.color2))


SUBJECTS: dict[str, Subject] = {
    s.name: s
    for s in (
        Subject("sks_star", "sks ohwx", "star", "orange", "purple", "an orange star with purple stripes"),
        Subject("sks_triangle", "sks ohwx", "triangle", "yellow", "blue", "a yellow triangle with blue stripes"),
        Subject("sks_diamond", "sks ohwx", "diamond", "white", "red", "a white diamond with red stripes"),
    )
}
DEFAULT_SUBJECT = "sks_star"


def _subject(subject: str | Subject) -> Subject:
    if isinstance(subject, Subject):
        return subject
    if subject not in SUBJECTS:
        raise ValueError(f"unknown subject {subject!r}; bundled: {', '.join(SUBJECTS)}")
    return SUBJECTS[subject]


def subject_scene(
    background: str = "blue",
    size: str = "large",
    position: str = "center",
    rng=None,
    subject: str | Subject = DEFAULT_SUBJECT,
) -> Scene:
    """A scene containing ``subject`` on ``background``, jittered by ``rng`` as any scene."""
    sub = _subject(subject)
    if background not in sub.backgrounds:
        raise ValueError(f"background must differ from the subject's colours {sub.color}/{sub.color2}")
    base = make_scene("yellow" if background != "yellow" else "white", sub.kind, background, size, position, rng)
    shp = replace(base.shape, color=sub.color, color2=sub.color2, pattern=sub.pattern)
    return Scene(background, (shp,))


def render_subject(
    background: str = "blue", size: str = "large", position: str = "center", rng=None,
    subject: str | Subject = DEFAULT_SUBJECT,
) -> Image.Image:
    return render(subject_scene(background, size, position, rng, subject))


def subject_instance_scenes(n: int = 5, seed: int = 7, subject: str | Subject = DEFAULT_SUBJECT) -> list[Scene]:
    """``n`` instances of the subject on varied backgrounds, jittered in position
    and size.  All large: a small shape shows barely one stripe of each colour,
    and the tiny VAE's 16x16 latents blur it into a blob."""
    sub = _subject(subject)
    rng = np.random.default_rng(seed)
    bgs = list(sub.backgrounds)
    order = [bgs[j] for j in rng.permutation(len(bgs))]
    return [subject_scene(order[i % len(order)], "large", "center", rng, sub) for i in range(n)]


def all_vocabulary_words(version: int = WORLD_VERSION) -> list[str]:
    """Every word that can occur in a caption of world ``version``."""
    words = {"a", "an", "small", "at", "the", "on", "background", "and", "with", "stripes"}
    if version >= 4:
        words.update(w for phrase in _PATTERN_PHRASES.values() for w in phrase.split() if w != "{}")
    for opening in OPENINGS:
        words.update(opening.split())
    words.update(DESCRIPTOR_POOL)
    words.update(COLORS)
    words.update(SHAPES)
    for p in POSITIONS:
        words.update(p.split())
    return sorted(words)


def to_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def render_batch(scenes: Sequence[Scene]) -> np.ndarray:
    """uint8 array [N, 64, 64, 3]."""
    return np.stack([to_array(render(s)) for s in scenes])


__all__ = [
    "IMAGE_SIZE", "PALETTE", "COLORS", "SHAPES", "SIZES", "POSITIONS", "Shape", "Scene",
    "sample_scene", "make_scene", "training_scenes", "held_out_scenes", "held_out_combos",
    "is_held_out", "is_held_out_combo", "caption", "render", "render_mask", "render_edges",
    "subject_scene", "render_subject", "subject_instance_scenes", "all_vocabulary_words",
    "render_batch", "shape_polygon", "free_placement_scenes", "STRIPE_PERIOD", "WORLD_VERSION", "caption_variant",
    "PATTERNS", "PATTERN_PERIOD", "DOT_RADIUS", "WORLD_VERSIONS", "pattern_phrase",
    "OPENINGS", "IDENTIFIER_WORDS", "DESCRIPTOR_POOL", "UNSEEN_DESCRIPTORS", "Subject", "SUBJECTS", "DEFAULT_SUBJECT",
]
