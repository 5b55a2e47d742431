"""Diffusers pipelines, control, the LoRA baseline, export, bundled files and image conversion."""

from .quiet import quiet_library_messages

quiet_library_messages()
