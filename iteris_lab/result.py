"""MergeResult: what merge_loras returns — the merged ΔW per layer, its history, and ways to use it (chapter 00 saves
and reloads one with PEFT; chapter 03, section 6, at exact rank Σr_i and truncated)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import AdapterError, ExportError
from .io.export import ExportReport, lora_factors, write_adapter
from .targets import LinearLayer, Target, resolve_names


@dataclass
class MergeResult:
    """deltas:  {module name: ΔW float32 CPU}: (out, in) for Linear and GPT-2 Conv1D, (out, in, kh, kw) for Conv2d.
    factors: {module name: (B (out, R), A (R, in_flat))} when ΔW is exactly B @ A (iteris, regmean, linear,
             task_arithmetic, cat: R = Σ r_i).
    history: one IterationRecord per solve (empty for data-free methods).
    extra["carried"]: {parameter name: tensor} of modules the adapters save whole (modules_to_save, e.g. a head)
             and share unchanged; apply_to and save_adapter carry them along.
    """

    method: str
    deltas: dict[str, torch.Tensor]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    history: list
    layers: dict[str, LinearLayer]  # the kind of each merged layer (targets.py)
    settings: dict
    seconds: float
    base_model: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        # merge_loras hands the carried tensors over in `settings`; they are not settings (nor JSON)
        self.extra.setdefault("carried", self.settings.pop("_carried", {}))

    @property
    def task_type(self) -> str | None:
        """The PEFT task_type the adapters agree on (None when unset or different); written by save_adapter."""
        return self.settings.get("task_type")

    @task_type.setter
    def task_type(self, value: str | None) -> None:
        self.settings["task_type"] = value

    def apply_to(self, model: nn.Module, untie: bool = False) -> nn.Module:
        """Add ΔW to the matching weights of `model` in place (a dense merge), and copy the carried
        modules_to_save tensors; returns the model.

        A weight shared with another module (tied embeddings and lm_head, or two Linears holding one Parameter) is
        refused: writing W0 + ΔW there would change the other module too, unlike the adapter. untie=True gives
        each such module its own copy of the weight first (and sets config.tie_word_embeddings = False, so that a
        save and reload keeps them apart).

        A model whose weights accelerate offloads (device_map with "cpu"/"disk", weights on the meta device) is
        refused: its weights are reloaded from the offload store at every call, so a write would not last. Save
        an adapter instead (save_adapter) and load it with PEFT."""
        names = resolve_names(model, self.deltas)
        modules = dict(model.named_modules())
        targets = {name: Target(names[name], modules[names[name]], model) for name in self.deltas}
        carried = self._carried_params(model)
        written = [(names[n], t.module, "weight") for n, t in targets.items()] + [
            (p.rsplit(".", 1)[0], model.get_submodule(p.rsplit(".", 1)[0]), p.rsplit(".", 1)[1]) for p in carried]
        shared = _shared_weights(model, written)
        if shared and not untie:
            module, others = next(iter(shared.items()))
            raise ExportError(f"module {module} shares its weight with {', '.join(others)} (tied weights): a dense "
                              "merge would change both, while the adapter changes only its own output. Pass "
                              "apply_to(model, untie=True) to give each merged module its own weight, or use "
                              "save_adapter(folder) and PeftModel.from_pretrained.")
        for name, target in targets.items():  # check everything before changing anything
            if target.offloaded:
                raise ExportError(f"module {names[name]} is offloaded by accelerate (device_map with cpu/disk "
                                  "offload): apply_to cannot write into offloaded weights. Use "
                                  "result.save_adapter(folder) and PeftModel.from_pretrained(model, folder), or "
                                  "load the model without offloading.")
            if target.layer.weight_shape != self.layers[name].weight_shape:
                raise AdapterError(f"module {names[name]} has weight {target.layer.weight_shape}, the merge "
                                   f"expects {self.layers[name].weight_shape}.")
        with torch.no_grad():
            for module_name, module, attr in written:
                if module_name in shared:
                    old = getattr(module, attr)
                    setattr(module, attr, nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad))
            config = getattr(model, "config", None)
            if shared and getattr(config, "tie_word_embeddings", False):
                config.tie_word_embeddings = False
            for name, target in targets.items():
                target.write(target.module.weight, self.deltas[name])
            for pname, tensor in carried.items():
                param = model.get_parameter(pname)
                param.copy_(tensor.to(param.device, param.dtype))
        return model

    def _carried_params(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The carried tensors keyed by `model`'s parameter names, checked before anything is written."""
        carried = self.extra.get("carried") or {}
        if not carried:
            return {}
        modules = resolve_names(model, sorted({k.rsplit(".", 1)[0] for k in carried}))
        params = dict(model.named_parameters(remove_duplicate=False))
        out = {}
        for key, tensor in carried.items():
            module, attr = key.rsplit(".", 1)
            name = f"{modules[module]}.{attr}"
            if name not in params or params[name].shape != tensor.shape:
                raise AdapterError(f"the merge carries {key} {tuple(tensor.shape)}, which does not fit this model.")
            out[name] = tensor
        return out

    def save_adapter(self, directory, rank: int | None = None, overwrite: bool = False,
                     extra_files: dict[str, str | bytes] | None = None, inputs=()) -> ExportReport:
        """Write a PEFT LoRA folder (with the task_type the adapters agree on and any carried modules_to_save).

        The destination rule (io/destination.py): the folder never is, holds or lies inside an input (the adapters
        this merge read, and any `inputs` paths given: calibration files, the base model folder); an existing one is
        replaced only with overwrite=True and only when it holds nothing but the files this write produces
        (adapter_config.json, adapter_model.safetensors/.bin, iteris_report.json, the extra_files); others are
        named in the ExportError. The write is locked against other writers and swapped in atomically.
        rank: as export.lora_factors (None: the exact factors of rank Σ r_i when the merge has them; an int:
        truncated SVD, see ExportReport.relative_error).
        extra_files: {name: text or bytes} written with the adapter, in the same atomic swap (e.g. a report).
        Module names are the adapters' own: a merge run on an inner module (model.bert of a classifier) is
        written under the prefix it recorded (settings["module_prefix"]), so the adapter loads where they load."""
        factors = lora_factors(self.deltas, self.factors, self.layers, rank)
        prefix = self.settings.get("module_prefix")
        named = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
        carried = {named(k): v for k, v in (self.extra.get("carried") or {}).items()}
        return write_adapter(directory, {named(n): f for n, f in factors.items()},
                             {named(n): layer for n, layer in self.layers.items()}, self.base_model, overwrite,
                             self.task_type, carried, extra_files,
                             inputs=[*(self.settings.get("adapters") or []), *inputs])

    # -- reading the result: a short repr, a summary, the history as a table ------------------------------------

    REPORT_FORMAT = 2  # 2: per-iteration λ under "lambdas" (format 1, without format_version, called them "weights")

    @property
    def task_names(self) -> list[str]:
        """One name per task: the adapter folder's name (task 1, 2, ... when the adapters came without a path)."""
        paths = self.settings.get("adapters") or []
        names = [str(p).rstrip("/").rsplit("/", 1)[-1] or f"task {i + 1}" for i, p in enumerate(paths)]
        return names or [f"task {i + 1}" for i in range(len(self.settings.get("weights") or []))]

    def summary(self, worst: int = 3) -> dict:
        """Per task the mean over layers of the last solve's objective ‖X_iΔW_iᵀ − X̃_iWᵀ‖²/‖X_iΔW_iᵀ‖² and of
        λ_i (min and max too); the `worst` layers by mean objective over tasks. Empty tasks for data-free methods."""
        if not self.history:
            return {"tasks": {}, "worst_layers": []}
        last = self.history[-1]
        tasks = {}
        for i, name in enumerate(self.task_names):
            objective = [v[i] for v in last.objective.values()]
            lambdas = [v[i] for v in last.lambdas.values()]
            tasks[name] = {"objective": sum(objective) / len(objective), "lambda": sum(lambdas) / len(lambdas),
                           "lambda_min": min(lambdas), "lambda_max": max(lambdas)}
        by_layer = sorted(last.objective.items(), key=lambda kv: -sum(kv[1]) / len(kv[1]))
        return {"tasks": tasks, "worst_layers": [{"layer": layer, "objective": sum(v) / len(v)}
                                                 for layer, v in by_layer[:worst]]}

    def report(self) -> dict:
        """A JSON-ready report: a short summary first (per task objective and λ, the worst layers), then the
        settings, timings and, per solve, the mean objective, the largest change and per layer λ and objective."""
        return {
            "format_version": self.REPORT_FORMAT,
            "method": self.method,
            "summary": self.summary(),
            "settings": self.settings,
            "seconds": self.seconds,
            "layers": len(self.deltas),
            "iterations": [{
                "iteration": r.iteration, "seconds": r.seconds, "mean_objective": r.mean_objective(),
                "max_change": max(r.change.values(), default=None), "lambdas": r.lambdas, "objective": r.objective,
            } for r in self.history],
        }

    def history_table(self):
        """The history as one row per (iteration, layer, task): iteration, layer, task, lambda, objective,
        merged_objective (None at the first solve), drift, change. A pandas DataFrame when pandas is installed,
        else a list of dicts."""
        rows = []
        for record in self.history:
            for layer, objective in record.objective.items():
                merged = (record.merged_objective or {}).get(layer)
                for i, task in enumerate(self.task_names):
                    rows.append({"iteration": record.iteration, "layer": layer, "task": task,
                                 "lambda": record.lambdas[layer][i], "objective": objective[i],
                                 "merged_objective": merged[i] if merged else None,
                                 "drift": record.drift[layer][i] if layer in record.drift else None,
                                 "change": record.change.get(layer)})
        try:
            import pandas
        except ImportError:
            return rows
        return pandas.DataFrame(rows)

    def __repr__(self) -> str:
        tasks = self.summary()["tasks"]
        lines = [f"MergeResult(method={self.method!r}, {len(self.deltas)} layers, {len(self.task_names)} tasks, "
                 f"{len(self.history)} solves, {self.seconds:.1f} s, base={self.base_model!r})"]
        if tasks:
            lines.append("  per task (mean over layers): " + "; ".join(
                f"{name} objective {t['objective']:.3g}, λ {t['lambda']:.3g}" for name, t in tasks.items()))
        lines.append("  .deltas {layer: ΔW}, .summary(), .history_table(), .apply_to(model), .save_adapter(folder)")
        return "\n".join(lines)


