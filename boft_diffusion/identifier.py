"""Learned identifier embeddings (pivotal tuning): installing, saving and loading them.

The file is ``learned_embeds.safetensors``, the name diffusers gives textual-inversion
embeddings, holding one vector per identifier word: ``{"sks": tensor[hidden_size]}``.
Unlike textual inversion the words already exist in the vocabulary; their rows are replaced.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .layers import IdentifierEmbedding
from .model import _atomic_write

EMBEDDINGS_NAME = "learned_embeds.safetensors"


def identifier_words(instance_prompt: str, class_prompt: str | None) -> list[str]:
    """The words of the instance prompt that the class prompt lacks ("sks" in "a photo of sks dog")."""
    known = set((class_prompt or "").lower().split())
    return [word for word in dict.fromkeys(instance_prompt.lower().split()) if word not in known]


def token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """One vocabulary id per word; a word the tokenizer splits into several tokens is refused."""
    ids = []
    for word in words:
        pieces = tokenizer(word, add_special_tokens=False).input_ids
        if len(pieces) != 1:
            raise ValueError(f"identifier {word!r} is {len(pieces)} tokens for this tokenizer; "
                             "choose a word that is a single token (such as 'sks').")
        ids.append(pieces[0])
    return ids


def identifier_embedding(text_encoder: nn.Module) -> IdentifierEmbedding | None:
    embedding = text_encoder.get_input_embeddings()
    return embedding if isinstance(embedding, IdentifierEmbedding) else None


def remove_identifier_embeddings(text_encoder: nn.Module) -> None:
    """Put the plain token embedding back (no-op without learned identifiers)."""
    installed = identifier_embedding(text_encoder)
    if installed is not None:
        text_encoder.set_input_embeddings(installed.base_layer)


def add_identifier_embeddings(
    text_encoder: nn.Module, tokenizer, words: Sequence[str], vectors: torch.Tensor | None = None
) -> IdentifierEmbedding:
    """Give ``words`` their own embedding vectors (trainable; initialised from their current rows).

    Replaces identifiers installed before, so one text encoder holds one set at a time.
    """
    if not words:
        raise ValueError("no identifier words given.")
    ids = token_ids(tokenizer, words)
    remove_identifier_embeddings(text_encoder)
    layer = IdentifierEmbedding(text_encoder.get_input_embeddings(), list(words), ids, vectors)
    text_encoder.set_input_embeddings(layer)
    return layer


def save_identifier_embeddings(text_encoder: nn.Module, folder: str | os.PathLike) -> Path:
    """Write the learned vectors to ``folder/learned_embeds.safetensors`` atomically."""
    layer = identifier_embedding(text_encoder)
    if layer is None:
        raise ValueError("the text encoder has no learned identifier embeddings.")
    vectors = layer.identifier_vectors.detach().float().cpu()
    tensors = {word: vectors[i].contiguous() for i, word in enumerate(layer.words)}
    _atomic_write(Path(folder), {EMBEDDINGS_NAME: lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})})
    return Path(folder) / EMBEDDINGS_NAME


def read_identifier_embeddings(
    folder: str | os.PathLike, text_encoder: nn.Module, tokenizer
) -> dict[str, torch.Tensor] | None:
    """The vectors of ``folder/learned_embeds.safetensors`` by word, checked against this text
    encoder and tokenizer, or None without that file.

    A file for another model (vectors of another width, words this tokenizer does not hold as
    one token) or an unreadable one raises ValueError naming it.
    """
    path = Path(folder) / EMBEDDINGS_NAME
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
    width = text_encoder.get_input_embeddings().weight.shape[1]
    for word, vector in tensors.items():
        if vector.shape != (width,):
            raise ValueError(f"{path}: the vector for {word!r} has shape {list(vector.shape)}, but this text "
                             f"encoder embeds tokens in {width} dimensions; it was made for another model.")
    token_ids(tokenizer, list(tensors))
    return tensors


def install_identifier_embeddings(
    text_encoder: nn.Module, tokenizer, vectors: dict[str, torch.Tensor]
) -> IdentifierEmbedding:
    """Install frozen learned vectors (as read by ``read_identifier_embeddings``)."""
    words = list(vectors)
    layer = add_identifier_embeddings(text_encoder, tokenizer, words, torch.stack([vectors[w] for w in words]))
    layer.identifier_vectors.requires_grad_(False)
    return layer


def load_identifier_embeddings(text_encoder: nn.Module, tokenizer, folder: str | os.PathLike) -> bool:
    """Install the vectors of ``folder/learned_embeds.safetensors`` if the file exists.

    Returns whether it did. A file for another text encoder (other width, or words this
    tokenizer does not hold as one token) raises ValueError and changes nothing.
    """
    vectors = read_identifier_embeddings(folder, text_encoder, tokenizer)
    if vectors is None:
        return False
    install_identifier_embeddings(text_encoder, tokenizer, vectors)
    return True
