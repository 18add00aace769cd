"""Files in and out, apart from the method: calibration texts -> batches (calibration.py), a merge written as a
PEFT LoRA folder (export.py). The diffusers / kohya file formats are in iteris_lab.lora_formats."""
