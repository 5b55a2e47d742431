"""A Gradio app: load a base model and BOFT adapters, sample in the browser.

    python app.py                                  # embedded tiny model, adapters under outputs/
    python app.py --model runwayml/stable-diffusion-v1-5 --adapters_dir my_adapters --port 7861
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import gradio as gr

from boft_diffusion.app.studio import (
    MODEL_SCHEDULER,
    NO_ADAPTER,
    SCHEDULERS,
    GenerationRequest,
    Limits,
    Studio,
    StudioError,
    png_with_parameters,
)
from boft_diffusion.models.pipelines import default_guidance
from boft_diffusion.training.cli import HelpFormatter


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="Create a public Gradio link.")
    parser.add_argument("--model", default="tiny", help='"tiny", a diffusers folder, a hub id or a .safetensors file.')
    parser.add_argument("--adapters_dir", default="outputs", help="Adapter folders are listed from here only.")
    parser.add_argument("--max_size", type=int, default=768, help="Largest width/height accepted.")
    parser.add_argument("--max_steps", type=int, default=100)
    parser.add_argument("--max_images", type=int, default=4)
    parser.add_argument("--max_upload_mb", type=int, default=512)
    return parser.parse_args(argv)


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
            return {"error": str(error)}, gr.update(visible=False)
        return info, gr.update(visible=bool(info.get("control")))

    def change_model(name):
        try:
            message = studio.set_model(name)
        except StudioError as error:
            raise gr.Error(str(error)) from error
        return message, gr.update(choices=studio.list_adapters(), value=NO_ADAPTER)

    def upload(files):
        if not files:
            return gr.update(), "nothing uploaded"
        try:
            name = studio.import_upload([f if isinstance(f, str) else f.name for f in files])
        except StudioError as error:
            raise gr.Error(str(error)) from error
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
            raise gr.Error(str(error)) from error
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
                prompt = gr.Textbox(value="a photo of sks star on a blue background", label="Prompt", elem_id="prompt")
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
                compare = gr.Checkbox(label="Compare with base (same seed)")
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
    limits = Limits(max_size=args.max_size, max_steps=args.max_steps, max_images=args.max_images,
                    max_upload_bytes=args.max_upload_mb * 2**20)
    studio = Studio(args.model, args.adapters_dir, limits)
    app = build_app(studio)
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=args.host, server_port=args.port, share=args.share,
               max_file_size=f"{args.max_upload_mb}mb")


if __name__ == "__main__":
    main()
