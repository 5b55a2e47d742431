import numpy as np
import pytest

from boft_diffusion.tiny import metrics as M
from boft_diffusion.tiny import world as W


def test_parse_caption():
    a = M.parse_caption("a small green square at the top left on a yellow background")
    assert a["background"] == "yellow"
    assert a["shapes"] == [
        {"color": "green", "kind": "square", "size": "small", "position": "top left", "pattern": "solid",
         "color2": None}
    ]
    a = M.parse_caption("a red hexagon with white stripes on a green background")
    assert a["shapes"][0]["pattern"] == "striped" and a["shapes"][0]["color2"] == "white"
    assert a["shapes"][0]["color"] == "red" and a["background"] == "green"
    a = M.parse_caption("a photo of sks star")
    assert a["background"] is None and a["shapes"][0]["kind"] == "star" and a["shapes"][0]["color"] is None
    a = M.parse_caption("a red circle and an orange cross on a white background")
    assert [s["kind"] for s in a["shapes"]] == ["circle", "cross"]
    assert [s["color"] for s in a["shapes"]] == ["red", "orange"]


def test_prompt_fidelity_on_ground_truth_renders():
    scenes = W.training_scenes(120, seed=21) + W.held_out_scenes(40, seed=2)
    res = [M.prompt_fidelity(W.render(s), s) for s in scenes]
    for key in ("background", "shape_color", "shape_class"):
        assert np.mean([r[key] for r in res]) >= 0.97, key
    # caption strings give the same scores as scenes
    r2 = [M.prompt_fidelity(W.render(s), W.caption(s)) for s in scenes[:30]]
    assert [r["mean"] for r in r2] == [r["mean"] for r in res[:30]]


def test_prompt_fidelity_detects_wrong_attributes():
    img = W.render(W.make_scene("red", "circle", "blue"))
    r = M.prompt_fidelity(img, "a green square on a yellow background")
    assert r == {"background": 0.0, "shape_color": 0.0, "shape_class": 0.0, "mean": 0.0}
    r = M.prompt_fidelity(img, "a red triangle on a blue background")
    assert r["background"] == 1.0 and r["shape_color"] == 1.0 and r["shape_class"] == 0.0
    # a solid shape is not the striped one asked for, and stripes need both colours
    assert M.prompt_fidelity(img, "a red circle with white stripes on a blue background")["shape_color"] == 0.0
    striped = W.render(W.Scene("blue", (W.Shape("circle", "red", pattern="striped", color2="white"),)))
    assert M.prompt_fidelity(striped, "a red circle with white stripes on a blue background")["shape_color"] == 1.0
    assert M.prompt_fidelity(striped, "a red circle with green stripes on a blue background")["shape_color"] == 0.0


@pytest.mark.parametrize("kind", W.SHAPES)
def test_shape_classifier_all_classes(kind):
    for size, pos in (("large", "center"), ("small", "top right")):
        s = W.make_scene("white", kind, "black", size, pos, rng=1)
        assert M.classify_shape(M.object_mask(W.render(s))) == kind


def test_subject_fidelity_separates_subject_from_solid_shapes():
    inst = [W.render(s) for s in W.subject_instance_scenes(5)]
    prof = M.SubjectProfile(inst)
    own = [M.subject_fidelity(im, prof) for im in inst]
    new = [M.subject_fidelity(W.render(s), inst) for s in W.subject_instance_scenes(4, seed=99)]
    assert min(own) > 0.8 and min(new) > 0.8
    solid = [W.make_scene(c, k, b, rng=i) for i, (c, k, b) in enumerate(
        [("orange", "star", "blue"), ("purple", "star", "white"), ("red", "circle", "blue"),
         ("yellow", "hexagon", "black"), ("orange", "cross", "green")])]
    scores = [M.subject_fidelity(W.render(s), prof) for s in solid]
    assert max(scores) < 0.2
    for v in own + scores:
        assert 0.0 <= v <= 1.0


def test_subject_fidelity_needs_star_shape():
    from dataclasses import replace

    inst = [W.render(s) for s in W.subject_instance_scenes(5)]
    sub = W.subject_scene("blue")
    circle = W.Scene("blue", (replace(sub.shape, kind="circle"),))
    assert M.subject_fidelity(W.render(circle), inst) < 0.3


def test_control_fidelity():
    s = W.make_scene("red", "triangle", "green")
    mask = W.render_mask(s)
    assert M.control_fidelity(mask, mask) == 1.0
    assert M.control_fidelity(W.render(s), mask) > 0.9
    other = W.render_mask(W.make_scene("red", "circle", "green", "small", "top left"))
    assert M.control_fidelity(W.render(s), other) < 0.2
    assert M.control_fidelity(np.zeros((64, 64), bool), np.zeros((64, 64), np.uint8)) == 1.0


def test_captions_without_colours_score_what_they_say():
    scene = W.make_scene("red", "star", "blue")
    image = W.render(scene)
    assert M.prompt_fidelity(image, "a photo of star") == {"shape_class": 1.0, "mean": 1.0}
    assert M.prompt_fidelity(image, "a picture of a sks star on a blue background") == {
        "background": 1.0, "shape_class": 1.0, "mean": 1.0}
    assert M.prompt_fidelity(image, "an image of gzr circle on a green background") == {
        "background": 0.0, "shape_class": 0.0, "mean": 0.0}
    assert M.prompt_fidelity(image, "a photo of ohwx red star")["shape_color"] == 1.0


def test_subject_fidelity_tells_the_bundled_subjects_apart():
    profiles = {name: M.SubjectProfile([W.render(s) for s in W.subject_instance_scenes(5, subject=name)])
                for name in W.SUBJECTS}
    assert {name: p.kind for name, p in profiles.items()} == {name: s.kind for name, s in W.SUBJECTS.items()}
    for name, profile in profiles.items():
        for other in W.SUBJECTS:
            fresh = [W.render(s) for s in W.subject_instance_scenes(3, seed=99, subject=other)]
            scores = [M.subject_fidelity(im, profile) for im in fresh]
            if other == name:
                assert min(scores) > 0.8, name
            else:
                assert max(scores) < 0.3, (name, other)
