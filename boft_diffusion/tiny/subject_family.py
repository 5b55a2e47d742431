"""A family of DreamBooth subjects beyond the three bundled ones, split into tuning and evaluation.

A recipe tuned on the bundled striped star can fit that subject rather than DreamBooth (issue
#37: a user's own green star with white stripes fared worse than the bundled ones). The family is
every (shape, pattern, colour pair) of the world that the measures can score, a pattern being one of :data:`world.PATTERNS`
(stripes at four angles, dots, two halves, a ring, a border). Diagonal stripes go only on shapes
the world never stripes, as for the bundled subjects, so every subject is a combination the base
model has never seen. Each subject falls, by a fixed hash of its name, into "tuning" (what
hyperparameters may be chosen on) or "evaluation" (what a recipe is judged on, never tuned on);
the bundled three stay the examples and are in neither.

Names read ``<shape>_<pattern>_<colour>_<colour2>`` ("star_dots_green_white"). Instance photos are
rendered like the bundled ones (5 large, jittered, on backgrounds unlike both colours), captioned
with their background; :func:`write_subject` puts them where train_dreambooth.py reads them.
"""

from __future__ import annotations

import functools
import json
import zlib
from itertools import permutations
from pathlib import Path

import numpy as np

from . import world
from .metrics import FG_THRESHOLD, STRIPE_COLOUR_RADIUS

#: The identifier of every generated subject: the recipe's, so a comparison varies the subject only.
IDENTIFIER = "sks ohwx"
#: Colour pairs closer than this (RGB) are left out: the measures count a pixel as one of the
#: subject's colours within STRIPE_COLOUR_RADIUS, so two closer colours could not be told apart
#: (red/orange, blue/purple, yellow/orange, green/black).
MIN_COLOUR_DISTANCE = 2 * STRIPE_COLOUR_RADIUS
SPLITS = ("tuning", "evaluation")
#: The first this many subjects of each split are kept out of world v4's pretraining
#: (:func:`subject_combos`): with a v4 model, tune and evaluate within them.
HELD_OUT_PER_SPLIT = 24
#: How the pattern reads in a description ("a green star with white dots").
_PATTERN_WORDS = {
    "striped": "diagonal stripes", "stripes_vertical": "vertical stripes", "stripes_horizontal": "horizontal stripes",
    "stripes_antidiagonal": "stripes slanting the other way", "dots": "dots", "halves": "right half",
    "ring": "ring", "border": "border",
}


def subject_name(kind: str, pattern: str, color: str, color2: str) -> str:
    return f"{kind}_{pattern}_{color}_{color2}"


def make_subject(kind: str, pattern: str, color: str, color2: str, identifier: str = IDENTIFIER) -> world.Subject:
    """The subject ``color`` ``kind`` with a ``color2`` ``pattern``; raises on a combination the
    family leaves out (unknown words, equal or too-close colours)."""
    if kind not in world.SHAPES or pattern not in world.PATTERNS:
        raise ValueError(f"unknown shape or pattern: {kind!r}, {pattern!r}")
    if color not in world.PALETTE or color2 not in world.PALETTE or color == color2:
        raise ValueError(f"need two different palette colours, got {color!r} and {color2!r}")
    if colour_distance(color, color2) < MIN_COLOUR_DISTANCE:
        raise ValueError(f"{color} and {color2} are too close for the measures to tell apart")
    if blend_background(color, color2) is not None:
        raise ValueError(f"{color} and {color2} blend into {blend_background(color, color2)}, a background: the "
                         "anti-aliased edge between them would cut the subject apart on it")
    article = "an" if color[0] in "aeiou" else "a"
    description = f"{article} {color} {kind} with {color2} {_PATTERN_WORDS[pattern]}"
    return world.Subject(subject_name(kind, pattern, color, color2), identifier, kind, color, color2, description,
                         pattern)


def colour_distance(a: str, b: str) -> float:
    return float(np.linalg.norm(np.subtract(world.PALETTE[a], world.PALETTE[b])))


def blend_background(a: str, b: str) -> str | None:
    """The palette colour that the even blend of ``a`` and ``b`` (the edge between two pattern
    areas) is within FG_THRESHOLD of, or None: on that background the measures read the edge as
    background and the subject as pieces (red/blue on purple, red/yellow on orange)."""
    blend = (np.array(world.PALETTE[a], float) + world.PALETTE[b]) / 2
    near = [c for c in world.COLORS if c not in (a, b)
            and np.linalg.norm(blend - world.PALETTE[c]) < FG_THRESHOLD]
    return near[0] if near else None


def family() -> list[world.Subject]:
    """Every subject of the family, in a fixed order (pattern, shape, colours)."""
    out = []
    for pattern in world.PATTERNS:
        kinds = world.NEVER_STRIPED if pattern == "striped" else world.SHAPES
        for kind in kinds:
            for color, color2 in permutations(world.COLORS, 2):
                if colour_distance(color, color2) >= MIN_COLOUR_DISTANCE and not blend_background(color, color2):
                    out.append(make_subject(kind, pattern, color, color2))
    return [s for s in out if not _is_bundled(s)]


