"""Hub recipes: the paper's settings on downloaded models (internet; pip install iteris-lab[hub]).

    llm.py        Flan-T5-base (or a decoder-only model) with GLUE LoRAs; glue.py reads the GLUE tasks
    vlm.py        BLIP captioning with one LoRA per caption style
    diffusion.py  Stable Diffusion 1.5 with DreamBooth-style concept LoRAs
"""
