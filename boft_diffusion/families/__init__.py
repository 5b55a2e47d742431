"""Model families: what differs between the diffusion models a recipe trains, behind one interface.

A recipe asks the family of its pipeline for the denoiser, the text encoders, how prompts become
the denoiser's conditioning, what extra inputs the denoiser takes (SDXL's pooled text and size
ids; Flux's packed tokens), how clean latents are noised and what the model predicts (DDPM for
the UNets, rectified flow for the transformers), and the adapter targets. Adding
a family is one module with a :class:`ModelFamily` subclass and a :func:`register_family` call;
no recipe changes.
"""

from __future__ import annotations

from .base import EncodedPrompts, ModelFamily, TextEncoder, family_of, register_family, registered_families
from .flux import Flux
from .quiet import quiet_library_messages
from .sd import StableDiffusion
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL

quiet_library_messages()

register_family(Flux())
register_family(StableDiffusion3())
register_family(StableDiffusionXL())
register_family(StableDiffusion())

__all__ = ["EncodedPrompts", "Flux", "ModelFamily", "StableDiffusion", "StableDiffusion3", "StableDiffusionXL",
           "TextEncoder", "family_of", "register_family", "registered_families"]
