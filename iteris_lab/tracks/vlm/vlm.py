"""A small offline vision-language model: a LLaVA (`LlavaForConditionalGeneration`) made of a tiny SigLIP vision
tower trained in this project, a two-layer projector, and the real SmolLM2-135M-Instruct as the language model.

An image (3, 32, 32) becomes 4 x 4 = 16 patch tokens (SigLIP has no CLS token, hence the "full" feature
strategy); the projector maps each to SmolLM2's embedding width (576) and Llava writes them into the 16
`<image>` placeholder positions of the prompt

    <|im_start|>user\\n <image> x 16 \\n{instruction}<|im_end|>\\n<|im_start|>assistant\\n{caption}<|im_end|>

Only the vision tower, the projector and the embedding row of `<image>` are shipped (data_dir()/vlm/base); the language
model is loaded from its package at run time, so text-only inputs give exactly SmolLM2's logits.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ...paths import data_dir, missing_data
from ...rows import ROW_RULES, RowRule

VLM_DIR = data_dir() / "vlm"
BASE_DIR = VLM_DIR / "base"
ADAPTER_DIR = VLM_DIR / "adapters"
VISION_FILE = "vision.safetensors"
IMAGE_TOKEN = "<image>"
IMAGE_ROW = "image_token_embedding"
VISION_CONFIG = dict(image_size=32, patch_size=8, hidden_size=192, intermediate_size=768, num_hidden_layers=4,
                     num_attention_heads=3, num_channels=3, vision_use_head=False)
SHIPPED_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.")
# LoRA on the language model only: SigLIP's attention also has q_proj / k_proj / v_proj.
LM_QKV_REGEX = r".*language_model.*\.(q_proj|k_proj|v_proj)"


def image_seq_length(vision: dict) -> int:
    return (vision["image_size"] // vision["patch_size"]) ** 2


# ---------------------------------------------------------------- assembly


def build_vlm(language_model, tokenizer, vision: dict | None = None, seed: int = 0):
    """(LlavaForConditionalGeneration, tokenizer) around a causal LM (LlamaForCausalLM), in eval mode.

    The tokenizer gains `<image>` (a special token) and the LM's embedding one row for it, set to the mean of the
    other rows (deterministic; image features overwrite it in every forward, and the tied lm_head reads it).
    The vision tower and projector are initialised from `seed`. The LM passed in is resized in place.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    vision = dict(VISION_CONFIG if vision is None else vision)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    embed = language_model.get_input_embeddings()
    if embed.num_embeddings <= image_id:
        old = embed.num_embeddings
        language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            weight = language_model.get_input_embeddings().weight
            weight[old:] = weight[:old].mean(0)
    config = LlavaConfig(vision_config=SiglipVisionConfig(**vision), text_config=language_model.config,
                         image_token_id=image_id, image_seq_length=image_seq_length(vision),
                         vision_feature_select_strategy="full", vision_feature_layer=-1,
                         projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(language_model.model.state_dict(), strict=True)
    if not language_model.config.tie_word_embeddings:
        model.lm_head.load_state_dict(language_model.lm_head.state_dict())
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = end
    model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    return model.eval(), tokenizer


def vision_state(model) -> dict[str, torch.Tensor]:
    """The trained, shipped part: vision tower + projector tensors, and the `<image>` embedding row (576,)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k.startswith(SHIPPED_PREFIXES)}
    row = model.get_input_embeddings().weight[model.config.image_token_id]
    state[IMAGE_ROW] = row.detach().cpu().clone()
    return state


def load_vision_state(model, state: dict[str, torch.Tensor]) -> None:
    """Put a `vision_state` into a Llava model; every vision/projector tensor must be present and fit."""
    own = {k for k in model.state_dict() if k.startswith(SHIPPED_PREFIXES)}
    missing, extra = own - set(state), set(state) - own - {IMAGE_ROW}
    if missing or extra:
        raise ValueError(f"vision weights do not fit this model: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(extra)[:3]}")
    model.load_state_dict({k: v for k, v in state.items() if k != IMAGE_ROW}, strict=False)
    if IMAGE_ROW in state:
        with torch.no_grad():
            model.get_input_embeddings().weight[model.config.image_token_id] = state[IMAGE_ROW]


def save_vision(model, folder: str | os.PathLike, recipe: dict | None = None) -> Path:
    """Write folder/vision.safetensors (+ recipe.json with the vision config and `recipe`)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(vision_state(model), str(folder / VISION_FILE))
    vision = {k: getattr(model.config.vision_config, k) for k in VISION_CONFIG}
    record = {"vision_config": vision, "image_token": IMAGE_TOKEN, "language_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
              **(recipe or {})}
    (folder / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")
    return folder


def load_vlm(folder: str | os.PathLike | None = BASE_DIR, dtype: torch.dtype = torch.float32):
    """The shipped VLM: SmolLM2 from its package plus the trained vision parts of `folder` (None: untrained)."""
    from safetensors.torch import load_file

    from ..llm.models import load_smollm2

    lm, tokenizer = load_smollm2(dtype=dtype)
    vision = None
    if folder is not None:
        path = Path(folder) / VISION_FILE
        if not path.is_file():
            raise missing_data(path, "trained vision tower", "scripts/train_vlm.py base")
        vision = json.loads((Path(folder) / "recipe.json").read_text())["vision_config"]
    model, tokenizer = build_vlm(lm, tokenizer, vision)
    if folder is not None:
        load_vision_state(model, load_file(str(path)))
    return model.to(dtype).eval(), tokenizer


# ---------------------------------------------------------------- inputs, processor-free


def prompt_ids(tokenizer, instruction: str, num_image_tokens: int = 16) -> list[int]:
    """Token ids of the chat prompt with `num_image_tokens` <image> placeholders, ending where the answer starts."""
    text = (f"<|im_start|>user\n{IMAGE_TOKEN * num_image_tokens}\n{instruction}<|im_end|>\n"
            f"<|im_start|>assistant\n")
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def caption_batch(model, tokenizer, pixel_values: torch.Tensor, instructions: list[str],
                  captions: list[str]) -> dict[str, torch.Tensor]:
    """Teacher-forced batch: prompt + caption + <|im_end|>, right padded.

    Returns input_ids / attention_mask / labels (B, T) (labels -100 except caption and end), pixel_values
    (B, 3, H, W), and text_mask (B, T): attention_mask with the image positions set to 0.
    """
    n_img, image_id = model.config.image_seq_length, model.config.image_token_id
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    seqs, starts = [], []
    for instruction, caption in zip(instructions, captions):
        prompt = prompt_ids(tokenizer, instruction, n_img)
        seqs.append(prompt + tokenizer(caption, add_special_tokens=False)["input_ids"] + [end])
        starts.append(len(prompt))
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    input_ids = torch.full((len(seqs), width), pad)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100)
    for i, (seq, start) in enumerate(zip(seqs, starts)):
        input_ids[i, :len(seq)] = torch.tensor(seq)
        attention[i, :len(seq)] = 1
        labels[i, start:len(seq)] = input_ids[i, start:len(seq)]
    text_mask = attention * (input_ids != image_id)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
            "pixel_values": pixel_values, "text_mask": text_mask}


