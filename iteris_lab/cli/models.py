"""`iteris-lab models`: the base models available without the internet, and where they are."""
from __future__ import annotations


def cmd_models(args) -> list[dict]:
    from ..io.base_model import available_offline, hub_reachable

    rows = available_offline()
    print("Base models an installed package provides offline (`--base ID` or no --base uses them when the "
          "Hugging Face hub is not reachable; --base PATH loads them directly):")
    for row in rows:
        print(f"  {row['id']}\n      package {row['package']} ({row['what']})\n      {row['where']}")
        if row.get("cache"):
            print(f"      de-quantised copy: {row['cache']}")
    print(f"Hugging Face hub reachable now: {'yes' if hub_reachable() else 'no'}. Any model folder written by "
          "save_pretrained, or a .gguf file, works with --base too.")
    return rows


def add_parser(sub) -> None:
    models = sub.add_parser("models", help="list the base models available offline and where they are",
                            description="List the base models that installed packages provide offline.")
    models.set_defaults(func=cmd_models)
