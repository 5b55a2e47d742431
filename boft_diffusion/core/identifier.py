"""Learned identifier embeddings (pivotal tuning): the embedding layer and installing it.

DreamBooth names the subject with a rare token ("sks"). Unlike textual inversion the words
already exist in the vocabulary; their rows are replaced by learned vectors. The layer takes
part in the adapter lifecycle of ``adapters.py`` like a BOFT layer: strength, enable/disable
and merge treat both alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class IdentifierVectors(nn.Module):
    """The learned rows of an IdentifierEmbedding, one per identifier token (float32)."""

    def __init__(self, vectors: torch.Tensor) -> None:
        super().__init__()
        self.vectors = nn.Parameter(vectors)


class IdentifierEmbedding(nn.Module):
    """A frozen token embedding whose rows for a few identifier tokens are learned vectors.

    DreamBooth names the subject with a rare token ("sks"). When the text encoder has barely
    trained that token, the instance prompt encodes almost like the class prompt and no adapter
    can tell them apart; learning the identifier's embedding (pivotal tuning) fixes that while
    every prompt without the identifier encodes exactly as before.
    """

    #: Name of the learned vectors below this module, the suffix of their full parameter name.
    PARAMETER_SUFFIX = "identifier.vectors"

    def __init__(
        self, base_layer: nn.Embedding, words: list[str], token_ids: list[int], vectors: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        if len(words) != len(token_ids):
            raise ValueError(f"{len(words)} identifier words but {len(token_ids)} token ids.")
        self.base_layer = base_layer
        self.words = list(words)
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long, device=base_layer.weight.device),
                             persistent=False)
        if vectors is None:
            vectors = base_layer.weight.detach()[self.token_ids]
        if vectors.shape != (len(token_ids), base_layer.embedding_dim):
            raise ValueError(f"identifier vectors have shape {list(vectors.shape)}, expected "
                             f"[{len(token_ids)}, {base_layer.embedding_dim}] for this text encoder.")
        # In a child module, so that the frozen (maybe half-precision) embedding weight stays the text
        # encoder's first parameter: transformers and diffusers read a model's dtype from it.
        self.identifier = IdentifierVectors(vectors.detach().float().clone().to(base_layer.weight.device))
        self.adapters_disabled = False
        self.strength = 1.0  # 0: the original rows, 1: the learned ones
        self.merged_rows: torch.Tensor | None = None  # the original rows while the learned ones are merged

    @property
    def identifier_vectors(self) -> nn.Parameter:
        return self.identifier.vectors

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def rows(self) -> torch.Tensor:
        """The identifier rows at the current strength (float32)."""
        vectors = self.identifier_vectors
        if self.strength != 1.0:
            original = self.weight[self.token_ids].float()
            vectors = original + self.strength * (vectors - original)
        return vectors

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeddings = self.base_layer(input_ids)
        if self.adapters_disabled or self.merged_rows is not None:
            return embeddings
        vectors = self.rows()
        matches = input_ids.unsqueeze(-1) == self.token_ids
        learned = matches.to(embeddings.dtype) @ vectors.to(embeddings.dtype)
        return torch.where(matches.any(-1, keepdim=True), learned, embeddings)

    def merge(self) -> None:
        """Write the rows into the base embedding, so that the forward costs the plain lookup."""
        if self.merged_rows is not None:
            return
        with torch.no_grad():
            rows = self.rows().to(self.weight.dtype)
            self.merged_rows = self.weight[self.token_ids].clone()
            self.weight[self.token_ids] = rows

    def unmerge(self) -> None:
        if self.merged_rows is None:
            return
        with torch.no_grad():
            self.weight[self.token_ids] = self.merged_rows
        self.merged_rows = None

    def folded_weight(self) -> torch.Tensor:
        """The embedding matrix with the learned rows written in (for merged exports)."""
        weight = self.weight.detach().clone()
        weight[self.token_ids] = self.identifier_vectors.detach().to(weight.dtype)
        return weight


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
        installed.unmerge()
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


def initializer_vectors(text_encoder: nn.Module, tokenizer, words: Sequence[str]) -> torch.Tensor:
    """The current embedding rows of ``words`` (one single-token word each), to start identifiers from.

    Textual inversion's initializer token: an identifier that starts as a word the model already
    draws (the class, say) may have less to learn than a rare token. On the tiny model, starting
    from the subject's colour did worse than the token's own row (docs/research/benchmarks_history.md, fifth round).
    """
    embedding = text_encoder.get_input_embeddings()
    base = embedding.base_layer if isinstance(embedding, IdentifierEmbedding) else embedding
    return base.weight.detach()[token_ids(tokenizer, words)].float().clone()


def install_identifier_embeddings(
    text_encoder: nn.Module, tokenizer, vectors: dict[str, torch.Tensor]
) -> IdentifierEmbedding:
    """Install frozen learned vectors (as read by ``read_identifier_embeddings``)."""
    words = list(vectors)
    layer = add_identifier_embeddings(text_encoder, tokenizer, words, torch.stack([vectors[w] for w in words]))
    layer.identifier_vectors.requires_grad_(False)
    return layer
