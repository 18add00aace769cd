"""Train the shipped parts of the VLM track, seeded (SmolLM2 stays frozen throughout).

    python scripts/train_vlm.py base                  # -> iteris_lab/data/vlm/base/{vision.safetensors, recipe.json}
    python scripts/train_vlm.py lora --style positive # -> iteris_lab/data/vlm/adapters/positive/ (PEFT + recipe.json)

base, three stages on the vision tower + projector:
  1. classifier: the tower, mean-pooled, as a 10-way digit classifier (random 0-3 px shifts);
  2. word alignment: each projected image token regressed onto SmolLM2's input embedding of the digit's word
     (" seven"), plus the classifier loss; no LM pass, so it costs milliseconds per step;
  3. captions: teacher-forced plain captions through the frozen LM (loss on caption tokens only), until the
     validation content accuracy reaches --target (checked every --eval-every steps) or --steps.
lora: LoRA r=8 on the LM's q/k/v, trained on captions of one style, prompted with that style's instruction.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from iteris_lab.tracks.training import Training, train  # noqa: E402
from iteris_lab.tracks.vlm import captions, vlm  # noqa: E402


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def shifted(pixels: torch.Tensor, gen: torch.Generator, max_shift: int = 3) -> torch.Tensor:
    """Each image moved by a random (dy, dx) in [-max_shift, max_shift], background (-1) filled in."""
    padded = F.pad(pixels, (max_shift,) * 4, value=-1.0)
    out = torch.empty_like(pixels)
    size = pixels.shape[-1]
    for i, (dy, dx) in enumerate(torch.randint(0, 2 * max_shift + 1, (len(pixels), 2), generator=gen).tolist()):
        out[i] = padded[i, :, dy:dy + size, dx:dx + size]
    return out


def content_accuracy(model, tokenizer, pixels, labels, style=None) -> tuple[float, list[str]]:
    texts = vlm.generate_captions(model, tokenizer, pixels, captions.prompt_for(style), max_new_tokens=16)
    return sum(captions.content_correct(t, y) for t, y in zip(texts, labels.tolist())) / len(texts), texts


def stage_classifier(model, head, train_split, args, gen) -> dict:
    params = list(model.model.vision_tower.parameters()) + list(head.parameters())
    x, y = train_split

    def loss_of_step(_):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        return F.cross_entropy(head(vlm.patch_features(model, shifted(x[idx], gen)).mean(1)), y[idx])

    losses = train(params, loss_of_step, plain_adamw(args.cls_steps, args.cls_lr), "classifier", log_every=100)
    return {"cls_steps": args.cls_steps, "cls_final_loss": round(losses[-1], 4)}


def plain_adamw(steps: int, lr: float) -> Training:
    """Stages 1-2: AdamW (torch's default weight decay 0.01) at a constant lr, no gradient clipping."""
    return Training(steps=steps, lr=lr, batch_size=64, warmup_steps=0, schedule="constant", weight_decay=0.01,
                    max_norm=None)


@torch.no_grad()
def classifier_accuracy(model, head, split) -> float:
    x, y = split
    return (head(vlm.patch_features(model, x).mean(1)).argmax(-1) == y).float().mean().item()


def stage_word_alignment(model, head, tokenizer, train_split, args, gen) -> dict:
    words = torch.tensor([tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in captions.DIGIT_WORDS])
    targets = model.get_input_embeddings().weight[words].detach()  # (10, 576)
    params = [p for n, p in model.named_parameters() if n.startswith(vlm.SHIPPED_PREFIXES)] + list(head.parameters())
    x, y = train_split
    mse = []

    def loss_of_step(_):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        patches = vlm.patch_features(model, shifted(x[idx], gen))
        tokens = model.model.multi_modal_projector(patches)  # (64, 16, 576)
        mse.append(((tokens - targets[y[idx]][:, None]) ** 2).mean() / (targets ** 2).mean())
        return mse[-1] + F.cross_entropy(head(patches.mean(1)), y[idx])

    train(params, loss_of_step, plain_adamw(args.align_steps, args.align_lr), "word alignment", log_every=100)
    return {"align_steps": args.align_steps, "align_final_relative_mse": round(mse[-1].item(), 4)}


def stage_captions(model, tokenizer, splits, args, gen) -> dict:
    params = [p for n, p in model.named_parameters() if n.startswith(vlm.SHIPPED_PREFIXES)]
    settings = Training(steps=args.steps, lr=args.lr, batch_size=args.batch_size, warmup_steps=0, weight_decay=0.01,
                        schedule="linear_warmup_decay" if args.decay else "constant", seed=args.seed)
    rng = random.Random(args.seed)
    x, y = splits["train"]
    val_x, val_y = splits["val"][0][:args.val_images], splits["val"][1][:args.val_images]
    history, start = [], time.perf_counter()

    def loss_of_step(_):
        idx = torch.randint(0, len(y), (args.batch_size,), generator=gen)
        texts = [captions.caption(int(label), None, rng) for label in y[idx]]
        batch = vlm.caption_batch(model, tokenizer, shifted(x[idx], gen, 1), [captions.PLAIN_PROMPT] * len(idx), texts)
        model.train()
        return vlm.caption_loss(model, batch)

    def evaluate(step, loss) -> bool:
        """Every eval_every steps: the validation content accuracy; True (stop) once it reaches the target."""
        model.eval()
        step += 1
        if step % args.eval_every and step != args.steps:
            return False
        acc, sample = content_accuracy(model, tokenizer, val_x, val_y)
        history.append({"step": step, "val_content": acc, "loss": round(loss, 4)})
        log(f"captions step {step}: val content accuracy {acc:.3f}  e.g. {sample[:3]}")
        return acc >= args.target

    losses = train(params, loss_of_step, settings, "captions", log_every=10, on_step=evaluate)
    return {"caption_steps": len(losses), "caption_lr": args.lr, "caption_lr_decay": bool(args.decay),
            "caption_batch_size": args.batch_size, "caption_time_s": round(time.perf_counter() - start, 1),
            "caption_history": history}


def train_base(args) -> dict:
    from iteris_lab.tracks.llm.models import load_smollm2

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    lm, tokenizer = load_smollm2()
    model, tokenizer = vlm.build_vlm(lm, tokenizer, seed=args.seed)
    model.requires_grad_(False)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(vlm.SHIPPED_PREFIXES))
    splits = captions.digit_splits(seed=args.seed)
    head = torch.nn.Linear(model.config.vision_config.hidden_size, 10)
    record, start = {"seed": args.seed, "torch_threads": torch.get_num_threads()}, time.perf_counter()
    cache = Path(args.stage2_cache) if args.stage2_cache else None
    if args.init:  # continue stage 3 from a finished base (its record is kept as "previous")
        from safetensors.torch import load_file

        vlm.load_vision_state(model, load_file(str(Path(args.init) / vlm.VISION_FILE)))
        record["previous"] = json.loads((Path(args.init) / "recipe.json").read_text())
        log(f"continuing from {args.init}")
    elif cache is not None and (cache / "recipe.json").is_file():  # stages 1-2 done before with these settings
        from safetensors.torch import load_file

        vlm.load_vision_state(model, load_file(str(cache / vlm.VISION_FILE)))
        done = json.loads((cache / "recipe.json").read_text())
        record.update({k: done[k] for k in done if k.startswith(("cls_", "align_"))})
        log(f"stages 1-2 loaded from {cache}")
    else:
        record.update(stage_classifier(model, head, splits["train"], args, gen))
        record["cls_val_acc"] = classifier_accuracy(model, head, splits["val"])
        log(f"classifier val accuracy {record['cls_val_acc']:.3f}")
        record.update(stage_word_alignment(model, head, tokenizer, splits["train"], args, gen))
        record["align_cls_val_acc"] = classifier_accuracy(model, head, splits["val"])
        if cache is not None:
            vlm.save_vision(model, cache, dict(record))
    gen.manual_seed(args.seed + 3)  # stage 3 draws the same batches whether stages 1-2 ran or came from the cache
    record.update(stage_captions(model, tokenizer, splits, args, gen))
    record["train_time_s"] = round(time.perf_counter() - start, 1)
    record["test_content_acc"], sample = content_accuracy(model, tokenizer, *splits["test"])
    record["test_images"], record["test_samples"] = len(splits["test"][1]), sample[:5]
    log(f"test content accuracy {record['test_content_acc']:.3f}")
    vlm.save_vision(model, args.out or vlm.BASE_DIR, {"recipe": vars(args) | {"out": None}, **record})
    return record


