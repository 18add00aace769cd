"""Settings for every pytest run, tests and notebooks alike, set before anything heavy is imported:
CI-sized runs (ITERIS_PROFILE=ci, unless already set), no progress bars, no hub access, no GUI backend.
Notebook kernels started by nbval inherit them."""
import os

for _name, _value in {
    "ITERIS_PROFILE": "ci",
    "TQDM_DISABLE": "1",
    "MPLBACKEND": "Agg",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}.items():
    os.environ.setdefault(_name, _value)
