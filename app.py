"""A Gradio app: load a base model and BOFT adapters, sample in the browser, and train a subject.

    python app.py                                  # embedded tiny model, adapters under outputs/
    python app.py --model runwayml/stable-diffusion-v1-5 --adapters_dir my_adapters --port 7861
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import Field, fields
from pathlib import Path

import gradio as gr

from boft_diffusion.app.studio import (
    EXPORT_FORMATS,
    MB,
    MODEL_SCHEDULER,
    NO_ADAPTER,
    SCHEDULERS,
    GenerationRequest,
    Limits,
    Studio,
    StudioError,
    png_with_parameters,
)
from boft_diffusion.app.training_runs import (
    MIN_IMAGES,
    PRESETS,
    TrainingLimits,
    TrainingRequest,
    TrainingRuns,
    collect_images,
    default_preset,
    describe,
    subject_prompts,
)
from boft_diffusion.families.loading import default_guidance
from boft_diffusion.tiny import world
from boft_diffusion.training.cli import HelpFormatter


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="Create a public Gradio link.")
    parser.add_argument("--model", default="tiny", help='"tiny", a diffusers folder, a hub id or a .safetensors file.')
    parser.add_argument("--adapters_dir", default="outputs", help="Adapter folders are listed from here only.")
    add_limit_flags(parser)
    parser.add_argument("--models", nargs="+", default=[],
                        help="Base models visitors may choose when the app is public (--share or a non-loopback "
                             "--host); --model is always one of them.")
    parser.add_argument("--allow_training", action="store_true",
                        help="Offer the Train tab on a public address (--share or a non-loopback --host); on "
                             "loopback it is always on.")
    args = parser.parse_args(argv)
    check_app_flags(parser, args)
    return args


def limit_flag(limit: Field) -> str:
    """The flag of a Limits field: byte sizes are given in MB on the command line."""
    return limit.name.removesuffix("_bytes") + "_mb" if limit.name.endswith("_bytes") else limit.name


def flag_unit(limit: Field) -> int:
    """How many of the field's units one unit of its flag is."""
    return MB if limit.name.endswith("_bytes") else 1


LIMIT_CLASSES = (Limits, TrainingLimits)


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Limits and TrainingLimits field, with the field's default and help."""
    for limit in (limit for cls in LIMIT_CLASSES for limit in fields(cls)):
        parser.add_argument(f"--{limit_flag(limit)}", type=type(limit.default), default=limit.default // flag_unit(limit),
                            help=limit.metadata["help"])


def limits_from_flags(args: argparse.Namespace, cls: type[Limits] | type[TrainingLimits] = Limits) -> Limits | TrainingLimits:
    """The studio's Limits (or the TrainingLimits) from the flags ``add_limit_flags`` declared."""
    return cls(**{limit.name: getattr(args, limit_flag(limit)) * flag_unit(limit) for limit in fields(cls)})


def check_app_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Limits must be positive (and the uploads folder hold at least one upload)."""
    if not args.max_upload_ratio >= 1 or args.max_upload_ratio == float("inf"):
        parser.error(f"--max_upload_ratio must be a finite number >= 1, got {args.max_upload_ratio}.")
    for flag in (limit_flag(limit) for cls in LIMIT_CLASSES for limit in fields(cls)):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
    if args.max_uploads_folder_mb < args.max_upload_mb:
        parser.error("--max_uploads_folder_mb must be at least --max_upload_mb.")


def is_public(host: str, share: bool) -> bool:
    """Whether visitors other than this machine's user can reach the app."""
    if share:
        return True
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def training_allowed(args: argparse.Namespace) -> bool:
    """Training runs visitors' uploads for minutes each: on a public address only with --allow_training."""
    return args.allow_training or not is_public(args.host, args.share)


def offered_models(args: argparse.Namespace) -> list[str] | None:
    """The base models a public app offers (--model and --models); None on loopback (free text)."""
    if not is_public(args.host, args.share):
        return None
    return list(dict.fromkeys([args.model, *args.models]))


