"""Tiny synthetic shapes world, metrics and the embedded tiny Stable Diffusion."""
