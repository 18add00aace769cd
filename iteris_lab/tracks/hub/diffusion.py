"""Hub recipe for text-to-image: Stable Diffusion 1.5 with DreamBooth-style concept LoRAs, merged by every method.

    config = sd_hub_config()                   # ITERIS_PROFILE=gpu: SD 1.5, two subjects, the settings below
    report = run_sd_hub(config, "runs/sd15")   # train missing LoRAs, merge, write merged LoRA files, sample grids

Each concept is a subject bound to a rare token ("a photo of sks dog"), learned from a few hub images with prior
preservation: every step also denoises images of the plain class ("a photo of a dog") that the base pipeline drew,
so the LoRA acts when its token is asked for and leaves the class alone. The LoRAs are saved as diffusers files
(pytorch_lora_weights.safetensors) and read back with iteris_lab.lora_formats, as any downloaded LoRA would be.

Conditioning: SD 1.x was trained on all 77 CLIP positions (the padding positions hold end-of-text states the UNet
attends to) and its pipeline passes no mask, so training, calibration and sampling pass the 77 hidden states with no
encoder_attention_mask: every cross-attention key/value row is real conditioning and enters the Grams.

Calibration (IterIS, RegMean): per concept, its instance images' VAE latents noised at fixed timesteps with seeded
noise (tracks/diffusion/diffusion.py: noisy_batches), with prompts holding the concept's token; one conditional UNet pass each.
Conv LoRAs (resnet conv1/conv2) are optional: on SD 1.5 their unfolded Grams reach 11520² per 1280-channel layer.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from ...lora_formats import WEIGHT_NAMES, read_diffusers_lora, write_diffusers_lora
from ...profiles import Profile, current_profile
from .. import harness
from ..diffusion.diffusion import noisy_batches
from ..diffusion.image_scores import ClipScorer, save_grid, to_pixels
from ..training import Training, train



@dataclass(frozen=True)
class SDConcept:
    """A subject bound to a rare token; `source` is a hub dataset whose files are the subject's images."""

    name: str
    token: str
    class_noun: str
    source: str

    @property
    def phrase(self) -> str:
        return f"{self.token} {self.class_noun}"

    @property
    def instance_prompt(self) -> str:
        return f"a photo of {self.phrase}"

    @property
    def class_prompt(self) -> str:
        return f"a photo of a {self.class_noun}"


CONCEPTS = (SDConcept("dog", "sks", "dog", "diffusers/dog-example"),  # 5 photos of one dog
            SDConcept("cat_toy", "zwx", "toy", "diffusers/cat_toy_example"))  # 6 photos of one cat figurine
CALIBRATION_TEMPLATES = ("a photo of {}", "a close-up photo of {}", "{} on the grass", "a picture of {} indoors",
                         "{} in the snow")


@dataclass(frozen=True)
class SDHubConfig:
    """One Stable Diffusion hub run (defaults: ITERIS_PROFILE=gpu)."""

    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # hub id or local folder
    concepts: tuple[SDConcept, ...] = CONCEPTS
    resolution: int = 512
    # LoRA
    rank: int = 8
    lora_alpha: float = 8
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    conv: bool = False  # also resnet conv1/conv2
    # training (AdamW, linear warmup, constant), DreamBooth prior preservation
    train_steps: int = 400
    lr: float = 1e-4
    train_batch_size: int = 2  # instance images per step (plus as many class images)
    warmup_steps: int = 20
    prior_weight: float = 1.0  # 0 turns prior preservation off
    class_images: int = 50
    class_image_steps: int = 25
    # merging
    calibration_images: int = 5  # instance images per concept (x calibration_timesteps passes)
    calibration_timesteps: tuple[int, ...] = (100, 300, 500, 700, 900)
    calibration_batch_size: int = 5
    max_iter: int = 10
    alpha: float = 1e-4
    adaptive_weights: str = "official"
    methods: tuple[str, ...] = ("linear", "task_arithmetic", "ties", "regmean", "iteris")
    export_rank: int | None = None  # None: the exact merged rank Σ r_i where the method has it
    # sampling and scoring
    sample_steps: int = 30
    guidance: float = 7.5
    samples_per_prompt: int = 4
    clip_model: str | None = "openai/clip-vit-base-patch32"  # None: images and timings only
    dtype: str = "float32"
    device: str | None = None  # None: CUDA when available
    seed: int = 0

    def lora_targets(self) -> list[str]:
        return list(self.target_modules) + (["conv1", "conv2"] if self.conv else [])

    def sample_prompts(self) -> list[str]:
        """Each concept's instance prompt, then one prompt asking for all of them."""
        both = "a photo of " + " and ".join(c.phrase for c in self.concepts)
        return [c.instance_prompt for c in self.concepts] + [both]


