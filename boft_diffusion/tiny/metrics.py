"""Model-free measures on 64x64 images of the shapes world.

All scores are in [0, 1].  They work from pixels only (numpy + Pillow):

* the background colour is the median of a 2-pixel border frame;
* the object mask is every pixel far (RGB distance) from that background colour,
  reduced to its largest 4-connected component;
* the object colour is the majority nearest-palette colour of the eroded mask;
* the shape class is the rendered template (same bounding box) with the highest
  IoU against the mask.
"""

from __future__ import annotations

import re
from collections import Counter, deque
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image, ImageFilter

from . import world as W

_PAL_NAMES = list(W.PALETTE)
_PAL = np.array([W.PALETTE[c] for c in _PAL_NAMES], np.float32)
FG_THRESHOLD = 70.0  # RGB L2 distance from the background colour
STRIPE_COLOUR_RADIUS = 80.0  # RGB L2 distance within which a pixel counts as one of a subject's stripe colours


# ----------------------------------------------------------------------------
# caption parsing


#: Stripe directions a caption may name before "stripes" (none: diagonal).
_STRIPE_DIRECTIONS = {"vertical": "stripes_vertical", "horizontal": "stripes_horizontal",
                      "antidiagonal": "stripes_antidiagonal"}
#: World v4's other pattern nouns ("with a white ring").
_PATTERN_NOUNS = {"dots": "dots", "half": "halves", "ring": "ring", "border": "border"}


def _pattern_of(words: list[str]) -> str:
    if "stripes" in words or "striped" in words:
        return next((p for w, p in _STRIPE_DIRECTIONS.items() if w in words), "striped")
    return next((p for w, p in _PATTERN_NOUNS.items() if w in words), "solid")


def parse_caption(text: str) -> dict:
    """Parse a world caption into attributes.

    Returns ``{"background": str|None, "shapes": [{"color", "kind", "size",
    "position", "pattern", "color2"}...]}`` (``color2``: the pattern's colour).  Unknown words are ignored, so prompts such
    as "a photo of sks star on a blue background" parse to a star with colour
    None.  Missing attributes are None.
    """
    t = text.lower().strip().rstrip(".")
    t = re.sub(r"^(a |an )?(photo|picture|image) of ", "", t)
    background = None
    m = re.search(r"\bon (?:a |an )?(\w+) background\b", t)
    if m:
        background = m.group(1) if m.group(1) in W.PALETTE else None
        t = (t[: m.start()] + t[m.end():]).strip()
    shapes = []
    for part in re.split(r"\band\b", t):
        words = part.split()
        if not words:
            continue
        pos = None
        pm = re.search(r"\bat the (top|bottom) (left|right)\b", part)
        if pm:
            pos = f"{pm.group(1)} {pm.group(2)}"
        kind = next((w for w in words if w in W.SHAPES), None)
        colors = [w for w in words if w in W.PALETTE]
        color = colors[0] if colors else None
        pattern = _pattern_of(words)
        if kind is None and color is None:
            continue
        shapes.append(
            {
                "color": color,
                "kind": kind,
                "size": "small" if "small" in words else ("large" if "large" in words else None),
                "position": pos,
                "pattern": pattern,
                "color2": colors[1] if pattern != "solid" and len(colors) > 1 else None,
            }
        )
    return {"background": background, "shapes": shapes}


def scene_attributes(scene: W.Scene) -> dict:
    return {
        "background": scene.background,
        "shapes": [
            {"color": s.color, "kind": s.kind, "size": s.size, "position": s.position, "pattern": s.pattern,
             "color2": s.color2}
            for s in sorted(scene.shapes, key=lambda s: s.cx)
        ],
    }


# ----------------------------------------------------------------------------
# segmentation helpers


