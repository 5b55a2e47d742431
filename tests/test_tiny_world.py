import numpy as np
import pytest

from boft_diffusion.tiny import metrics as M
from boft_diffusion.tiny import subject_family
from boft_diffusion.tiny import world as W


def test_render_is_deterministic_and_64x64():
    a = W.sample_scene(123)
    b = W.sample_scene(123)
    assert a == b
    ia, ib = W.render(a), W.render(b)
    assert ia.size == (64, 64) and ia.mode == "RGB"
    assert np.array_equal(np.asarray(ia), np.asarray(ib))
    assert W.caption(a) == W.caption(b)


def test_training_scenes_reproducible():
    s1 = W.training_scenes(50, seed=3)
    s2 = W.training_scenes(50, seed=3)
    assert s1 == s2
    assert W.training_scenes(50, seed=4) != s1


def test_captions_follow_grammar():
    s = W.make_scene("green", "square", "yellow", size="small", position="top left")
    assert W.caption(s) == "a small green square at the top left on a yellow background"
    s = W.make_scene("red", "circle", "blue")
    assert W.caption(s) == "a red circle on a blue background"
    s = W.make_scene("orange", "star", "white")
    assert W.caption(s) == "an orange star on a white background"
    for scene in W.training_scenes(200, seed=0):
        c = W.caption(scene)
        assert c.endswith(" background")
        for shp in scene.shapes:
            assert shp.color != scene.background
            assert shp.color in c and shp.kind in c
        assert len(c.split()) <= 20


def test_shape_colour_differs_from_background():
    with pytest.raises(ValueError):
        W.make_scene("red", "circle", "red")


def test_held_out_never_sampled_for_training():
    combos = W.held_out_combos()
    assert 20 <= len(combos) <= 60
    for scene in W.training_scenes(3000, seed=11):
        assert not W.is_held_out(scene)
        for shp in scene.shapes:
            assert (shp.color, shp.kind, scene.background) not in combos


def test_held_out_scenes_are_held_out_and_cover_combos():
    scenes = W.held_out_scenes(len(W.held_out_combos()), seed=0)
    assert all(W.is_held_out(s) for s in scenes)
    assert {(s.shape.color, s.shape.kind, s.background) for s in scenes} == set(W.held_out_combos())
    assert W.held_out_scenes(10, seed=5) == W.held_out_scenes(10, seed=5)


def test_every_attribute_pair_still_seen_in_training():
    held = set(W.held_out_combos())
    for c in W.COLORS:
        for k in W.SHAPES:
            assert any((c, k, b) not in held for b in W.COLORS if b != c)


def test_mask_and_edges():
    s = W.make_scene("red", "star", "blue")
    m = np.asarray(W.render_mask(s))
    e = np.asarray(W.render_edges(s))
    assert m.shape == (64, 64) and set(np.unique(m)) <= {0, 255}
    assert set(np.unique(e)) <= {0, 255}
    assert 0 < (e > 0).sum() < (m > 0).sum()
    # mask marks exactly the shape-coloured pixels (up to anti-aliasing)
    img = np.asarray(W.render(s)).astype(int)
    red = np.abs(img - np.array(W.PALETTE["red"])).sum(-1) < 60
    assert (red & (m > 0)).sum() / max(red.sum(), 1) > 0.95


def test_subject_is_a_striped_star_never_in_world():
    img = np.asarray(W.render_subject("blue")).astype(int)
    cols = [np.array(W.PALETTE[c]) for c in (W.SUBJECTS["sks_star"].color, W.SUBJECTS["sks_star"].color2)]
    n1 = (np.abs(img - cols[0]).sum(-1) < 40).sum()
    n2 = (np.abs(img - cols[1]).sum(-1) < 40).sum()
    assert n1 > 50 and n2 > 50
    shapes = [shp for s in W.training_scenes(500, seed=0) for shp in s.shapes]
    striped = [shp for shp in shapes if shp.pattern == "striped"]
    assert 0.1 < len(striped) / len(shapes) < 0.4
    assert all(shp.kind not in W.NEVER_STRIPED and shp.color2 not in (None, shp.color) for shp in striped)
    assert any(shp.kind == "star" for shp in shapes)
    scenes = W.subject_instance_scenes(5)
    assert len({s.background for s in scenes}) >= 3