def sd_hub_config(profile: Profile | None = None, **overrides) -> SDHubConfig:
    """SDHubConfig sized by a profile (default: $ITERIS_PROFILE): gpu the defaults, cpu fewer steps and samples,
    ci the smallest run that exercises every stage. `overrides` win."""
    profile = profile or current_profile()
    sizes = dict(max_iter=profile.max_iter)
    if profile.name == "cpu":
        sizes.update(resolution=256, train_steps=100, class_images=8, sample_steps=20, samples_per_prompt=2)
    if profile.name == "ci":
        sizes.update(train_steps=2, warmup_steps=1, class_images=2, class_image_steps=2, calibration_images=2,
                     calibration_timesteps=(100, 700), calibration_batch_size=4, sample_steps=2,
                     samples_per_prompt=1)
    return replace(SDHubConfig(), **{**sizes, **overrides})


# ---------------------------------------------------------------- data

ImageSource = Callable[[SDConcept], list]  # concept -> PIL images of the subject


def hub_images(concept: SDConcept) -> list:
    """The image files (jpg/jpeg/png) of the hub dataset `concept.source`, sorted by name, as RGB PIL images."""
    from huggingface_hub import snapshot_download
    from PIL import Image

    folder = Path(snapshot_download(concept.source, repo_type="dataset",
                                    allow_patterns=["*.jpg", "*.jpeg", "*.png", "*.JPG", "*.JPEG", "*.PNG"]))
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise FileNotFoundError(f"no images in the hub dataset {concept.source}.")
    return [Image.open(p).convert("RGB") for p in files]


# ---------------------------------------------------------------- the pipeline's parts


def load_pipeline(model: str, dtype: str = "float32", device: str | None = None):
    """StableDiffusionPipeline (no safety checker) on `device`, every part frozen, progress bars off."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, dtype=getattr(torch, dtype), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False).eval()
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """CLIP last hidden states (N, 77, d) of prompts padded to the tokenizer's 77 positions (no mask: see above)."""
    tokens = pipe.tokenizer(list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt")
    return pipe.text_encoder(tokens.input_ids.to(pipe.device))[0]


@torch.no_grad()
def encode_images(pipe, pixels: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """VAE latents (N, 4, H/8, W/8) of pixels in [-1, 1]: the posterior mean times the VAE's scaling factor."""
    vae = pipe.vae
    out = [vae.encode(pixels[i:i + batch_size].to(pipe.device, vae.dtype)).latent_dist.mean
           for i in range(0, len(pixels), batch_size)]
    return torch.cat(out) * vae.config.scaling_factor


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)  # a CPU generator: the same noise on every device


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], config: SDHubConfig, per_prompt: int, seed: int,
             steps: int | None = None) -> list:
    """PIL images, `per_prompt` for each prompt in order; prompt i draws its start noise from seed + i."""
    images = []
    for i, text in enumerate(prompts):
        images += pipe(text, num_images_per_prompt=per_prompt, num_inference_steps=steps or config.sample_steps,
                       guidance_scale=config.guidance, height=config.resolution, width=config.resolution,
                       generator=_generator(seed + i)).images
    return images