def to_rgb_array(image) -> np.ndarray:
    """PIL image / uint8 HWC array / float CHW-or-HWC array in [0,1] -> float32 HWC 0..255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), np.float32)
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    a = a.astype(np.float32)
    if a.max() <= 1.0 + 1e-6:
        a = a * 255.0
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, -1)
    return a


def nearest_palette(rgb, names: Sequence[str] | None = None) -> str:
    names = list(names) if names is not None else _PAL_NAMES
    pal = np.array([W.PALETTE[c] for c in names], np.float32)
    d = ((pal - np.asarray(rgb, np.float32)[None]) ** 2).sum(-1)
    return names[int(d.argmin())]


def background_color(arr: np.ndarray) -> np.ndarray:
    """Median RGB of a 2-pixel frame around the image."""
    border = np.concatenate([arr[:2].reshape(-1, 3), arr[-2:].reshape(-1, 3),
                             arr[:, :2].reshape(-1, 3), arr[:, -2:].reshape(-1, 3)])
    return np.median(border, axis=0)


def background_name(arr: np.ndarray) -> str:
    """The palette colour nearest the image's border."""
    return nearest_palette(background_color(arr))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    seen = np.zeros_like(mask, bool)
    best: list[tuple[int, int]] = []
    for y0, x0 in zip(*np.nonzero(mask), strict=False):
        if seen[y0, x0]:
            continue
        comp = []
        q = deque([(y0, x0)])
        seen[y0, x0] = True
        while q:
            y, x = q.popleft()
            comp.append((y, x))
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    q.append((yy, xx))
        if len(comp) > len(best):
            best = comp
    out = np.zeros_like(mask, bool)
    if best:
        ys, xs = zip(*best, strict=False)
        out[list(ys), list(xs)] = True
    return out


def object_mask(image, region: tuple[int, int] | None = None, largest: bool = True) -> np.ndarray:
    """Boolean mask of the object: pixels far from the border colour (largest
    connected component).  ``region=(x0, x1)`` restricts to image columns."""
    arr = to_rgb_array(image)
    bg = background_color(arr)
    m = np.sqrt(((arr - bg) ** 2).sum(-1)) > FG_THRESHOLD
    if region is not None:
        r = np.zeros_like(m)
        r[:, region[0]:region[1]] = True
        m &= r
    if largest and m.any():
        m = _largest_component(m)
    return m


def _erode(mask: np.ndarray) -> np.ndarray:
    img = Image.fromarray(mask.astype(np.uint8) * 255, "L").filter(ImageFilter.MinFilter(3))
    e = np.asarray(img) > 127
    return e if e.sum() >= 4 else mask


_TEMPLATE_BBOX: dict[str, tuple[float, float, float, float]] = {}


def _template_bbox(kind: str) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) offsets of a unit-radius shape around its centre."""
    if kind not in _TEMPLATE_BBOX:
        poly = W.shape_polygon(kind, 0.0, 0.0, 1.0)
        if poly is None:
            _TEMPLATE_BBOX[kind] = (-1.0, -1.0, 1.0, 1.0)
        else:
            xs, ys = zip(*poly, strict=False)
            _TEMPLATE_BBOX[kind] = (min(xs), min(ys), max(xs), max(ys))
    return _TEMPLATE_BBOX[kind]


def template_mask(kind: str, bbox: tuple[float, float, float, float], size: int = 64) -> np.ndarray:
    """Mask of ``kind`` fitted to the pixel bounding box ``(x0, y0, x1, y1)`` (inclusive)."""
    x0, y0, x1, y1 = bbox
    left, t, r, b = _template_bbox(kind)
    w, h = x1 - x0 + 1, y1 - y0 + 1
    rad = 0.5 * (w / (r - left) + h / (b - t))
    cx = x0 + w / 2 - (left + r) / 2 * rad
    cy = y0 + h / 2 - (t + b) / 2 * rad
    shp = W.Shape(kind, "red", cx=cx, cy=cy, radius=rad)
    return np.asarray(W.render_mask(W.Scene("blue", (shp,)), size)) > 127


def shape_scores(mask: np.ndarray) -> dict[str, float]:
    """IoU of ``mask`` with each shape template fitted to its bounding box."""
    if mask.sum() < 4:
        return {k: 0.0 for k in W.SHAPES}
    ys, xs = np.nonzero(mask)
    bbox = (xs.min(), ys.min(), xs.max(), ys.max())
    out = {}
    for k in W.SHAPES:
        t = template_mask(k, bbox, mask.shape[0])
        inter = (t & mask).sum()
        union = (t | mask).sum()
        out[k] = float(inter / union) if union else 0.0
    return out


def classify_shape(mask: np.ndarray) -> str | None:
    if mask.sum() < 4:
        return None
    s = shape_scores(mask)
    return max(s, key=s.get)


def object_colors(arr: np.ndarray, mask: np.ndarray, count: int = 2) -> list[str]:
    """The object's ``count`` most frequent palette colours, most frequent first."""
    if mask.sum() == 0:
        return []
    px = arr[_erode(mask)]
    d = ((px[:, None, :] - _PAL[None]) ** 2).sum(-1)
    votes = Counter(d.argmin(1).tolist())
    return [_PAL_NAMES[i] for i, _ in votes.most_common(count)]


