"""A Gradio app: load a base model and BOFT adapters, sample in the browser.

    python app.py                                  # embedded tiny model, adapters under outputs/
    python app.py --model runwayml/stable-diffusion-v1-5 --adapters_dir my_adapters --port 7861
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import tempfile
from dataclasses import Field, fields
from pathlib import Path

import gradio as gr

from boft_diffusion.app.studio import (
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
    args = parser.parse_args(argv)
    check_app_flags(parser, args)
    return args


def limit_flag(limit: Field) -> str:
    """The flag of a Limits field: byte sizes are given in MB on the command line."""
    return limit.name.removesuffix("_bytes") + "_mb" if limit.name.endswith("_bytes") else limit.name


def flag_unit(limit: Field) -> int:
    """How many of the field's units one unit of its flag is."""
    return MB if limit.name.endswith("_bytes") else 1


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Limits field, with the field's default and help."""
    for limit in fields(Limits):
        parser.add_argument(f"--{limit_flag(limit)}", type=type(limit.default), default=limit.default // flag_unit(limit),
                            help=limit.metadata["help"])


def limits_from_flags(args: argparse.Namespace) -> Limits:
    """The studio's Limits from the flags ``add_limit_flags`` declared."""
    return Limits(**{limit.name: getattr(args, limit_flag(limit)) * flag_unit(limit) for limit in fields(Limits)})


def check_app_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Limits must be positive (and the uploads folder hold at least one upload)."""
    if not args.max_upload_ratio >= 1 or args.max_upload_ratio == float("inf"):
        parser.error(f"--max_upload_ratio must be a finite number >= 1, got {args.max_upload_ratio}.")
    for flag in map(limit_flag, fields(Limits)):
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


def offered_models(args: argparse.Namespace) -> list[str] | None:
    """The base models a public app offers (--model and --models); None on loopback (free text)."""
    if not is_public(args.host, args.share):
        return None
    return list(dict.fromkeys([args.model, *args.models]))


def build_app(studio: Studio) -> gr.Blocks:
    """The page; every callback reports StudioError as a readable message and keeps the app alive."""
    limits = studio.limits
    default_size = min(64 if studio.model_name == "tiny" else 512, limits.max_size)
    output_dir = Path(tempfile.mkdtemp(prefix="boft-app-"))

    def refresh():
        return gr.update(choices=studio.list_adapters())

    def show_info(adapter):
        try:
            info = studio.adapter_info(adapter)
        except StudioError as error:
            return {"error": studio.public_message(error)}, gr.update(visible=False)
        return info, gr.update(visible=bool(info.get("control")))

    def change_model(name):
        try:
            message = studio.set_model(name)
        except StudioError as error:
            raise gr.Error(studio.public_message(error)) from error
        return message, gr.update(choices=studio.list_adapters(), value=NO_ADAPTER)

    def upload(files):
        if not files:
            return gr.update(), "nothing uploaded"
        try:
            name = studio.import_upload([f if isinstance(f, str) else f.name for f in files])
        except StudioError as error:
            raise gr.Error(studio.public_message(error)) from error
        return gr.update(choices=studio.list_adapters(), value=name), f"installed {name}"

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
        gr.Markdown("# boft-diffusion\nSample a Stable Diffusion model with butterfly-orthogonal (BOFT) adapters.")
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
                prompt = gr.Textbox(value=world.on_background(world.SUBJECTS[world.DEFAULT_SUBJECT].instance_prompt, "blue"),
                                    label="Prompt", elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed")
                    randomise = gr.Button("Randomise")
                with gr.Row():
                    steps = gr.Slider(1, limits.max_steps, value=min(25, limits.max_steps), step=1, label="Steps")
                    guidance = gr.Slider(1.0, 15.0, value=default_guidance(studio.model_name, None) or 7.5, step=0.5,
                                         label="Guidance scale")
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

        load_model.click(change_model, model, [model_status, adapter])
        refresh_button.click(refresh, None, adapter)
        upload_files.upload(upload, upload_files, [adapter, upload_status])
        adapter.change(show_info, adapter, [info, control_group])
        randomise.click(lambda: random.randint(0, 2**31 - 1), None, seed)
        run.click(generate, [prompt, negative, adapter, strength, seed, steps, guidance, scheduler, width, height,
                             count, compare, control_image, control_strength], [gallery, downloads],
                  api_name="generate")
    return app


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    studio = Studio(args.model, args.adapters_dir, limits_from_flags(args), offered_models(args))
    app = build_app(studio)
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=args.host, server_port=args.port, share=args.share,
               max_file_size=f"{args.max_upload_mb}mb")


if __name__ == "__main__":
    main()
