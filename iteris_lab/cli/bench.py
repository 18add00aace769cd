"""`iteris-lab demo` and `iteris-lab bench`: the shipped tracks on the one benchmark harness (tracks/harness.py)."""
from __future__ import annotations

from .options import positive_int


def cmd_demo(args):
    from ..tracks.llm.track import run_demo
    return run_demo(json_path=args.json, quiet=args.quiet)


BENCH_TRACKS = ("llm", "minilm", "smollm2", "vlm", "diffusion")


def cmd_bench(args):
    """One track's benchmark on the harness (tracks/harness.py); the offline tracks need no internet."""
    import os

    import torch

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.track == "vlm":
        from ..tracks.vlm.benchmark import run_bench
        return run_bench(args.out, mask=args.mask, test_images=args.test_images, val_images=args.val_images,
                         mask_ablation=args.mask_ablation)
    if args.track == "diffusion":
        from ..tracks.diffusion.benchmark import run_bench
        return run_bench(args.out, samples=args.samples, figures=args.figures)
    from ..tracks.llm.track import run_bench
    return run_bench(args.track if args.track != "llm" else args.model, args.out, figures=args.figures,
                     quiet=args.quiet)


def add_parsers(sub) -> None:
    demo = sub.add_parser("demo", help="merge the shipped LoRAs of the embedded default model with every method",
                          description="Load the embedded default model and its shipped task LoRAs, merge with every "
                                      "method, evaluate, print the table and write a JSON file.")
    demo.add_argument("--json", default="results.json", help="where to write the results (default results.json)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="the benchmark of one track: IterIS tuned on validation, every method",
                           description="Choose IterIS's settings on the validation split, then score the base model, "
                                       "each LoRA and every merge method on the test split; writes OUT/<track>.json "
                                       "and OUT/<track>.md. Run sizes follow ITERIS_PROFILE (ci | cpu | gpu).")
    bench.add_argument("--track", choices=BENCH_TRACKS, default="llm",
                       help="llm (with --model), minilm, smollm2, vlm or diffusion (default llm)")
    bench.add_argument("--model", choices=("minilm", "smollm2"), default="minilm",
                       help="the model of --track llm (default minilm)")
    bench.add_argument("--out", default=".", help="folder for the JSON and markdown results (default .)")
    bench.add_argument("--figures", help="folder for the figures (llm, diffusion); default: none")
    bench.add_argument("--threads", type=positive_int, help="torch threads (default: torch's)")
    bench.add_argument("--samples", type=positive_int, help="diffusion: images per prompt set (default by profile)")
    bench.add_argument("--test-images", type=positive_int,
                       help="vlm: test images (default: the profile's test_limit, else 200)")
    bench.add_argument("--val-images", type=positive_int, default=100, help="vlm: validation images (default 100)")
    bench.add_argument("--mask", choices=("text", "all"), default="text",
                       help="vlm: calibration rows, text only (default) or with the image rows")
    bench.add_argument("--mask-ablation", action="store_true", help="vlm: also IterIS with the other mask")
    bench.add_argument("--quiet", action="store_true", help="no progress bars")
    bench.set_defaults(func=cmd_bench)
