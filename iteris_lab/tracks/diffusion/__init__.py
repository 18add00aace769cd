"""The text-to-image track: diffusion.py (the UNet, text encoder, sampling, calibration noise), digits.py (images,
concepts and their measures), training.py (the base UNet and concept LoRAs), benchmark.py (every merge measured),
image_scores.py (CLIP scores and grids for the hub's RGB images)."""