def _llava(model):
    """The LlavaForConditionalGeneration inside a PeftModel (LoRA layers stay active), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def patch_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, 16, vision hidden) tower features exactly as Llava selects them (last layer, "full": every patch)."""
    return _llava(model).model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-1]


def caption_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the caption tokens; lm_head runs only at the positions that predict a label."""
    logits, targets, _ = _caption_logits(model, batch)
    return F.cross_entropy(logits.float(), targets)


def caption_token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per caption of the batch: (summed cross-entropy of its tokens (B,), its number of caption tokens (B,)).
    Their ratio is each caption's mean per-token NLL; sum / sum is caption_loss over the batch."""
    logits, targets, rows = _caption_logits(model, batch)
    losses = F.cross_entropy(logits.float(), targets, reduction="none")
    n = len(batch["input_ids"])
    total = torch.zeros(n, dtype=losses.dtype, device=losses.device).index_add_(0, rows, losses)
    return total.cpu(), torch.bincount(rows, minlength=n).cpu()


def _caption_logits(model, batch: dict[str, torch.Tensor]):
    """(logits (K, vocab), targets (K,), batch row of each (K,)) at the K positions that predict a caption token."""
    llava = _llava(model)
    device = next(llava.parameters()).device
    hidden = llava.model(input_ids=batch["input_ids"].to(device), pixel_values=batch["pixel_values"].to(device),
                         attention_mask=batch["attention_mask"].to(device)).last_hidden_state
    targets = batch["labels"][:, 1:].to(device)
    keep = targets != -100
    rows = keep.nonzero()[:, 0]
    return llava.lm_head(hidden[:, :-1][keep]), targets[keep], rows


# The language model's statistics count the rows batch["text_mask"] marks (text tokens) when a batch has one.
TEXT_ROWS = RowRule(r"(^|\.)language_model\.", ("text_mask", "attention_mask"))
if TEXT_ROWS not in ROW_RULES:
    ROW_RULES.insert(0, TEXT_ROWS)


def calibration_forward(model, batch: dict[str, torch.Tensor]):
    """Forward for merge calibration: the model attends with batch["attention_mask"]; the merge's statistics take
    their rows from batch["text_mask"] when there is one (TEXT_ROWS)."""
    return _llava(model)(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                         attention_mask=batch["attention_mask"], logits_to_keep=1)


@torch.no_grad()
def generate_captions(model, tokenizer, pixel_values: torch.Tensor, instruction: str, max_new_tokens: int = 16,
                      batch_size: int = 50) -> list[str]:
    """Greedy captions, one per image of pixel_values (N, 3, H, W); every prompt has the same length (no padding)."""
    llava = _llava(model)
    device = next(llava.parameters()).device
    ids = torch.tensor([prompt_ids(tokenizer, instruction, llava.config.image_seq_length)])
    out = []
    for start in range(0, len(pixel_values), batch_size):
        pixels = pixel_values[start:start + batch_size].to(device)
        input_ids = ids.expand(len(pixels), -1).to(device)
        tokens = llava.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                pixel_values=pixels, max_new_tokens=max_new_tokens, do_sample=False)
        texts = tokenizer.batch_decode(tokens[:, ids.shape[1]:], skip_special_tokens=True)
        out += [t.strip().split("\n")[0].strip() for t in texts]
    return out