def class_images(pipe, concept: SDConcept, config: SDHubConfig, folder) -> list:
    """Prior-preservation images of the plain class drawn by the base pipeline, cached as PNGs in `folder`."""
    from PIL import Image

    folder = Path(folder)
    have = sorted(folder.glob("*.png"))
    if len(have) < config.class_images:
        folder.mkdir(parents=True, exist_ok=True)
        drawn = generate(pipe, [concept.class_prompt] * (config.class_images - len(have)), config, 1,
                         config.seed + 1000 + len(have), config.class_image_steps)
        for i, image in enumerate(drawn, len(have)):
            image.save(folder / f"{i:04d}.png")
        have = sorted(folder.glob("*.png"))
    return [Image.open(p).convert("RGB") for p in have[:config.class_images]]


# ---------------------------------------------------------------- LoRA training


def _noise_target(scheduler, latents, noise, t):
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    return noise


def train_concept_lora(pipe, concept: SDConcept, instance: torch.Tensor, prior: torch.Tensor | None, out_dir,
                       config: SDHubConfig) -> dict:
    """Train a LoRA on pipe.unet for one concept and save it as a diffusers file in out_dir (with recipe.json);
    instance / prior are VAE latents. Reuses an existing file ("trained": False). The UNet is left without
    adapters and with its base weights as before."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    out_dir = Path(out_dir)
    if (out_dir / WEIGHT_NAMES[0]).is_file():
        recipe_file = out_dir / "recipe.json"
        return {**(json.loads(recipe_file.read_text()) if recipe_file.is_file() else {}), "trained": False}
    torch.manual_seed(config.seed)  # the LoRA A init
    lora = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, target_modules=config.lora_targets(),
                      init_lora_weights="gaussian", lora_dropout=0.0)
    unet, scheduler = pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config)
    unet.add_adapter(lora, adapter_name=concept.name)
    start = time.perf_counter()
    try:
        params = [p for n, p in unet.named_parameters() if "lora_" in n]
        for p in params:
            p.data = p.data.float()
            p.requires_grad_(True)
        losses = _fit(unet, scheduler, params, instance, prior, encode_prompts(pipe, [concept.instance_prompt]),
                      encode_prompts(pipe, [concept.class_prompt]), config)
        StableDiffusionPipeline.save_lora_weights(
            out_dir, unet_lora_layers=get_peft_model_state_dict(unet, adapter_name=concept.name),
            unet_lora_adapter_metadata=lora.to_dict())
    finally:
        unet.unload_lora()  # the peft layers out, base weights untouched
        unet.eval()
    tail = losses[-10:]
    recipe = {"base_model": config.model, "concept": asdict(concept), "instance_prompt": concept.instance_prompt,
              "class_prompt": concept.class_prompt, "rank": config.rank, "lora_alpha": config.lora_alpha,
              "target_modules": config.lora_targets(), "steps": config.train_steps, "lr": config.lr,
              "batch_size": config.train_batch_size, "prior_weight": config.prior_weight,
              "instance_images": len(instance), "class_images": 0 if prior is None else len(prior),
              "resolution": config.resolution, "seed": config.seed,
              "train_time_s": round(time.perf_counter() - start, 2), "first_loss": losses[0],
              "final_loss": sum(tail) / len(tail)}
    (out_dir / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return {**recipe, "trained": True}


def _fit(unet, scheduler, params, instance, prior, instance_cond, class_cond, config: SDHubConfig) -> list[float]:
    """DreamBooth loss: ‖ε̂ − ε‖² on instance latents + prior_weight · the same on class latents; AdamW
    with a linear warmup, then constant."""
    generator, device = _generator(config.seed + 1), instance_cond.device
    use_prior = prior is not None and config.prior_weight > 0
    n = config.train_batch_size

    def loss_of_step(_):
        pick = torch.randint(0, len(instance), (n,), generator=generator)
        latents, cond = [instance[pick]], [instance_cond.expand(n, -1, -1)]
        if use_prior:
            latents.append(prior[torch.randint(0, len(prior), (n,), generator=generator)])
            cond.append(class_cond.expand(n, -1, -1))
        latents, cond = torch.cat(latents).float(), torch.cat(cond)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator).to(device)
        noisy = scheduler.add_noise(latents, noise, t)
        with torch.autocast(device.type, enabled=unet.dtype != torch.float32, dtype=unet.dtype):
            pred = unet(noisy.to(unet.dtype), t, encoder_hidden_states=cond.to(unet.dtype)).sample.float()
        errors = (pred - _noise_target(scheduler, latents, noise, t)).square().mean(dim=(1, 2, 3))
        return errors[:n].mean() + (config.prior_weight * errors[n:].mean() if use_prior else 0.0)

    settings = Training(steps=config.train_steps, lr=config.lr, batch_size=n, warmup_steps=max(1, config.warmup_steps),
                        schedule="constant", weight_decay=1e-2, seed=config.seed)
    unet.train()
    return train(params, loss_of_step, settings, desc="train concept")


# ---------------------------------------------------------------- calibration and scoring


def calibration(pipe, concept: SDConcept, latents: torch.Tensor, config: SDHubConfig) -> list[dict]:
    """UNet batches {sample, timestep, encoder_hidden_states} for one concept: its first calibration_images latents,
    prompt i = CALIBRATION_TEMPLATES[i] with the concept's phrase, at every calibration timestep."""
    from diffusers import DDPMScheduler

    latents = latents[:config.calibration_images].float().cpu()
    prompts = [CALIBRATION_TEMPLATES[i % len(CALIBRATION_TEMPLATES)].format(concept.phrase)
               for i in range(len(latents))]
    cond = encode_prompts(pipe, prompts).float().cpu()
    batches = noisy_batches(latents, cond, torch.ones(cond.shape[:2], dtype=torch.long),
                            config.calibration_timesteps, config.calibration_batch_size, config.seed,
                            DDPMScheduler.from_config(pipe.scheduler.config))
    dtype = pipe.unet.dtype
    return [{"sample": b["sample"].to(dtype), "timestep": b["timestep"],
             "encoder_hidden_states": b["encoder_hidden_states"].to(dtype)} for b in batches]


