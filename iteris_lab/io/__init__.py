"""Files in and out, apart from the method: calibration texts -> batches (calibration.py), the base model found
and loaded as the user names it (base_model.py), merge recipes (recipe.py), a merge written as a PEFT LoRA folder
(export.py) with its model card and report (model_card.py). The diffusers / kohya file formats are in
iteris_lab.lora_formats. The merge core never imports this package's base_model, recipe or model_card."""
