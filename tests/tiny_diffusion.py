"""Tiny diffusers models for the LoRA-format and SD-hub tests (importable as `tiny_diffusion`).

Everything is CPU, float32, eval mode and a pure function of its seed (the global RNG is left as it was).

tiny_unet()          UNet2DConditionModel, 4 latent channels at 8x8, cross-attention (dim 32) at the 4x4 level
tiny_pipeline(dir)   a StableDiffusionPipeline of random tiny parts (CLIP text encoder, that UNet, a VAE, DDIM)
                     saved with save_pretrained, so it reloads through the same from_pretrained code as a hub id
add_lora(unet, ...)  a peft LoRA on attention projections and resnet convs with non-zero random B
unet_batch(unet)     one (sample, timestep, encoder_hidden_states) batch for unet(**batch)
pixel_unet_and_loras(tmp)  the diffusion track's pixel-space UNet (TINY_UNET) and two LoRA folders;
                     pixel_unet_batches(seed): its calibration batches
"""
from __future__ import annotations

from pathlib import Path

import torch

CROSS_DIM = 32
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
CONVS = ("conv1", "conv2")
WORDS = ("a", "photo", "of", "dog", "cat", "toy", "sks", "zwx", "on", "the", "beach")


def _seeded(seed: int):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    return state


def tiny_unet(seed: int = 0):
    """UNet2DConditionModel (in/out 4 channels, 8x8): DownBlock2D at 8x8, CrossAttnDownBlock2D at 4x4, a
    cross-attention mid block; 4 transformer blocks (attn1/attn2 q, k, v, out) and 8 resnets (conv1, conv2)."""
    from diffusers import UNet2DConditionModel

    state = _seeded(seed)
    try:
        unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                    block_out_channels=(8, 16),
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=CROSS_DIM,
                                    norm_num_groups=4, attention_head_dim=2)
    finally:
        torch.random.set_rng_state(state)
    return unet.eval().requires_grad_(False)


def tiny_tokenizer():
    """A byte-level CLIPTokenizer with a few whole-word merges (transformers 5 builds it from vocab + merges)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + alphabet + [c + "</w>" for c in alphabet]
    merges = []
    for word in (w for w in WORDS if len(w) > 1):  # "d o g</w>" -> "do g</w>" -> "dog</w>"
        left = word[0]
        for i, char in enumerate(word[1:], 1):
            right = char + ("</w>" if i == len(word) - 1 else "")
            merges.append((left, right))
            left += right
            tokens.append(left)
    merges = list(dict.fromkeys(merges))
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, bos_token="<|startoftext|>",
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")


def tiny_pipeline(directory=None, seed: int = 0):
    """A StableDiffusionPipeline of random tiny components; saved to `directory` when given (then reloaded from
    there, as a hub id would be)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    state = _seeded(seed)
    try:
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=CROSS_DIM,
                                                    intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                                    max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                                    pad_token_id=1))
        vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            norm_num_groups=4, sample_size=16)
    finally:
        torch.random.set_rng_state(state)
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                   unet=tiny_unet(seed), scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
                                   safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    if directory is None:
        return pipe
    pipe.save_pretrained(str(directory))
    return load_pipeline(directory)


def load_pipeline(directory):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(directory), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lora_config(rank: int = 2, alpha: float = 4, conv: bool = True, **kwargs):
    from peft import LoraConfig

    targets = list(ATTENTION + (CONVS if conv else ()))
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian", **kwargs)


def add_lora(unet, name: str = "default", seed: int = 1, rank: int = 2, alpha: float = 4, conv: bool = True,
             **kwargs):
    """Attach a peft LoRA named `name` to `unet` with random A and B (B is zero at peft's init; here it is not,
    so the LoRA changes the output). Returns the LoraConfig."""
    config = lora_config(rank, alpha, conv, **kwargs)
    unet.add_adapter(config, adapter_name=name)
    state = _seeded(seed)
    try:
        with torch.no_grad():
            for param_name, param in unet.named_parameters():
                if f"lora_B.{name}." in param_name:
                    param.normal_(0, 0.3)
    finally:
        torch.random.set_rng_state(state)
    return config


def unet_batch(unet, batch_size: int = 2, tokens: int = 5, seed: int = 0) -> dict:
    """Random (sample (B, C, H, W), timestep (B,), encoder_hidden_states (B, tokens, cross dim))."""
    generator = torch.Generator().manual_seed(seed)
    size, channels = unet.config.sample_size, unet.config.in_channels
    return {"sample": torch.randn(batch_size, channels, size, size, generator=generator),
            "timestep": torch.tensor([10, 500][:batch_size] + [250] * max(0, batch_size - 2)),
            "encoder_hidden_states": torch.randn(batch_size, tokens, unet.config.cross_attention_dim,
                                                 generator=generator)}


@torch.no_grad()
def unet_output(unet, batch: dict) -> torch.Tensor:
    return unet(**batch).sample


def files(directory) -> list[str]:
    return sorted(p.name for p in Path(directory).iterdir())


def tiny_clip(directory):
    """A random CLIPModel (16x16 images, 8-d projections) and the tiny tokenizer saved to `directory`, for the
    CLIP-T / CLIP-I scorer."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = tiny_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_attention_heads=2,
                num_hidden_layers=1, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1, image_size=16,
                  patch_size=8)
    state = _seeded(0)
    try:
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    finally:
        torch.random.set_rng_state(state)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return str(directory)


TINY_UNET = dict(sample_size=8, in_channels=1, out_channels=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(8, 16), layers_per_block=1,
                 norm_num_groups=4, cross_attention_dim=12, attention_head_dim=2)


def pixel_unet_and_loras(tmp_path):
    """The diffusion track's pixel-space UNet (TINY_UNET, random) and two PEFT LoRA folders on its attention
    projections and resnet convs, written under tmp_path: (unet, [folder, folder])."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    from iteris_lab.tracks.diffusion import diffusion as dm

    torch.manual_seed(0)
    unet = dm.build_unet(TINY_UNET).eval().requires_grad_(False)
    dirs = []
    for k in range(2):
        config = LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
                            init_lora_weights=False)
        wrapped = inject_adapter_in_model(config, dm.build_unet(TINY_UNET))
        state = {f"base_model.model.{n}": v for n, v in get_peft_model_state_dict(wrapped).items()}
        path = tmp_path / f"lora{k}"
        path.mkdir()
        save_file({n: v.contiguous() for n, v in state.items()}, str(path / "adapter_model.safetensors"))
        config.save_pretrained(str(path))
        dirs.append(path)
    return unet, dirs


def pixel_unet_batches(seed, lengths=(3, 5)):
    """Noisy-image calibration batches for pixel_unet_and_loras' UNet (conditioning with padding positions)."""
    from iteris_lab.tracks.diffusion import diffusion as dm

    generator = torch.Generator().manual_seed(seed)
    cond = torch.randn(len(lengths), 6, 12, generator=generator)
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    images = torch.rand(len(lengths), 1, 8, 8, generator=generator) * 2 - 1
    return dm.noisy_batches(images, cond, mask, timesteps=(100, 700), batch_size=2, seed=seed)