def _plain(prompt: str, concepts: Sequence[SDConcept]) -> str:
    """The prompt with rare tokens removed ("a photo of sks dog" -> "a photo of dog"), for CLIP-T."""
    for c in concepts:
        prompt = prompt.replace(c.token + " ", "")
    return prompt


def score_images(scorer: ClipScorer | None, images: list, prompts: list[str], per_prompt: int,
                 references: dict[str, torch.Tensor], concepts: Sequence[SDConcept]) -> dict:
    """Per prompt: CLIP-T against the plain prompt and CLIP-I against each concept named in it."""
    if scorer is None:
        return {}
    embedded, texts = scorer.images(images), scorer.texts([_plain(p, concepts) for p in prompts])
    scores = {}
    for i, prompt in enumerate(prompts):
        rows = embedded[i * per_prompt:(i + 1) * per_prompt]
        scores[prompt] = {"clip_t": float((rows @ texts[i]).mean()),
                          "clip_i": {c.name: float((rows @ references[c.name].T).mean())
                                     for c in concepts if c.token in prompt.split()}}
    return scores


# ---------------------------------------------------------------- the run


@dataclass
class SdTrack(harness.Track):
    """Stable Diffusion's UNet and the concept LoRAs on the harness: a model's "metrics" are its sample grid of
    config.sample_prompts() and their CLIP scores; each merge is also written as a diffusers LoRA file."""

    pipe: object
    config: SDHubConfig
    out: Path
    scorer: ClipScorer | None
    adapters: dict
    batches: list  # per concept: calibration()
    references: dict[str, torch.Tensor] = field(default_factory=dict)  # CLIP image embeddings per concept
    name: str = "sd"

    @property
    def model(self):
        return self.pipe.unet

    @property
    def merge_options(self) -> dict:
        return {"seed": self.config.seed}

    def evaluate(self, split: str, limit: int | None, tasks=None, label: str = "") -> dict:
        """Sample every prompt with the UNet's current weights; grid + CLIP scores + seconds."""
        start, prompts, k = time.perf_counter(), self.config.sample_prompts(), self.config.samples_per_prompt
        images = generate(self.pipe, prompts, self.config, k, self.config.seed)
        grid = save_grid(images, k, self.out / "grids" / f"{label.replace(':', '_')}.png")
        return {"grid": str(Path(grid).relative_to(self.out)), "sample_seconds": time.perf_counter() - start,
                "scores": score_images(self.scorer, images, prompts, k, self.references, self.config.concepts)}

    def calibration(self, samples: int, batch_size: int) -> list[list]:
        return self.batches

    def score(self, label: str, method: str, metrics: dict, refs: harness.References) -> dict:
        return {"label": label, "method": method, **metrics}

    def after_merge(self, label: str, result) -> dict:
        export = write_diffusers_lora(result, self.out / "merged" / label, rank=self.config.export_rank,
                                      overwrite=True)  # the track rewrites its own merges
        return {"lora_file": str(Path(export.path).relative_to(self.out)), "export_rank": max(export.ranks.values()),
                "export_max_relative_error": export.max_relative_error}