def _is_bundled(subject: world.Subject) -> bool:
    return any((b.kind, b.pattern, b.color, b.color2) == (subject.kind, subject.pattern, subject.color, subject.color2)
               for b in world.SUBJECTS.values())


def split_of(name: str) -> str:
    """"tuning" or "evaluation", from a CRC-32 of the name: fixed across processes and versions
    (Python's own hash is salted), about half each."""
    return SPLITS[zlib.crc32(name.encode()) % 2]


def subjects(split: str, count: int | None = None) -> list[world.Subject]:
    """The first ``count`` subjects of ``split`` (all without it), patterns taken in turn so that
    any prefix covers the patterns evenly; within a pattern, in the order of a second hash (so
    shapes and colours mix)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    by_pattern = {p: [] for p in world.PATTERNS}
    for s in family():
        if split_of(s.name) == split:
            by_pattern[s.pattern].append(s)
    for members in by_pattern.values():
        members.sort(key=lambda s: zlib.crc32(s.name[::-1].encode()))
    ordered = [members[i] for i in range(max(map(len, by_pattern.values())))
               for members in by_pattern.values() if i < len(members)]
    return ordered if count is None else ordered[:count]


def held_out_subjects() -> list[world.Subject]:
    """The subjects whose exact combination world v4 never draws: the first
    :data:`HELD_OUT_PER_SPLIT` of each split."""
    return [s for split in SPLITS for s in subjects(split, HELD_OUT_PER_SPLIT)]


@functools.cache
def subject_combos() -> frozenset[tuple[str, str, str, str]]:
    """(shape, pattern, colour, colour2) of the bundled subjects and of :func:`held_out_subjects`:
    what world v4's pretraining leaves out (``world.training_scenes(excluded=...)``), so each stays
    new to a model pretrained on it."""
    return frozenset((s.kind, s.pattern, s.color, s.color2) for s in (*world.SUBJECTS.values(), *held_out_subjects()))


def subject_by_name(name: str) -> world.Subject:
    """A bundled subject, or a generated one by its ``<shape>_<pattern>_<colour>_<colour2>`` name."""
    if name in world.SUBJECTS:
        return world.SUBJECTS[name]
    words = name.split("_")
    if len(words) < 4:
        raise ValueError(f"{name!r} is neither a bundled subject ({', '.join(world.SUBJECTS)}) nor a "
                         "<shape>_<pattern>_<colour>_<colour2> name")
    return make_subject(words[0], "_".join(words[1:-2]), words[-2], words[-1])


def resolve(spec: str) -> list[str]:
    """Subject names from one command-line word: "all" (the bundled three), "evaluation:N" or
    "tuning:N" (the first N of a split), or a subject's name."""
    if spec == "all":
        return list(world.SUBJECTS)
    split, _, count = spec.partition(":")
    if split in SPLITS and count.isdigit():
        return [s.name for s in subjects(split, int(count))]
    return [subject_by_name(spec).name]


def instance_scenes(subject: world.Subject, n: int = 5, seed: int = 7) -> list[world.Scene]:
    """The subject's photos as scenes: the bundled subjects' own sampler and seed."""
    return world.subject_instance_scenes(n, seed, subject)


def write_subject(subject: world.Subject, subjects_dir: Path, n: int = 5, seed: int = 7,
                  instance_prompt: str | None = None) -> Path:
    """``<name>/`` (photos, each with a ``.txt`` caption naming its background, for
    ``--caption_extension .txt``), ``<name>_masks/`` (for ``--instance_mask_dir``) and ``<name>.json``
    (prompts and description) under ``subjects_dir``; returns the photo folder. Old files there
    are replaced, so the folder holds exactly this subject. ``instance_prompt``: what the captions
    call the subject (default: its identifier and class noun)."""
    instance_prompt = instance_prompt or subject.instance_prompt
    images, masks = subjects_dir / subject.name, subjects_dir / f"{subject.name}_masks"
    for folder in (images, masks):
        folder.mkdir(parents=True, exist_ok=True)
        for old in [*folder.glob("*.png"), *folder.glob("*.txt")]:
            old.unlink()
    for i, scene in enumerate(instance_scenes(subject, n, seed)):
        path = images / f"{subject.name}_{i:02d}.png"
        world.render(scene).save(path, optimize=True)
        world.render_mask(scene).save(masks / path.name, optimize=True)
        path.with_suffix(".txt").write_text(world.on_background(instance_prompt, scene.background) + "\n")
    novelty = (f" (the world stripes some shapes, never a {subject.kind})" if subject.pattern == "striped"
               else f" (the world never draws {subject.pattern})")
    (subjects_dir / f"{subject.name}.json").write_text(json.dumps({
        "instance_prompt": instance_prompt,
        "class_prompt": subject.class_prompt,
        "identifier": subject.identifier,
        "class_noun": subject.kind,
        "recontext_prompts": [world.on_background(instance_prompt, c) for c in subject.backgrounds],
        "description": subject.description + novelty,
    }, indent=1) + "\n")
    return images


__all__ = ["IDENTIFIER", "SPLITS", "HELD_OUT_PER_SPLIT", "family", "held_out_subjects", "make_subject", "split_of", "subjects", "subject_by_name", "resolve",
           "instance_scenes", "write_subject"]
