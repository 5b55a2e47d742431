"""Tiny random-weight Flux.1 and SD3 pipeline folders, built from configs (no hub)."""
from pathlib import Path

import torch

PROMPT_WORDS = ("a photo of sks zwx qwe star circle square on the black blue red green white yellow purple "
                "orange background with stripes").split()


def t5_tokenizer(max_length: int = 32):
    """A T5 tokenizer (Unigram over our prompts' words and single letters) made with the tokenizers library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in PROMPT_WORDS]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz,\u2581"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


def t5_encoder(d_model: int, vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=d_model, d_ff=2 * d_model, d_kv=8, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0,
                                   pad_token_id=0, eos_token_id=1))


def clip_config(hidden: int, projection: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=732, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=24, bos_token_id=730, eos_token_id=731,
                          pad_token_id=731, projection_dim=projection)


def shifted_vae():
    from diffusers import AutoencoderKL

    from boft_diffusion.tiny.bundled import EMBEDDED_MODEL_DIR

    return AutoencoderKL.from_pretrained(EMBEDDED_MODEL_DIR / "vae", torch_dtype=torch.float32, shift_factor=0.1)


def clip_tokenizer():
    from transformers import CLIPTokenizer

    from boft_diffusion.tiny.bundled import EMBEDDED_MODEL_DIR

    return CLIPTokenizer.from_pretrained(EMBEDDED_MODEL_DIR / "tokenizer")


def make_tiny_flux(folder, seed: int = 0, guidance_embeds: bool = True):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    t5 = t5_tokenizer()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 6, 6))
    pipe = FluxPipeline(transformer=transformer, vae=shifted_vae(), text_encoder=CLIPTextModel(clip_config(32, 32)),
                        tokenizer=clip_tokenizer(), text_encoder_2=t5_encoder(32, len(t5)), tokenizer_2=t5,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True,
                                                                  base_shift=0.5, max_shift=1.15))
    pipe.save_pretrained(folder)
    return Path(folder)


def make_tiny_sd3(folder, seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    t5 = t5_tokenizer()
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                        caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=shifted_vae(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=CLIPTextModelWithProjection(clip_config(16, 32)), tokenizer=clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(clip_config(16, 32)), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(32, len(t5)), tokenizer_3=t5)
    pipe.save_pretrained(folder)
    return Path(folder)