def build_app(studio: Studio, runs: TrainingRuns) -> gr.Blocks:
    """The page: a Sample tab and a Train tab; every callback reports StudioError as a readable message
    and keeps the app alive."""
    limits = studio.limits
    default_size = min(64 if studio.model_name == "tiny" else 512, limits.max_size)
    output_dir = Path(tempfile.mkdtemp(prefix="boft-app-"))

    def adapter_choices(owned):
        """The studio's adapters, then the visitor's own trained ones (nobody else's)."""
        return [*studio.list_adapters(), *runs.adapters(owned)]

    def refresh(owned):
        return gr.update(choices=adapter_choices(owned))

    def show_info(adapter):
        try:
            info, card = studio.adapter_info(adapter), studio.adapter_card(adapter)
        except StudioError as error:
            return {"error": studio.public_message(error)}, gr.update(visible=False), ""
        return info, gr.update(visible=bool(info.get("control"))), card

    def change_model(name, owned):
        try:
            message = studio.set_model(name)
        except StudioError as error:
            raise gr.Error(studio.public_message(error)) from error
        return message, gr.update(choices=adapter_choices(owned), value=NO_ADAPTER)

    def upload(files, owned):
        if not files:
            return gr.update(), "nothing uploaded"
        try:
            name = studio.import_upload([f if isinstance(f, str) else f.name for f in files])
        except StudioError as error:
            raise gr.Error(studio.public_message(error)) from error
        return gr.update(choices=adapter_choices(owned), value=name), f"installed {name}"

    def generate(prompt, negative, adapter, strength, seed, steps, guidance, scheduler, width, height, count,
                 compare, control_image, control_strength, progress=gr.Progress()):  # noqa: B008 (Gradio injects it)
        request = GenerationRequest(prompt=prompt, negative_prompt=negative, adapter=adapter or NO_ADAPTER,
                                    strength=strength, seed=seed, steps=steps, guidance_scale=guidance,
                                    scheduler=scheduler, width=width, height=height, num_images=count,
                                    compare_with_base=compare, control_image=control_image,
                                    control_strength=control_strength)
        try:
            results = studio.generate(request, progress=lambda fraction, text: progress(fraction, desc=text))
        except StudioError as error:
            raise gr.Error(studio.public_message(error)) from error
        gallery, files = [], []
        for index, (image, parameters) in enumerate(results):
            path = output_dir / f"boft-{random.getrandbits(48):012x}-{index}.png"
            path.write_bytes(png_with_parameters(image, parameters))
            label = json.loads(parameters)["rendered"]
            gallery.append((str(path), f"{label}, seed {json.loads(parameters)['seed']}"))
            files.append(str(path))
        return gallery, files

    with gr.Blocks(title="boft-diffusion") as app:
        gr.Markdown("# boft-diffusion\nSample a Stable Diffusion model with butterfly-orthogonal (BOFT) adapters, "
                    "or teach it a subject.")
        owned = gr.State([])  # the ids of this page's training runs: its only handle on them
        with gr.Tab("Sample", id="sample"):
            with gr.Row():
                with gr.Column(scale=1):
                    with gr.Row():
                        if studio.public:
                            model = gr.Dropdown(choices=studio.offered_models, value=studio.model_name,
                                                label="Base model", scale=3)
                        else:
                            model = gr.Textbox(value=studio.model_name, label="Base model", scale=3)
                        load_model = gr.Button("Load model", scale=1)
                    model_status = gr.Markdown(f"model: {studio.model_name}")
                    with gr.Row():
                        adapter = gr.Dropdown(choices=studio.list_adapters(), value=NO_ADAPTER, label="Adapter",
                                              elem_id="adapter", scale=3)
                        refresh_button = gr.Button("Refresh", scale=1)
                    upload_files = gr.File(label="Upload adapter (.zip, or adapter_config.json + .safetensors)",
                                           file_count="multiple", file_types=[".zip", ".json", ".safetensors"])
                    upload_status = gr.Markdown()
                    strength = gr.Slider(0.0, 1.5, value=1.0, step=0.05, label="Adapter strength")
                    prompt = gr.Textbox(value=world.on_background(world.SUBJECTS[world.DEFAULT_SUBJECT].instance_prompt,
                                                                  "blue"), label="Prompt", elem_id="prompt")
                    negative = gr.Textbox(label="Negative prompt")
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, label="Seed")
                        randomise = gr.Button("Randomise")
                    with gr.Row():
                        steps = gr.Slider(1, limits.max_steps, value=min(25, limits.max_steps), step=1, label="Steps")
                        guidance = gr.Slider(1.0, 15.0, value=default_guidance(studio.model_name, None) or 7.5,
                                             step=0.5, label="Guidance scale")
                    scheduler = gr.Dropdown(list(SCHEDULERS), value=MODEL_SCHEDULER, label="Scheduler")
                    with gr.Row():
                        width = gr.Slider(8, limits.max_size, value=default_size, step=8, label="Width")
                        height = gr.Slider(8, limits.max_size, value=default_size, step=8, label="Height")
                    count = gr.Slider(1, limits.max_images, value=1, step=1, label="Images")
                    compare = gr.Checkbox(label="Compare with base (same seed)", elem_id="compare")
                    with gr.Group(visible=False) as control_group:
                        control_image = gr.Image(type="pil", label="Control image")
                        control_strength = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Control strength")
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column(scale=1):
                    gallery = gr.Gallery(label="Images", elem_id="gallery", columns=2, height="auto")
                    downloads = gr.File(label="Download (PNG with parameters)", file_count="multiple")
                    info = gr.JSON(label="Adapter")
                    with gr.Accordion("Model card", open=False):
                        card = gr.Markdown(elem_id="adapter_card")
        with gr.Tab("Train", id="train"):
            build_train_tab(studio, runs, owned, adapter, adapter_choices)

        def reconnect(ids, request: gr.Request):
            """A reloaded page (or a shared link) holds its run's id in ``?run=``."""
            run_id = runs.reconnect(request.query_params.get("run"))
            return [*ids, run_id] if run_id and run_id not in ids else ids

        app.load(reconnect, owned, owned)

        load_model.click(change_model, [model, owned], [model_status, adapter])
        refresh_button.click(refresh, owned, adapter)
        upload_files.upload(upload, [upload_files, owned], [adapter, upload_status])
        adapter.change(show_info, adapter, [info, control_group, card])
        randomise.click(lambda: random.randint(0, 2**31 - 1), None, seed)
        run.click(generate, [prompt, negative, adapter, strength, seed, steps, guidance, scheduler, width, height,
                             count, compare, control_image, control_strength], [gallery, downloads],
                  api_name="generate")
    return app