def _shared_weights(model: nn.Module, written: list[tuple[str, nn.Module, str]]) -> dict[str, list[str]]:
    """{module name: other parameter names holding the same tensor} for the parameters about to be written."""
    holders: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(param), []).append(name)
    shared = {}
    for module_name, module, attr in written:
        param = getattr(module, attr)
        others = [n for n in holders.get(id(param), []) if n != f"{module_name}.{attr}"]
        if others:
            shared[module_name] = others
    return shared


def module_prefix(names: dict[str, str]) -> str | None:
    """The prefix the adapters' module names have over the model's, when the merge runs on an inner module.

    names: {adapter module name: model module name} (targets.resolve_names). "bert" when every adapter name is
    "bert." + the model's name (adapters of BertForSequenceClassification merged on model.bert); None when the
    names agree or the model's are the longer ones (its names then identify the modules in the model merged)."""
    prefixes = {a[:-len(m) - 1] if a != m and a.endswith("." + m) else "" for a, m in names.items()}
    if len(prefixes) > 1:
        shown = ", ".join(sorted(p or "(none)" for p in prefixes))
        raise AdapterError(f"the adapters' module names sit at different depths of this model (prefixes {shown}); "
                           "merge on the model the adapters were trained on.")
    return prefixes.pop() or None if prefixes else None
