"""How the method runs inside a model, apart from what it computes: hooks on the adapted layers (hooks.py), ΔW
applied through them (deltas.py), calibration passes that stop at every adapted layer (passes.py), and weights
accelerate keeps outside the model (offload.py)."""