def object_color(arr: np.ndarray, mask: np.ndarray) -> str | None:
    colors = object_colors(arr, mask, 1)
    return colors[0] if colors else None


def analyse(image, region=None) -> dict:
    """Predicted background / object colour / shape class of an image."""
    arr = to_rgb_array(image)
    m = object_mask(arr, region)
    return {
        "background": background_name(arr),
        "color": object_color(arr, m),
        "colors": object_colors(arr, m),
        "kind": classify_shape(m),
        "mask": m,
    }


# ----------------------------------------------------------------------------
# prompt fidelity


def prompt_fidelity(image, target) -> dict[str, float]:
    """Per-attribute correctness of ``image`` w.r.t. a caption (str) or Scene.

    Returns ``{"background", "shape_color", "shape_class", "mean"}``, each in
    [0, 1]: 1 when the attribute read off the pixels equals the requested one
    (for a patterned shape: when its two main colours are the two requested).
    With two shapes the left and right image halves are scored separately and
    averaged.  Attributes the caption does not specify are not counted (their
    key is absent from the result unless every attribute is missing).
    """
    attrs = scene_attributes(target) if isinstance(target, W.Scene) else parse_caption(target)
    arr = to_rgb_array(image)
    res: dict[str, float] = {}
    if attrs["background"] is not None:
        res["background"] = float(background_name(arr) == attrs["background"])
    shapes = attrs["shapes"]
    regions = [None] if len(shapes) <= 1 else [(0, arr.shape[1] // 2), (arr.shape[1] // 2, arr.shape[1])]
    cols, kinds = [], []
    for spec, region in zip(shapes, regions, strict=False):
        a = analyse(arr, region)
        if spec.get("pattern") not in (None, "solid") and spec["color"] is not None and spec.get("color2"):
            cols.append(float(set(a["colors"]) == {spec["color"], spec["color2"]}))
        elif spec["color"] is not None:
            cols.append(float(a["color"] == spec["color"]))
        if spec["kind"] is not None:
            kinds.append(float(a["kind"] == spec["kind"]))
    if cols:
        res["shape_color"] = float(np.mean(cols))
    if kinds:
        res["shape_class"] = float(np.mean(kinds))
    res["mean"] = float(np.mean(list(res.values()))) if res else 0.0
    return res


# ----------------------------------------------------------------------------
# subject fidelity


def _stripe_response(labels: np.ndarray, mask: np.ndarray, angle: float, period: float) -> float:
    """|mean(labels * exp(i 2 pi proj / period))| / (2/pi) over the mask (1 for a
    perfect square wave of +-1 labels)."""
    ys, xs = np.nonzero(mask)
    if len(xs) < 8:
        return 0.0
    proj = xs * np.cos(angle) + ys * np.sin(angle)
    z = labels[ys, xs] * np.exp(2j * np.pi * proj / period)
    return float(min(1.0, abs(z.mean()) / (2 / np.pi)))


def _lattice_response(labels: np.ndarray, mask: np.ndarray, angle: float, period: float) -> float:
    """Geometric mean of the stripe responses along ``angle`` and across it: high only for a
    pattern that repeats both ways (dots), ~0 for stripes."""
    return float(np.sqrt(_stripe_response(labels, mask, angle, period)
                         * _stripe_response(labels, mask, angle + np.pi / 2, period)))


#: Cells per side of the grid that a layout pattern (halves, ring, border) is compared on, laid over
#: the object's bounding box: 8 cells of about 5 px for a large shape, the finest the VAE keeps.
LAYOUT_GRID = 8
#: How the profile tells the structures apart, from the instance photos (measured on 250 subjects of
#: ``subject_family``, 5 photos each): stripes' best stripe response exceeds their leave-one-out
#: layout match by 0.16 or more, every other pattern's by 0.01 at most; a layout pattern's
#: leave-one-out match is 0.89 or more, the dots' 0.75 at most.
STRIPES_MARGIN = 0.08
LAYOUT_MIN = 0.82
_ANGLES = np.deg2rad(np.arange(0, 180, 15))
_PERIODS = np.arange(4.0, 20.5, 1.0)


def _layout(labels: np.ndarray, mask: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Mean label in each cell of a LAYOUT_GRID x LAYOUT_GRID grid over the bounding box of
    ``box`` (the object's mask), flattened: the pattern in the shape's own coordinates, so that it
    does not depend on where the shape sits or how large it is."""
    ys, xs = np.nonzero(mask)
    out = np.zeros(LAYOUT_GRID * LAYOUT_GRID)
    if len(xs) == 0:
        return out
    by, bx = np.nonzero(box)
    gx = np.minimum((xs - bx.min()) * LAYOUT_GRID // (bx.max() - bx.min() + 1), LAYOUT_GRID - 1)
    gy = np.minimum((ys - by.min()) * LAYOUT_GRID // (by.max() - by.min() + 1), LAYOUT_GRID - 1)
    cell = gy * LAYOUT_GRID + gx
    sums = np.bincount(cell, labels[ys, xs], LAYOUT_GRID * LAYOUT_GRID)
    counts = np.bincount(cell, minlength=LAYOUT_GRID * LAYOUT_GRID)
    np.divide(sums, counts, out=out, where=counts > 0)
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norm) if norm > 0 else 0.0


class SubjectProfile:
    """Statistics of the subject estimated from its instance images: its shape class (majority
    vote), its two colours (dominant object colours) and the structure of its pattern, read off
    the photos so that any two-colour subject can be scored without being described.

    ``structure`` is "stripes" (one direction and period: the bundled subjects, stripes at any
    angle), "lattice" (a period both ways: dots) or "layout" (a pattern fixed to the shape:
    halves, ring, border), whichever the instance images show most clearly."""

    def __init__(self, instance_images: Iterable):
        arrs = [to_rgb_array(im) for im in instance_images]
        if not arrs:
            raise ValueError("need at least one instance image")
        kinds = Counter(classify_shape(object_mask(a)) for a in arrs)
        self.kind = kinds.most_common(1)[0][0]
        px = np.concatenate([a[_erode(object_mask(a))] for a in arrs])
        # two dominant colours: k-means (k=2) on object pixels, deterministic init
        c = np.stack([px[np.argmin(px.sum(1))], px[np.argmax(px.sum(1))]]).astype(np.float32)
        for _ in range(20):
            lab = ((px[:, None] - c[None]) ** 2).sum(-1).argmin(1)
            c = np.stack([px[lab == k].mean(0) if (lab == k).any() else c[k] for k in range(2)])
        self.colors = c
        prepared = []
        for a in arrs:
            box = object_mask(a)
            m = _erode(box)
            lab, _ = self.labels(a, m)
            prepared.append((lab, m, box))
        best = (0.0, 0.0, 8.0)
        for ang in _ANGLES:
            for per in _PERIODS:
                r = float(np.mean([_stripe_response(lab, m, ang, per) for lab, m, _ in prepared]))
                if r > best[0]:
                    best = (r, ang, per)
        along, self.angle, self.period = best
        layouts = [_layout(lab, m, box) for lab, m, box in prepared]
        self.template = np.mean(layouts, 0)
        # leave one out: a photo always resembles a template it is part of
        held_out = float(np.mean([_cosine(v, (self.template * len(layouts) - v) / max(len(layouts) - 1, 1))
                                  for v in layouts])) if len(layouts) > 1 else 0.0
        if along >= held_out + STRIPES_MARGIN:
            self.structure = "stripes"
        elif held_out >= LAYOUT_MIN:
            self.structure = "layout"
        else:
            self.structure = "lattice"
        # stripes keep the square wave's own normalisation and an even split, as they always have;
        # a lattice or layout scores 1 at the instances' own mean response and colour share
        self.own_response, self.share = 1.0, 0.5
        if self.structure != "stripes":
            self.own_response = float(np.mean([self._structure(lab, m, box) for lab, m, box in prepared]))
            self.share = float(np.mean([(lab > 0).sum() / max((lab != 0).sum(), 1) for lab, _, _ in prepared]))

    def labels(self, arr: np.ndarray, mask: np.ndarray):
        """+1 / -1 for pixels near colour A / B (within STRIPE_COLOUR_RADIUS), 0 otherwise."""
        d = np.sqrt(((arr[..., None, :] - self.colors[None, None]) ** 2).sum(-1))
        near = d.min(-1) < STRIPE_COLOUR_RADIUS
        lab = np.where(d[..., 0] < d[..., 1], 1.0, -1.0) * near * mask
        return lab, near & mask

    def _structure(self, lab: np.ndarray, mask: np.ndarray, box: np.ndarray) -> float:
        """The pattern's response, uncalibrated: near the profile's direction and period for
        stripes and lattices, the cosine with the instances' mean layout for a layout."""
        if self.structure == "layout":
            return max(0.0, _cosine(_layout(lab, mask, box), self.template))
        response = _stripe_response if self.structure == "stripes" else _lattice_response
        return max(response(lab, mask, self.angle + da, self.period * f)
                   for da in np.deg2rad([-15, 0, 15]) for f in (0.8, 0.9, 1.0, 1.1, 1.25))

    def score(self, image) -> dict[str, float]:
        """Parts "shape", "colors" (the two colours in the pattern's proportion), "stripes" (the
        pattern's structure; named for the bundled subjects' stripes) and their geometric mean "score"."""
        arr = to_rgb_array(image)
        m = object_mask(arr)
        if m.sum() < 8:
            return {"shape": 0.0, "colors": 0.0, "stripes": 0.0, "score": 0.0}
        sc = shape_scores(m)
        others = max(v for k, v in sc.items() if k != self.kind)
        # 1 when the subject's template fits clearly better than any other template
        s_shape = float(np.clip(sc[self.kind], 0, 1) * np.clip((sc[self.kind] - others) / 0.1 + 0.5, 0, 1))
        me = _erode(m)
        lab, near = self.labels(arr, me)
        n = me.sum()
        pa, pb = (lab > 0).sum() / n, (lab < 0).sum() / n
        s_col = float(_balance(pa / max(pa + pb, 1e-6), self.share) * min(1.0, (pa + pb) / 0.8))
        s_str = min(1.0, self._structure(lab, me, m) / max(self.own_response, 1e-6))
        score = float((max(s_shape, 0) * s_col * s_str) ** (1 / 3))
        return {"shape": s_shape, "colors": s_col, "stripes": float(s_str), "score": score}


def _balance(share: float, expected: float) -> float:
    """1 when the first colour covers ``expected`` of the pattern, 0 when either colour is missing:
    (s/e)^(2e) ((1-s)/(1-e))^(2(1-e)), which is 4 s (1-s) for an even split."""
    if share <= 0.0 or share >= 1.0:
        return 0.0
    return float((share / expected) ** (2 * expected) * ((1 - share) / (1 - expected)) ** (2 * (1 - expected)))


def subject_fidelity(image, instance_images, return_parts: bool = False):
    """How much the object in ``image`` looks like the subject shown in
    ``instance_images`` (a two-colour patterned shape), in [0, 1].

    Geometric mean of (a) shape match: IoU of the subject's shape template, gated
    by how much better it fits than the best other template, (b) two-colour balance: the
    object's pixels split between the subject's two colours as in its photos, and (c)
    pattern structure (:class:`SubjectProfile`): for stripes the Fourier response at the
    subject's stripe direction and period, for dots the same both ways, for halves, a ring
    or a border the match with the photos' layout in the shape's own coordinates.  High
    (~0.8-1) for instance renders; ~0 for solid shapes (no second colour) and low for
    other shapes.
    ``instance_images`` may also be a prebuilt :class:`SubjectProfile`.
    """
    prof = instance_images if isinstance(instance_images, SubjectProfile) else SubjectProfile(instance_images)
    parts = prof.score(image)
    return parts if return_parts else parts["score"]


# ----------------------------------------------------------------------------
# control fidelity


def control_fidelity(image, control_mask) -> float:
    """IoU between the generated object's mask and ``control_mask`` (PIL 'L' /
    array; >127 or True means object).  Empty-vs-empty counts as 1."""
    cm = np.asarray(control_mask.convert("L") if isinstance(control_mask, Image.Image) else control_mask)
    cm = cm > 127 if cm.dtype != bool else cm
    if isinstance(image, np.ndarray) and image.ndim == 2:
        gm = image > 127 if image.dtype != bool else image
    elif isinstance(image, Image.Image) and image.mode in ("L", "1"):
        gm = np.asarray(image.convert("L")) > 127
    else:
        gm = object_mask(image, largest=False)
    union = (gm | cm).sum()
    if union == 0:
        return 1.0
    return float((gm & cm).sum() / union)


__all__ = [
    "parse_caption", "prompt_fidelity", "subject_fidelity", "control_fidelity", "SubjectProfile",
    "object_mask", "analyse", "classify_shape", "shape_scores", "nearest_palette", "background_color",
]