def run_sd_hub(config: SDHubConfig, out_dir, images: ImageSource = hub_images, pipe=None) -> dict:
    """Load config.model (or use `pipe`), train the concept LoRAs missing under out_dir/adapters/<name>, merge them
    with every method in config.methods, write each merge to out_dir/merged/<method>/pytorch_lora_weights.safetensors,
    sample a grid per model (base, each LoRA, each merge) and write out_dir/sd_hub_results.json; returns that
    report. `images(concept)` gives each concept's PIL images (default: the hub dataset)."""
    start, out = time.perf_counter(), Path(out_dir)
    pipe = pipe or load_pipeline(config.model, config.dtype, config.device)
    loaded = time.perf_counter()
    instance = {c.name: encode_images(pipe, to_pixels(images(c), config.resolution)) for c in config.concepts}
    recipes = {}
    for c in config.concepts:
        prior = None
        if config.prior_weight > 0:
            drawn = class_images(pipe, c, config, out / "class_images" / c.class_noun)
            prior = encode_images(pipe, to_pixels(drawn, config.resolution))
        recipes[c.name] = train_concept_lora(pipe, c, instance[c.name], prior, out / "adapters" / c.name, config)
    trained = time.perf_counter()
    scorer = ClipScorer(config.clip_model, pipe.device) if config.clip_model else None
    track = SdTrack(pipe, config, out, scorer,
                    {c.name: read_diffusers_lora(out / "adapters" / c.name, pipe.unet) for c in config.concepts},
                    [calibration(pipe, c, instance[c.name], config) for c in config.concepts])
    if scorer is not None:
        track.references = {c.name: scorer.images(images(c)) for c in config.concepts}
    profile = Profile("hub", calibration_samples=config.calibration_images, many_samples=config.calibration_images,
                      max_iter=config.max_iter, test_limit=None, batch_size=config.calibration_batch_size)
    iteris = {"alpha": config.alpha, "adaptive_weights": config.adaptive_weights}
    rows = harness.run_methods(track, profile, config.methods, iteris=iteris, progress=False)
    references, rows = rows[:1 + len(config.concepts)], rows[1 + len(config.concepts):]
    report = {"model": config.model, "config": asdict(config), "environment": harness.environment(),
              "prompts": config.sample_prompts(), "adapters": recipes, "references": references, "results": rows,
              "timings": {"load_s": loaded - start, "train_s": trained - loaded,
                          "total_s": time.perf_counter() - start}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sd_hub_results.json").write_text(json.dumps(report, indent=2, default=str))
    return report