def test_free_placement_scenes_leave_the_place_to_the_control_map():
    scenes = W.free_placement_scenes(40, seed=1, held_out=True)
    assert scenes == W.free_placement_scenes(40, seed=1, held_out=True)
    assert all(W.is_held_out(s) for s in scenes)
    assert not any(W.is_held_out(s) for s in W.free_placement_scenes(40, seed=1))
    centres = np.array([[s.shape.cx, s.shape.cy] for s in scenes])
    assert centres.std(0).min() > 6.0  # spread over the canvas, not at the five anchors
    for s in scenes:
        assert " at the " not in W.caption(s)
        assert np.asarray(W.render_mask(s)).any()


def test_caption_variants_cover_the_forms_people_write():
    scenes = [s for s in W.training_scenes(400, seed=5) if len(s.shapes) == 1]
    rng = np.random.default_rng(0)
    captions = [W.caption_variant(s, rng) for s in scenes for _ in range(5)]
    again = np.random.default_rng(0)
    assert captions == [W.caption_variant(s, again) for s in scenes for _ in range(5)]
    vocabulary = set(W.all_vocabulary_words()) | {"photo", "picture", "image", "of"}
    for c in captions:
        assert set(c.split()) <= vocabulary, c
    for opening in W.OPENINGS[1:]:
        assert any(c.startswith(opening + " ") for c in captions), opening
    assert any(c.split()[0] in W.SHAPES or c.split()[0] == "small" for c in captions)  # no article, no opening
    with_descriptor = [c for c in captions if set(c.split()) & set(W.DESCRIPTOR_POOL)]
    assert 0.15 < len(with_descriptor) / len(captions) < 0.35
    assert 0.05 < np.mean([" background" not in c for c in captions]) < 0.3
    canonical = [W.caption(s) for s in scenes for _ in range(5)]
    assert 0.15 < np.mean([c == w for c, w in zip(captions, canonical, strict=True)]) < 0.35  # today's grammar stays


def test_caption_variants_only_say_what_is_true():
    rng = np.random.default_rng(1)
    for scene in W.training_scenes(300, seed=9):
        variant = W.caption_variant(scene, rng)
        parsed = M.parse_caption(variant)
        truth = M.scene_attributes(scene)
        assert parsed["background"] in (None, truth["background"]), variant
        assert len(parsed["shapes"]) == len(truth["shapes"]), variant
        for said, real in zip(parsed["shapes"], truth["shapes"], strict=True):
            assert said["kind"] == real["kind"], variant
            assert said["color"] in (None, real["color"]), variant
            assert said["color2"] in (None, real["color2"]), variant


def test_bare_class_prompts_and_identifier_slot():
    star = W.make_scene("red", "star", "blue")
    rng = np.random.default_rng(3)
    forms = {W.caption_variant(star, rng, p_opening=1.0, p_drop_color=1.0, p_drop_background=1.0,
                               p_descriptor=0.0) for _ in range(60)}
    assert {"a photo of star", "a photo of a star", "an image of star", "a picture of a star"} <= forms
    dreambooth = {W.caption_variant(star, rng, p_opening=1.0, p_drop_color=1.0, p_descriptor=1.0,
                                    descriptors=("sks",)) for _ in range(60)}
    assert "a photo of sks star on a blue background" in dreambooth
    assert not set(W.UNSEEN_DESCRIPTORS) & set(W.DESCRIPTOR_POOL)
    assert not set(W.UNSEEN_DESCRIPTORS) & set(W.all_vocabulary_words())
    assert set(W.IDENTIFIER_WORDS) <= set(W.DESCRIPTOR_POOL)


