"""The VLM benchmark: the two style LoRAs (positive / negative) of the digit-captioning VLM, merged by every method.

    ITERIS_PROFILE=cpu python benchmarks/vlm.py          # all 300 test images; ci: 64
writes benchmarks/results/vlm.json (every number, settings, timings, sample captions) and vlm.md (the table).
IterIS's λ variant is chosen on the validation split; --mask-ablation adds IterIS with image rows in the Grams.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from iteris_lab.profiles import current_profile  # noqa: E402
from iteris_lab.tracks.harness import DEMO_METHODS, environment  # noqa: E402
from iteris_lab.tracks.vlm import benchmark as vlm_bench, captions, vlm  # noqa: E402

GRID = [{"alpha": 1e-4, "adaptive_weights": "official"}, {"alpha": 1e-4, "adaptive_weights": "paper"}]


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--base", default=str(vlm.BASE_DIR), help="folder of the trained vision parts")
    parser.add_argument("--adapters", default=str(vlm.ADAPTER_DIR), help="folder with <style>/ LoRA folders")
    parser.add_argument("--mask", choices=vlm_bench.MASKS, default="text")
    parser.add_argument("--test-images", type=int, help="test images (default: the profile's test_limit, else 200)")
    parser.add_argument("--val-images", type=int, default=100, help="validation images for choosing IterIS")
    parser.add_argument("--mask-ablation", action="store_true", help="also IterIS with the other calibration mask")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    profile, start, timings = current_profile(), time.perf_counter(), {}
    profile = dataclasses.replace(profile, test_limit=args.test_images or profile.test_limit or 200)
    val_profile = dataclasses.replace(profile, test_limit=min(args.val_images, profile.test_limit))
    track = vlm_bench.load_vlm_track(args.base, args.adapters)
    timings["load_s"] = time.perf_counter() - start

    t = time.perf_counter()
    chosen, tried = vlm_bench.choose_iteris(track, val_profile, GRID, args.mask, log=log)
    timings["validation_s"] = time.perf_counter() - t
    log(f"chosen on validation: {chosen}")

    t = time.perf_counter()
    rows, own = vlm_bench.references(track, profile)
    pixels, labels = vlm_bench.split_images(track, "test", profile.test_limit)
    plain = vlm.generate_captions(track.model, track.tokenizer, pixels, captions.PLAIN_PROMPT)
    base_plain = vlm_bench.caption_metrics(plain, labels, None)
    timings["references_s"] = time.perf_counter() - t
    log(f"base (plain prompt): {base_plain}; " + "; ".join(vlm_bench._summary(r) for r in rows))

    t = time.perf_counter()
    rows += vlm_bench.run_methods(track, profile, DEMO_METHODS, own, iteris=chosen, mask=args.mask, log=log)
    if args.mask_ablation:
        other = next(m for m in vlm_bench.MASKS if m != args.mask)
        extra = vlm_bench.run_methods(track, profile, ["iteris"], own, iteris=chosen, mask=other, log=log)
        extra[0]["label"] = f"iteris (mask={other})"
        rows += extra
    timings["methods_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start

    out = {"track": "vlm", "profile": profile.name, "seconds": timings["total_s"], "timings": timings,
           "environment": environment(),
           "settings": {"test_images": len(labels), "val_images": val_profile.test_limit,
                        "calibration_samples": profile.calibration_samples, "many_samples": profile.many_samples,
                        "max_iter": profile.max_iter, "calibration_mask": args.mask, "iteris_grid": GRID,
                        "judge": "MiniLM airline_sentiment LoRA + head, positive vs negative logit",
                        "bleu": "corpus BLEU-4, add-one smoothing for n >= 2, against 10 reference captions per image and style",
                        "prompts": {s: captions.prompt_for(s) for s in vlm_bench.STYLE_NAMES},
                        "decoding": "greedy, 16 new tokens"},
           "base_plain_prompt": base_plain, "own_lora": own, "iteris_chosen": chosen, "iteris_validation": tried,
           "results": rows}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vlm.json").write_text(json.dumps(out, indent=2) + "\n")
    table = vlm_bench.markdown_table(rows)
    note = (f"Profile {profile.name}: {len(labels)} test images, {profile.calibration_samples} calibration samples "
            f"per style (regmean_many: {profile.many_samples}), IterIS max_iter {profile.max_iter}, chosen on "
            f"validation: {chosen}, calibration mask {args.mask!r}. Base with the plain prompt: content "
            f"{base_plain['content']:.3f}. Run time {timings['total_s']:.0f} s, {torch.get_num_threads()} torch "
            "thread(s) on a shared 2-core CPU.")
    (out_dir / "vlm.md").write_text(f"# VLM style-merge benchmark\n\n{note}\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
