"""The vision-language track: vlm.py (the small offline LLaVA), captions.py (digit images, styled captions and
caption metrics), benchmark.py (base, each style LoRA and every merge, scored per style)."""