@pytest.mark.parametrize("name", sorted(W.SUBJECTS))
def test_bundled_subjects_are_new_combinations_with_their_files(name):
    import json
    from pathlib import Path

    from PIL import Image

    subject = W.SUBJECTS[name]
    assert subject.kind in W.NEVER_STRIPED
    folder = Path(W.__file__).resolve().parent / "subjects"
    meta = json.loads((folder / f"{name}.json").read_text())
    assert meta["instance_prompt"] == f"a photo of {subject.identifier} {subject.kind}"
    assert meta["class_prompt"] == f"a photo of {subject.kind}"
    assert len(meta["recontext_prompts"]) == len(subject.backgrounds)
    images = sorted((folder / name).glob("*.png"))
    masks = sorted((folder / f"{name}_masks").glob("*.png"))
    assert [p.name for p in images] == [p.name for p in masks] and len(images) == 5
    for path, scene in zip(images, W.subject_instance_scenes(5, subject=name), strict=True):
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(W.render(scene)))
        # the caption sidecar names the background the image really has
        assert path.with_suffix(".txt").read_text().strip() == W.on_background(meta["instance_prompt"], scene.background)
    colours = {W.subject_scene(bg, subject=name).shape.color2 for bg in subject.backgrounds}
    assert colours == {subject.color2}
    with pytest.raises(ValueError, match="background"):
        W.subject_scene(subject.color, subject=name)


def test_world_v4_puts_every_pattern_on_every_shape_but_the_subjects():
    excluded = subject_family.subject_combos()
    scenes = W.training_scenes(3000, seed=2, version=4, excluded=excluded)
    assert scenes == W.training_scenes(3000, seed=2, version=4, excluded=excluded)
    patterned = [s.shape for s in scenes if len(s.shapes) == 1 and s.shape.pattern != "solid"]
    assert {(p.kind, p.pattern) for p in patterned} == {(k, p) for k in W.SHAPES for p in W.PATTERNS}
    held_out = {(s.kind, s.pattern, s.color, s.color2)
                for s in [*W.SUBJECTS.values(), *subject_family.subjects("evaluation", 12)]}
    assert held_out <= excluded
    assert not any((p.kind, p.pattern, p.color, p.color2) in excluded for p in patterned)
    for scene in scenes:  # a background is never one of its object's colours
        assert all(scene.background not in (s.color, s.color2) for s in scene.shapes)
    with pytest.raises(ValueError, match="world version"):
        W.sample_scene(0, version=5)
    with pytest.raises(ValueError, match="excluded"):
        W.training_scenes(10, version=4)


def test_world_v4_captions_name_each_pattern_in_its_vocabulary():
    scenes = [s for s in W.training_scenes(1500, seed=4, version=4, excluded=subject_family.subject_combos()) if len(s.shapes) == 1]
    vocabulary = set(W.all_vocabulary_words(4)) | {"photo", "picture", "image", "of"}
    rng = np.random.default_rng(2)
    seen = set()
    for scene in scenes:
        for text in (W.caption(scene), W.caption_variant(scene, rng)):
            assert set(text.split()) <= vocabulary, text
            said, real = M.parse_caption(text)["shapes"][0], M.scene_attributes(scene)["shapes"][0]
            if said["color"] is not None:
                assert (said["pattern"], said["color2"]) == (real["pattern"], real["color2"]), text
                seen.add(said["pattern"])
    assert seen == set(W.PATTERNS) | {"solid"}
    ring = W.Scene("black", (W.Shape("star", "red", pattern="ring", color2="orange"),))
    assert W.caption(ring) == "a red star with an orange ring on a black background"
    assert set(W.all_vocabulary_words(4)) - set(W.all_vocabulary_words(3)) == {
        "vertical", "horizontal", "antidiagonal", "dots", "half", "ring", "border"}
