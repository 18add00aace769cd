"""The language-model track: models.py (offline MiniLM and SmolLM2), tasks.py (tasks, splits, calibration
batches), evaluate.py (accuracy per task), training.py (the shipped task LoRAs and the shared AdamW loop)."""