#: Sets ``?run=<id>`` in the address bar, so a reload (or the link) reconnects to the run.
REMEMBER_RUN_JS = """(runId) => {
    if (runId) { const url = new URL(window.location); url.searchParams.set("run", runId);
                 window.history.replaceState(null, "", url); }
}"""


def build_train_tab(studio: Studio, runs: TrainingRuns, owned: gr.State, adapter: gr.Dropdown,
                    adapter_choices: Callable[[list[str]], list]) -> None:
    """The Train tab: images and captions, the subject's words, a preset, and the run's progress."""
    preset_key = default_preset(studio.model_name)
    preset_steps, preset_rate = PRESETS[preset_key].defaults()
    quota, training = studio.limits.upload_quota(), runs.limits

    def fail(error: StudioError):
        return gr.Error(studio.public_message(error))

    def preview(files):
        if not files:
            return []
        try:
            with tempfile.TemporaryDirectory() as folder:
                found = collect_images(files, Path(folder) / "images", quota, training)
        except StudioError as error:
            raise fail(error) from error
        return [[name, caption] for name, caption in found.items()]

    def show_prompts(identifier, class_noun):
        try:
            instance, cls = subject_prompts(identifier, class_noun)
        except StudioError as error:
            return f"⚠ {studio.public_message(error)}"
        return f"instance prompt: `{instance}` · class prompt: `{cls}`"

    def train(files, table, identifier, class_noun, preset, steps, rate, ids):
        rows = table.values.tolist() if hasattr(table, "values") else (table or [])
        captions = {str(row[0]): str(row[1] or "") for row in rows[:training.max_train_images] if len(row) >= 2}
        request = TrainingRequest(files=files or [], captions=captions, identifier=identifier, class_noun=class_noun,
                                  preset=preset, steps=steps, learning_rate=rate, model=studio.model_name)
        try:
            run_id = runs.submit(request)
        except StudioError as error:
            raise fail(error) from error
        return [*ids, run_id], run_id

    def watch(ids, shown):
        """The page's latest run: its status line, and (when they change) its grid, card, zip and adapters."""
        if not ids:
            return "no run yet", gr.update(), gr.update(), gr.update(), gr.update(), "", shown
        try:
            status = runs.status(ids[-1], ids)
        except StudioError as error:
            return studio.public_message(error), gr.update(), gr.update(), gr.update(), gr.update(), "", shown
        image, adapters = status["validation_image"], runs.adapters(ids)
        updates = [gr.update()] * 4
        if image is not None and str(image) != shown.get("image"):
            updates[0] = str(image)
        if status["adapter"] and status["adapter"] != shown.get("adapter"):
            updates[1] = runs.model_card(ids[-1], ids)
            updates[2] = str(runs.download(ids[-1], ids))
        if adapters != shown.get("adapters"):
            updates[3] = gr.update(choices=adapter_choices(ids))
        shown = {"image": str(image) if image else shown.get("image"), "adapter": status["adapter"], "adapters": adapters}
        return studio.public_text(describe(status)), *updates, studio.public_text(status["log"]), shown

    def cancel(ids):
        if not ids:
            return "no run to cancel"
        try:
            runs.cancel(ids[-1], ids)
        except StudioError as error:
            raise fail(error) from error
        return "cancelling..."

    def export(ids, fmt):
        """The page's latest run's adapter in an export format, for ComfyUI, A1111, Forge or diffusers."""
        if not ids:
            raise gr.Error("no run yet")
        try:
            return str(studio.export(*runs.export_target(ids[-1], ids), fmt=fmt))
        except StudioError as error:
            raise fail(error) from error

    if not runs.enabled:
        gr.Markdown("**Training is off**: this app is on a public address; its operator may turn training on with "
                    "`--allow_training`.")
    gr.Markdown(f"Teach the model a subject from {MIN_IMAGES} to {training.max_train_images} pictures of it. "
                "A `.txt` file beside an image (same name) is its caption, editable below; an empty caption "
                "trains on the instance prompt. Runs go one at a time; this page (and its link) alone sees its runs.")
    with gr.Row():
        with gr.Column(scale=1):
            files = gr.File(label="Images (PNG, JPEG, WebP, .txt captions, or a zip of them)", file_count="multiple",
                            file_types=[".png", ".jpg", ".jpeg", ".webp", ".txt", ".zip"], height=160,
                            elem_id="train_files")
            table = gr.Dataframe(headers=["image", "caption"], datatype=["str", "str"], column_count=2,
                                 interactive=True, label="Captions", max_height=260, elem_id="captions")
            with gr.Row():
                identifier = gr.Textbox(value="sks ohwx", label="Identifier words (new, rare words)",
                                        elem_id="identifier")
                class_noun = gr.Textbox(value="star", label="Class noun", elem_id="class_noun")
            prompts = gr.Markdown(show_prompts("sks ohwx", "star"), elem_id="prompts")
            with gr.Row():
                preset = gr.Dropdown([(p.label, key) for key, p in PRESETS.items()], value=preset_key,
                                     label="Preset")
                steps = gr.Number(value=min(preset_steps, training.max_train_steps), precision=0, minimum=1,
                                  maximum=training.max_train_steps, label="Steps", elem_id="train_steps")
                rate = gr.Number(value=preset_rate, label="Learning rate", elem_id="learning_rate")
            with gr.Row():
                train_button = gr.Button("Train", variant="primary", elem_id="train", interactive=runs.enabled)
                cancel_button = gr.Button("Cancel", elem_id="cancel")
        with gr.Column(scale=1):
            status = gr.Markdown("no run yet", elem_id="run_status")
            run_id = gr.Textbox(visible=False)
            validation = gr.Image(label="Latest validation (rows: instance prompt, class prompt)", type="filepath",
                                  interactive=False, elem_id="validation")
            download = gr.File(label="Adapter (zip)", elem_id="run_download", interactive=False)
            with gr.Row():
                export_format = gr.Dropdown(list(EXPORT_FORMATS), value=EXPORT_FORMATS[0], label="Export as",
                                            info="lora: kohya LoRA (99 % of the change); diff: exact; peft-lora: "
                                                 "diffusers; lycoris: adapters trained with --boft_side output",
                                            elem_id="export_format")
                export_button = gr.Button("Export", elem_id="export")
            exported = gr.File(label="Export (zip)", elem_id="run_export", interactive=False)
            log = gr.Textbox(label="Log (end)", lines=4, max_lines=8, autoscroll=True)
            with gr.Accordion("Model card", open=False):
                card = gr.Markdown(elem_id="run_card")
    shown = gr.State({})
    timer = gr.Timer(2.0)

    files.upload(preview, files, table, concurrency_limit=None, api_name="preview_images")
    for box in (identifier, class_noun):
        box.change(show_prompts, [identifier, class_noun], prompts, concurrency_limit=None, show_progress="hidden")
    preset.change(lambda key: PRESETS[key].defaults(), preset, [steps, rate], concurrency_limit=None)
    train_button.click(train, [files, table, identifier, class_noun, preset, steps, rate, owned], [owned, run_id],
                       concurrency_limit=None, api_name="train").then(None, run_id, None, js=REMEMBER_RUN_JS)
    cancel_button.click(cancel, owned, status, concurrency_limit=None, api_name="cancel_training")
    export_button.click(export, [owned, export_format], exported, api_name="export_run")
    watch_outputs = [status, validation, card, download, adapter, log, shown]
    timer.tick(watch, [owned, shown], watch_outputs, concurrency_limit=None, show_progress="hidden",
               api_name="training_status")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    studio = Studio(args.model, args.adapters_dir, limits_from_flags(args), offered_models(args))
    runs = TrainingRuns(studio.adapters_dir, limits_from_flags(args, TrainingLimits), studio.limits.upload_quota(),
                        enabled=training_allowed(args), in_use=studio.loaded_folders)
    app = build_app(studio, runs)
    app.queue(default_concurrency_limit=1)
    # SIGTERM unwinds like Ctrl-C, so the training worker is stopped with the server (its run resumes at
    # the next start); after a kill -9 the next start stops the orphaned worker itself.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        app.launch(server_name=args.host, server_port=args.port, share=args.share,
                   max_file_size=f"{args.max_upload_mb}mb")
    finally:
        runs.close()


if __name__ == "__main__":
    main()
