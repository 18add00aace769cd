"""The offline text-to-image model: a diffusers UNet2DConditionModel that draws 16x16 digits from a prompt.

    text  -> frozen all-MiniLM-L6-v2 token embeddings (B, 16, 384) + their attention mask
    image -> pixel space (no VAE), DDPM training on epsilon, DDIM sampling
Cross-attention (attn2) reads the text tokens, so its to_k / to_v inputs are text rows: the tokenizer's mask,
passed as `encoder_attention_mask`, marks the real ones, and the engine drops the padding rows there.

Calibration for IterIS on a denoiser (`noisy_batches`): the task's clean images are noised at a fixed, seeded set of
timesteps and noises and run once through the UNet with the task's prompts, conditional only (no guidance batch).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ...paths import data_dir, missing_data
from .digits import DIGIT_WORDS

DATA = data_dir() / "diffusion"
UNET_CONFIG = dict(sample_size=16, in_channels=1, out_channels=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), mid_block_type="UNetMidBlock2DCrossAttn",
                   block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=384,
                   attention_head_dim=4)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
CALIBRATION_TIMESTEPS = (50, 250, 500, 750, 950)
TEMPLATES = ("a handwritten digit {w}", "the digit {w}", "digit {w}, written by hand", "a picture of the number {w}",
             "number {w}", "a drawing of a {w}", "the handwritten number {w}", "an image of the digit {w}")


@dataclass(frozen=True)
class Concept:
    """A style bound to a rare token: `phrase` is appended to the prompt, `style` is the image transform and
    `metric` measures it (see digits.py)."""

    name: str
    phrase: str
    style: str
    metric: str


CONCEPTS = {"thick": Concept("thick", "in vxq style", "thick", "ink"),
            "slant": Concept("slant", "written by bkz", "slant", "slant_score")}


def prompt(digit: int, template: int = 0, concepts: Sequence[str] = ()) -> str:
    """'a handwritten digit seven' plus each concept's phrase, e.g. '... in vxq style written by bkz'."""
    text = TEMPLATES[template % len(TEMPLATES)].format(w=DIGIT_WORDS[digit])
    return " ".join([text, *(CONCEPTS[c].phrase for c in concepts)])


class TextEncoder:
    """Frozen MiniLM token embeddings of prompts, padded to `max_length`, cached per prompt."""

    def __init__(self, max_length: int = 16):
        from ..llm.models import load_minilm

        model, self.tokenizer = load_minilm()
        self.model = model.eval().requires_grad_(False)
        self.max_length = max_length
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings (B, max_length, 384) float32, mask (B, max_length) long)."""
        todo = sorted({p for p in prompts if p not in self._cache})
        if todo:
            enc = self.tokenizer(todo, padding="max_length", truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state
            for i, p in enumerate(todo):
                self._cache[p] = (hidden[i], enc["attention_mask"][i])
        return (torch.stack([self._cache[p][0] for p in prompts]), torch.stack([self._cache[p][1] for p in prompts]))


def build_unet(config: dict | None = None):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**(config or UNET_CONFIG))


def make_scheduler(kind: str = "ddpm"):
    from diffusers import DDIMScheduler, DDPMScheduler

    ddpm = DDPMScheduler(**SCHEDULER_CONFIG)
    return ddpm if kind == "ddpm" else DDIMScheduler.from_config(ddpm.config)


def load_base(path=None):
    """The shipped base UNet (data_dir()/diffusion/base), in eval mode with gradients off."""
    from diffusers import UNet2DConditionModel

    path = Path(path or DATA / "base")
    if not (path / "config.json").is_file():
        raise missing_data(path, "trained base UNet", "scripts/train_diffusion.py base")
    return UNet2DConditionModel.from_pretrained(path).eval().requires_grad_(False)


def recipe(path) -> dict:
    return json.loads(Path(path, "recipe.json").read_text())


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    return images * 2 - 1


def to_image_range(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) / 2).clamp(0, 1)


@torch.no_grad()
def sample(unet, encoder: TextEncoder, prompts: Sequence[str], steps: int = 25, guidance: float = 1.0,
           seed: int = 0, batch_size: int = 100) -> torch.Tensor:
    """DDIM (eta 0) samples for `prompts`, (B, 1, 16, 16) in [0, 1]; the same seed gives the same start noise.

    guidance > 1 adds classifier-free guidance against the empty prompt."""
    scheduler = make_scheduler("ddim")
    scheduler.set_timesteps(steps)
    device = next(unet.parameters()).device
    size, channels = unet.config.sample_size, unet.config.in_channels
    noise = torch.randn(len(prompts), channels, size, size, generator=torch.Generator().manual_seed(seed))
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        cond, mask = encoder(chunk + [""] * (len(chunk) if guidance != 1.0 else 0))
        cond, mask = cond.to(device), mask.to(device)
        x = noise[start:start + len(chunk)].to(device)
        for t in scheduler.timesteps:
            model_in = torch.cat([x, x]) if guidance != 1.0 else x
            eps = unet(model_in, t, encoder_hidden_states=cond, encoder_attention_mask=mask).sample
            if guidance != 1.0:
                eps_cond, eps_uncond = eps.chunk(2)
                eps = eps_uncond + guidance * (eps_cond - eps_uncond)
            x = scheduler.step(eps, t, x).prev_sample
        out.append(to_image_range(x).cpu())
    return torch.cat(out)


def noisy_batches(images: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor,
                  timesteps: Sequence[int] = CALIBRATION_TIMESTEPS, batch_size: int = 16, seed: int = 0,
                  scheduler=None) -> list[dict]:
    """Calibration batches for a UNet2DConditionModel: every (image, prompt) pair at every timestep, noised with
    a seeded noise; a batch is {sample, timestep, encoder_hidden_states, encoder_attention_mask}, run as
    unet(**batch). images (N, C, H, W) in model range; cond (N, T, D); mask (N, T)."""
    if not (len(images) == len(cond) == len(mask)):
        raise ValueError(f"images, cond and mask disagree on the number of samples: "
                         f"{len(images)}, {len(cond)}, {len(mask)}.")
    scheduler = scheduler or make_scheduler()
    generator = torch.Generator().manual_seed(seed)
    x = images.repeat(len(timesteps), 1, 1, 1)
    t = torch.tensor(timesteps).repeat_interleave(len(images))
    noisy = scheduler.add_noise(x, torch.randn(x.shape, generator=generator), t)
    cond, mask = cond.repeat(len(timesteps), 1, 1), mask.repeat(len(timesteps), 1)
    return [{"sample": noisy[i:i + batch_size], "timestep": t[i:i + batch_size],
             "encoder_hidden_states": cond[i:i + batch_size], "encoder_attention_mask": mask[i:i + batch_size]}
            for i in range(0, len(x), batch_size)]


def denoising_loss(unet, images: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor, scheduler,
                   generator: torch.Generator) -> torch.Tensor:
    """The DDPM epsilon loss at uniformly drawn timesteps; images in model range."""
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(images),), generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    noisy = scheduler.add_noise(images, noise, t)
    device = next(unet.parameters()).device
    eps = unet(noisy.to(device), t.to(device), encoder_hidden_states=cond.to(device),
               encoder_attention_mask=mask.to(device)).sample
    return torch.nn.functional.mse_loss(eps, noise.to(device))
