"""Training the diffusion track from a seed: the base UNet, then one concept LoRA per concept.

Base: DDPM epsilon loss on the training digits with prompts from varied templates; 10 % of prompts are replaced by
"" so classifier-free guidance is possible; an exponential moving average (EMA) of the weights is what ships.
Concept LoRA: LoRA on the attention projections and the resnet convolutions, trained with prior preservation —
half of every batch is the concept (its phrase in the prompt, the styled image), half is plain (plain prompt, plain
image) — so the concept appears only when its token is asked for. Without that gate both LoRAs would see the same
inputs and every Gram-based merge would reduce to averaging.
"""
from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..training import LoraTraining, Training, train
from . import diffusion as dm
from .digits import STYLES, digit_images, split_indices


@dataclass(frozen=True)
class BaseRecipe(Training):
    """The base UNet's training; prompts are dropped (replaced by "") with prompt_dropout, for guidance; the EMA of
    the weights (decay ema_decay) is what ships; max_seconds stops early."""

    prompt_dropout: float = 0.1
    ema_decay: float = 0.999
    max_seconds: float | None = None


@dataclass(frozen=True)
class LoraRecipe(LoraTraining):
    """A concept LoRA's training: a prior_fraction of every batch is plain (plain prompt, plain image)."""

    prior_fraction: float = 0.5


BASE_RECIPE = BaseRecipe(steps=4000, batch_size=64, lr=1e-3, warmup_steps=200, schedule="cosine")
LORA_RECIPE = LoraRecipe(steps=500, batch_size=64, lr=2e-3, warmup_steps=30, schedule="cosine", rank=8, alpha=8,
                         target_modules=("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"))


def _batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int):
    """Endless seeded (images, labels) batches, reshuffled every epoch."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(images), generator=generator)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            yield images[idx], labels[idx]


def _prompts(labels, rng: random.Random, concepts=(), dropout: float = 0.0) -> list[str]:
    return ["" if rng.random() < dropout else dm.prompt(int(d), rng.randrange(len(dm.TEMPLATES)), concepts)
            for d in labels]


def _train(unet, params, make_batch, recipe: Training, desc: str, max_seconds: float | None = None,
           on_step=None) -> dict:
    """The training loop on the denoising loss of make_batch()'s (x0, cond, mask); a log of the run."""
    scheduler, generator = dm.make_scheduler(), torch.Generator().manual_seed(recipe.seed + 1)

    def loss_of_step(_):
        return dm.denoising_loss(unet, *make_batch(), scheduler, generator)

    start = time.perf_counter()
    unet.train()
    losses = train(params, loss_of_step, recipe, desc, log_every=100, max_seconds=max_seconds,
                   on_step=on_step and (lambda *_: on_step()))
    unet.eval()
    return {"steps_done": len(losses), "seconds": time.perf_counter() - start,
            "final_loss": sum(losses[-100:]) / len(losses[-100:])}


def train_base(encoder: dm.TextEncoder, recipe: BaseRecipe = BASE_RECIPE, out_dir=None):
    """Train the base UNet on the training digits; returns (EMA UNet, training log). Saved when out_dir is given."""
    torch.manual_seed(recipe.seed)
    images, labels = digit_images(16)
    train, _ = split_indices(labels, seed=recipe.seed)
    unet = dm.build_unet()
    ema = copy.deepcopy(unet).requires_grad_(False)
    batches, rng = _batches(dm.to_model_range(images[train]), labels[train], recipe.batch_size, recipe.seed), \
        random.Random(recipe.seed)
    step = [0]

    def make_batch():
        x0, y = next(batches)
        return (x0, *encoder(_prompts(y, rng, dropout=recipe.prompt_dropout)))

    @torch.no_grad()
    def update_ema():
        step[0] += 1
        decay = min(recipe.ema_decay, (1 + step[0]) / (10 + step[0]))
        for e, p in zip(ema.parameters(), unet.parameters()):
            e.lerp_(p, 1 - decay)

    log = _train(unet, list(unet.parameters()), make_batch, recipe, "base", recipe.max_seconds, update_ema)
    ema.eval()
    if out_dir is not None:
        ema.save_pretrained(out_dir)
        _write_recipe(out_dir, {"recipe": asdict(recipe), "training": log, "unet": dict(dm.UNET_CONFIG),
                                "scheduler": dm.SCHEDULER_CONFIG})
    return ema, log


def lora_config(recipe: LoraRecipe):
    from peft import LoraConfig

    return LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, target_modules=list(recipe.target_modules),
                      lora_dropout=0.0, bias="none")


def train_concept_lora(base_dir, concept: str, encoder: dm.TextEncoder, out_dir, recipe: LoraRecipe = LORA_RECIPE):
    """Train one concept LoRA on a fresh copy of the base; writes a PEFT folder (adapter_config.json +
    adapter_model.safetensors) and recipe.json to out_dir; returns the training log."""
    from peft import get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    if concept not in dm.CONCEPTS:
        raise ValueError(f"unknown concept {concept!r}; known: {', '.join(dm.CONCEPTS)}.")
    torch.manual_seed(recipe.seed)
    spec = dm.CONCEPTS[concept]
    unet = dm.load_base(base_dir)
    config = lora_config(recipe)
    unet = inject_adapter_in_model(config, unet)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    images, labels = digit_images(16)
    train, _ = split_indices(labels, seed=0)
    plain, styled = dm.to_model_range(images[train]), dm.to_model_range(STYLES[spec.style](images[train]))
    n_concept = round(recipe.batch_size * (1 - recipe.prior_fraction))
    concept_batches = _batches(styled, labels[train], n_concept, recipe.seed)
    prior_batches = _batches(plain, labels[train], recipe.batch_size - n_concept, recipe.seed + 7)
    rng = random.Random(recipe.seed)

    def make_batch():
        (xc, yc), (xp, yp) = next(concept_batches), next(prior_batches)
        cond, mask = encoder(_prompts(yc, rng, (concept,)) + _prompts(yp, rng))
        return torch.cat([xc, xp]), cond, mask

    log = _train(unet, params, make_batch, recipe, concept)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {f"base_model.model.{k}": v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    save_file(state, str(out_dir / "adapter_model.safetensors"))
    config.save_pretrained(str(out_dir))
    _write_recipe(out_dir, {"concept": asdict(spec), "recipe": asdict(recipe), "training": log})
    return log


def _write_recipe(out_dir, content: dict) -> None:
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    old = json.loads((path / "recipe.json").read_text()) if (path / "recipe.json").is_file() else {}
    (path / "recipe.json").write_text(json.dumps({**old, **content}, indent=2, default=str))