def train_lora(args) -> dict:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(args.seed)
    gen, rng = torch.Generator().manual_seed(args.seed), random.Random(args.seed)
    model, tokenizer = vlm.load_vlm(args.base)
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=vlm.LM_QKV_REGEX)
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    settings = Training(steps=args.steps, lr=args.lr, batch_size=args.batch_size, warmup_steps=10,
                        schedule="ramped_linear_decay", weight_decay=0.01, seed=args.seed)
    splits = captions.digit_splits(seed=0)
    x, y = splits["train"]
    prompt, start = captions.prompt_for(args.style), time.perf_counter()

    def loss_of_step(_):
        idx = torch.randint(0, len(y), (args.batch_size,), generator=gen)
        texts = [captions.caption(int(label), args.style, rng) for label in y[idx]]
        return vlm.caption_loss(peft_model, vlm.caption_batch(model, tokenizer, x[idx], [prompt] * len(idx), texts))

    losses = train(params, loss_of_step, settings, f"lora {args.style}", log_every=10)
    seconds = time.perf_counter() - start
    peft_model.eval()
    val_x, val_y = splits["val"]
    content, texts = content_accuracy(peft_model, tokenizer, val_x, val_y, args.style)
    style = sum(captions.lexicon_style(t) == args.style for t in texts) / len(texts)
    out = Path(args.out or vlm.ADAPTER_DIR / args.style)
    peft_model.save_pretrained(str(out))
    (out / "README.md").unlink(missing_ok=True)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "iteris-lab/vlm-base (SmolLM2-135M-Instruct + data/vlm/base)"
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    record = {"style": args.style, "prompt": prompt, "rank": args.rank, "alpha": 2 * args.rank,
              "target_modules": vlm.LM_QKV_REGEX, "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
              "seed": args.seed, "train_time_s": round(seconds, 1), "s_per_step": round(seconds / args.steps, 3),
              "final_loss": round(losses[-1], 4), "val_content_acc": content, "val_lexicon_style_acc": style,
              "val_images": len(texts), "val_samples": texts[:5], "torch_threads": torch.get_num_threads(),
              "trainable_params": sum(p.numel() for p in params)}
    (out / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")
    log(json.dumps({k: record[k] for k in ("val_content_acc", "val_lexicon_style_acc", "train_time_s")}))
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("base", "lora"))
    parser.add_argument("--style", choices=sorted(captions.STYLES))
    parser.add_argument("--out", help="output folder (default: the package data, vlm/base or vlm/adapters/<style>)")
    parser.add_argument("--base", default=str(vlm.BASE_DIR), help="the trained vision parts (lora)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cls-steps", type=int, default=400)
    parser.add_argument("--cls-lr", type=float, default=1e-3)
    parser.add_argument("--align-steps", type=int, default=300)
    parser.add_argument("--align-lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, help="caption (base) or LoRA steps (default 300 / 150)")
    parser.add_argument("--lr", type=float, help="caption (base) or LoRA learning rate (default 3e-4 / 2e-3)")
    parser.add_argument("--batch-size", type=int, help="default 16 (base) / 8 (lora)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--val-images", type=int, default=100)
    parser.add_argument("--decay", action="store_true", help="caption stage: lr decays linearly to 10 %%")
    parser.add_argument("--init", help="a trained base folder: skip stages 1-2 and continue the caption stage")
    parser.add_argument("--stage2-cache", help="folder keeping the vision parts after stages 1-2 (reused if present)")
    parser.add_argument("--target", type=float, default=0.93, help="stop captions at this val content accuracy")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = args.what == "base"
    args.steps = args.steps or (300 if base else 150)
    args.lr = args.lr or (3e-4 if base else 2e-3)
    args.batch_size = args.batch_size or (16 if base else 8)
    if args.what == "lora" and not args.style:
        parser.error("lora needs --style")
    record = train_base(args) if base else train_lora(args)
    print(json.dumps({k: v for k, v in record.items() if not isinstance(v, list)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
