"""Tracks: the method run on real models, each with its own tasks, data and scores, apart from the method core.

    harness.py      the benchmark harness: base, each LoRA and every merge scored on the same test sets
    intervals.py    95 % intervals on the accuracy tracks' result table (demo, bench)
    environment.py  what a result was measured with (versions, device, load, commit), one probe per JSON key
    llm/            MiniLM (encoder + task heads) and SmolLM2 (causal LM) on tweet and arithmetic tasks
    vlm/            a small offline LLaVA (SmolLM2 + a tiny SigLIP) captioning digits in two styles
    diffusion/      a small offline text-to-image UNet drawing digits with two concept LoRAs
    hub/            the paper's settings on hub models (Flan-T5 on GLUE, BLIP captions, Stable Diffusion); internet

A track imports the core (iteris_lab.merge_loras, iteris_lab.measure); the core never imports a track.
"""
