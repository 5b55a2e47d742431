"""The demo's report: labelled grids and per-colour scores, from samples (no training here)."""

import json

from PIL import Image

from boft_diffusion import demo
from boft_diffusion.evaluation.tiny_world import TinyWorldSamples, recontext_prompts
from boft_diffusion.outputs.write import add_model_card_scores
from boft_diffusion.tiny import world


def fake_samples(background_right: bool) -> TinyWorldSamples:
    """Six samples per prompt: the re-context ones on the asked background or on black."""
    def on(colour: str) -> Image.Image:
        return world.render_subject(background=colour if background_right else "black")

    recontext = [(prompt, on(colour)) for prompt, colour in recontext_prompts(demo.INSTANCE_PROMPT) for _ in range(6)]
    subject = [(demo.INSTANCE_PROMPT, world.render_subject())] * 6
    return TinyWorldSamples(subject=subject, recontext=recontext, captions=subject, class_prompt=subject)


def test_grids_label_prompts_and_columns_and_colours_are_scored(tmp_path, capsys):
    drawn = {"base": fake_samples(True), "adapter": fake_samples(False)}
    by_colour = {m: demo.background_by_colour(drawn[m].recontext) for m in demo.MODELS}
    assert set(by_colour["base"].values()) == {1.0}
    assert set(by_colour["adapter"].values()) - {1.0}, "a black background is no asked-for colour"
    scores = {m: {"subject": 0.5, "recontext_background": 0.5, "class_prompt_fidelity": 0.5, "class_subject": 0.0,
                  "class_shape": 1.0} for m in demo.MODELS}
    rows = demo.overview_rows(drawn, scores, by_colour)
    assert [row.title for row in rows] == [f'"{demo.INSTANCE_PROMPT}"', f'"{recontext_prompts(demo.INSTANCE_PROMPT)[1][0]}"',
                                          f'"{demo.CLASS_PROMPT}"']
    assert rows[2].notes[0] == "drawn as a star 1.00, subject fidelity 0.00"
    colour_rows = demo.recontext_rows(drawn, by_colour)
    assert len(colour_rows) == len(recontext_prompts(demo.INSTANCE_PROMPT))
    grid = demo.labelled_comparison(colour_rows, demo.MODELS)
    assert grid.width > 2 * 6 * 64 and grid.height > len(colour_rows) * 64

    demo.print_scores({"instances": 0.97, **scores, "recontext_by_colour": by_colour})
    printed = capsys.readouterr().out
    assert "| drawn as a star, 'a photo of star' (should stay high) | 1.00 | 1.00 |" in printed
    assert all(f"| {colour} | 1.00 |" in printed for colour in by_colour["base"])
    assert json.loads(json.dumps(by_colour)) == by_colour  # scores.json holds it


def test_model_card_scores_are_added_once_and_replaced(tmp_path):
    (tmp_path / "README.md").write_text("# adapter\n\ntrained on a star\n")
    add_model_card_scores(tmp_path, [("subject fidelity", "0.10 (0.00)")], "first note")
    add_model_card_scores(tmp_path, [("subject fidelity", "0.58 (0.00)"), ("class drawn", "0.79 (0.98)")], "second")
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("# adapter\n\ntrained on a star\n")
    assert card.count("## Scores") == 1 and "0.10" not in card and "first note" not in card
    assert "| subject fidelity | 0.58 (0.00) |" in card and "| class drawn | 0.79 (0.98) |" in card
    assert card.rstrip().endswith("second")


def test_card_rows_name_every_measure_with_the_base_beside_it():
    measures = ("subject", "recontext_background", "recontext_subject", "class_prompt_fidelity", "class_shape",
                "class_subject")
    scores = {"instances": 0.97, "base": dict.fromkeys(measures, 0.25), "adapter": dict.fromkeys(measures, 0.5)}
    rows = demo.card_rows(scores)
    assert len(rows) == len(measures) and all(value == "0.50 (0.25)" for _, value in rows)
