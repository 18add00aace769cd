"""merge_loras(): the IterIS loop, in two schedules.

jacobi (the paper's iterations, `max_iter` solves):
    iteration 1   run task i's samples with LoRA i active -> X_i (and X̃_i = X_i) -> λ_i -> solve every layer
    iteration t   switch the merged ΔW on -> re-run -> X̃_i -> solve every layer again
sweep (sweep.py): solve each layer as soon as the merged model's inputs X̃ for it exist, in one pass.

Iteration 1 with λ = 1 and α = 0 is RegMean on the LoRA deltas. A layer's input depends only on the layers
before it, so on a chain of J adapted layers Jacobi reaches its fixed point after J solves; the sweep reaches the
same fixed point directly. ΔW is applied through forward hooks (deltas.py): the base weights are never written.

Chapter 01 (section 6) derives the loop and its convergence after J solves on a 4-layer chain; chapter 03 runs it
inside SmolLM2 solve by solve next to the sweep; chapter 06 measures samples, α, solves and λ.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from . import baselines
from .adapters import LoraAdapter, LoraLayer, check_adapters
from .io.peft import load_adapter
from .errors import AdapterError, CalibrationError, IterisError
from .plumbing.deltas import DeltaHooks
from .features import gram_pass, paired_pass
from .objective import LayerProblem, adaptive_weight, objective, output_energy, solve
from .result import MergeResult, module_prefix
from .settings import METHODS, MergeSettings
from .statistics import Statistics, TaskStatistics, check_coverage, exact
from .io.texts import text_records, tokenize_texts
from .sweep import SweepTask, one_sweep
from .targets import Target, resolve_names

@dataclass
class IterationRecord:
    """What one solve did. Per layer, lists run over tasks; both schedules record the same way (_solve_layer).

    lambdas:   λ_i times the user's weight of task i, fixed at the layer's first solve
    objective: ‖X_iΔW_iᵀ − X̃_iWᵀ‖² / ‖X_iΔW_iᵀ‖² of the new W on the features it was solved from
    merged_objective: on those features, the W of the merged model that produced them (what that model really
               does): Jacobi's previous W; in the sweep the new W itself (its features come from the final merge,
               so merged_objective equals objective); None at Jacobi's first solve (the task models' features)
    drift:     ‖X_i − X̃_i‖² / ‖X_i‖² for the layer's input (0 at the first Jacobi solve)
    change:    ‖ΔW_t − ΔW_{t−1}‖ / ‖ΔW_t‖, with ΔW_0 = 0: 1 at a layer's first solve (the sweep's only one)
    """

    iteration: int
    lambdas: dict[str, list[float]]
    objective: dict[str, list[float]]
    merged_objective: dict[str, list[float]] | None
    drift: dict[str, list[float]]
    change: dict[str, float]
    seconds: float = 0.0

    def mean_objective(self) -> float:
        values = [v for per_task in self.objective.values() for v in per_task]
        return sum(values) / len(values)


@dataclass
class _Layer:
    target: Target
    loras: list[LoraLayer | None]
    lambdas: list[float] = field(default_factory=list)
    energies: list[float] = field(default_factory=list)
    factors: tuple[torch.Tensor, torch.Tensor] | None = None
    delta: torch.Tensor | None = None  # (out, in_flat) float64


def merge_loras(model, adapters, calibration=None, *, tokenizer=None, settings: MergeSettings | None = None,
                forward=None, on_iteration=None, progress: bool = True, **keywords) -> MergeResult:
    """Merge N ≥ 2 LoRA adapters of `model` into one ΔW per adapted layer.

    model:       the base nn.Module, without adapters (a PeftModel, or a model with LoRA layers injected, is refused:
                 its active LoRAs would shift every feature); it is left unchanged (weights restored on return or
                 error).
    adapters:    PEFT LoRA folders (or LoraAdapter objects), one per task.
    calibration: per task, an iterable of batches (dicts of model kwargs, or tensors), or a list of texts (str, or
                 {"text": str, "target": str | None} records) tokenized with `tokenizer` in batches of
                 settings.batch_size, truncated to settings.max_length tokens (optionally through the chat
                 template: chat_template=True); only for "iteris" and "regmean". `attention_mask`
                 (and `decoder_attention_mask`/`labels`, `encoder_attention_mask`) mark real positions: padding
                 never enters a Gram. Iterables are read into lists.
    tokenizer:   the base model's tokenizer; needed when the calibration is texts.
    keywords:    the choices of the merge (method, schedule, max_iter, alpha, adaptive_weights, weights, max_length,
                 ...): the fields of MergeSettings, documented there once; or settings=MergeSettings(...) instead.
    forward:     optional callable forward(model, batch), or a list of them (one per task), used instead of
                 model(**batch) — e.g. teacher forcing or a denoising step.
    on_iteration: optional callable(record, deltas) called after every solve with its IterationRecord and the
                 merged ΔW of that solve ({module name: float32 tensor in the weight's layout}), e.g. to
                 evaluate the model after each iteration without re-running the merge.
    """
    start = time.perf_counter()
    if settings is not None and keywords:
        raise IterisError(f"pass either settings=MergeSettings(...) or keywords ({', '.join(keywords)}), not both.")
    settings = settings if settings is not None else MergeSettings.from_keywords(keywords, also=_PARAMETERS)
    texts = text_records(calibration, tokenizer) if settings.method not in baselines.DATA_FREE else None
    check_plain_model(model)
    loras = _read_adapters(adapters)
    checked = check_adapters(model, loras)  # NaN/Inf, base models, task_type, shared heads (modules_to_save)
    layers = _layers(model, loras, settings.modules)
    prefix = module_prefix({k: v for a in loras for k, v in resolve_names(model, a.layers).items()})  # export keys
    settings = settings.resolved(len(loras))
    if settings.method in baselines.DATA_FREE:
        history = _merge_data_free(layers, settings)
    else:
        if texts is not None:
            calibration = tokenize_texts(model, tokenizer, texts, settings)
            checked["calibration_texts"] = [len(records) for records in texts]
        batches, forwards = _calibration(calibration, forward, len(loras))
        run = _sweep if settings.schedule == "sweep" else _iterate
        with _calibration_mode(model):
            history = run(model, layers, batches, forwards, settings, progress, on_iteration)
    record = {k: v for k, v in settings.record().items() if k != "weights"} | checked | dict(
        adapters=[a.path for a in loras], weights=list(settings.weights), layers=len(layers)) | (
        {"module_prefix": prefix} if prefix else {})
    return MergeResult(
        method=settings.method,
        deltas=_weight_layout(layers),
        factors={name: tuple(f.float().cpu() for f in layer.factors)
                 for name, layer in layers.items() if layer.factors is not None},
        history=history,
        layers={name: layer.target.layer for name, layer in layers.items()},
        settings=record,
        seconds=time.perf_counter() - start,
        base_model=loras[0].config.get("base_model_name_or_path"),
    )


_PARAMETERS = ("model", "adapters", "calibration", "tokenizer", "settings", "forward", "on_iteration", "progress")


def check_plain_model(model) -> None:
    """Refuse a model that already carries PEFT layers (a PeftModel, or LoRA layers injected into a model).

    Its active LoRAs would enter every feature X, also in modules that the merged adapters do not touch, and a
    merged one (merge_adapter()) has changed W0 itself: the result would be the merge of another model. Removing
    the layers is the user's call (it changes their model), so the message names how."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    if not wrapped:
        return
    what = "a PeftModel; " if isinstance(model, PeftModel) else ""
    modules = dict(model.named_modules())
    merged = any(getattr(modules[name], "merged", False) for name in wrapped)
    fix = "Pass a freshly loaded base model"
    if hasattr(model, "unload"):
        fix += (" or model.unload() (it removes the LoRA layers in place and returns the base model; the adapter "
                "folders are untouched)")
    if merged:
        fix = "A LoRA is merged into its base weights: call model.unmerge_adapter() first. " + fix
    raise AdapterError(f"the model already carries a PEFT adapter ({what}{len(wrapped)} LoRA modules, e.g. "
                       f"{wrapped[0]}); IterIS needs the base model "
                       f"alone, because an adapter in it would shift every feature. {fix}.")


def _read_adapters(adapters) -> list[LoraAdapter]:
    if isinstance(adapters, (str, os.PathLike, LoraAdapter)):
        raise AdapterError(f"adapters must be a list of adapter folders (or LoraAdapter objects), one per task; got "
                           f"the single {type(adapters).__name__} {str(getattr(adapters, 'path', adapters))!r}. "
                           "Pass adapters=[folder_a, folder_b].")
    loras = [a if isinstance(a, LoraAdapter) else load_adapter(a) for a in adapters]
    if len(loras) < 2:
        raise AdapterError(f"merging needs at least two adapters, got {len(loras)}.")
    return loras


def _layers(model, loras: list[LoraAdapter], policy: str) -> dict[str, _Layer]:
    """Resolve every adapter's modules in the model and check that the shapes fit, before touching anything."""
    per_adapter = []
    for adapter in loras:
        names = resolve_names(model, adapter.layers)
        per_adapter.append({names[k]: layer for k, layer in adapter.layers.items()})
    sets = [set(p) for p in per_adapter]
    common, every = set.intersection(*sets), set.union(*sets)
    if common != every and policy == "error":
        odd = next(i for i, s in enumerate(sets) if s != every)
        missing = sorted(every - sets[odd])
        raise AdapterError(f"adapters target different modules: {loras[odd].path} lacks {len(missing)} of them "
                           f"(e.g. {missing[0]}); pass modules='intersection' or modules='union'.")
    chosen = every if policy == "union" else common
    if not chosen:
        raise AdapterError("the adapters have no adapted module in common.")
    for pname, param in model.named_parameters():  # NaN/Inf anywhere in W0 would reach every feature
        if param.device.type != "meta" and param.is_floating_point() and not bool(torch.isfinite(param).all()):
            raise AdapterError(f"the base model's parameter {pname} contains NaN or Inf; the merge (and the model "
                               "itself) would output NaN. Reload or repair the base model.")
    modules = dict(model.named_modules())
    order = {name: k for k, name in enumerate(modules)}
    layers = {}
    for name in sorted(chosen, key=order.get):
        target = Target(name, modules[name], model)
        loras_here = [p.get(name) for p in per_adapter]
        for adapter, lora in zip(loras, loras_here):
            if lora is not None and not target.layer.fits(lora):
                raise AdapterError(f"{adapter.path}: module {name} has ΔW of shape "
                                   f"{tuple(lora.B.shape[:1]) + tuple(lora.A.shape[1:])} but the base layer's weight "
                                   f"is {target.layer.weight_shape}; was this adapter trained on another base model?")
        layers[name] = _Layer(target, loras_here)
    return layers


def _calibration(calibration, forward, n: int) -> tuple[list[list], list]:
    """Per task: its batches as a list, and its forward function (None: model(**batch))."""
    if calibration is None:
        raise CalibrationError("iteris and regmean need calibration data: one iterable of batches per adapter.")
    calibration = list(calibration)
    if len(calibration) != n:
        raise CalibrationError(f"got calibration for {len(calibration)} tasks but {n} adapters; "
                               "pass one iterable of batches per adapter, in the same order.")
    lists = []
    for i, batches in enumerate(calibration):
        batches = [batches] if isinstance(batches, (torch.Tensor, dict)) else list(batches)
        # DataLoader(TensorDataset(x)) yields [x]: a one-element list or tuple stands for its element
        batches = [b[0] if isinstance(b, (list, tuple)) and len(b) == 1 and isinstance(b[0], (torch.Tensor, dict))
                   else b for b in batches]
        if not batches:
            raise CalibrationError(f"task {i}: the calibration data is empty.")
        lists.append(batches)
    forwards = forward if isinstance(forward, (list, tuple)) else [forward] * n
    if len(forwards) != n:
        raise CalibrationError(f"got {len(forwards)} forward functions for {n} adapters.")
    return lists, forwards


def _merge_data_free(layers: dict[str, _Layer], settings: MergeSettings) -> list:
    """The data-free baselines (baselines.py), layer by layer; DARE's random drops seeded by settings.seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        for layer in layers.values():
            shape = layer.target.layer.matrix_shape()
            layer.delta, layer.factors = baselines.merge_layer(settings.method, layer.loras, shape,
                                                               list(settings.weights), settings.density)
    return []


def _weight_layout(layers: dict[str, _Layer]) -> dict[str, torch.Tensor]:
    return {name: layer.target.layer.delta_layout(layer.delta).float().cpu() for name, layer in layers.items()}


@contextmanager
def _calibration_mode(model):
    """Eval mode and no KV cache (passes run side by side in the sweep) for the merge; both restored after."""
    config = getattr(model, "config", None)
    cache = getattr(config, "use_cache", None)
    was_training = model.training
    model.eval()
    if cache:
        config.use_cache = False
    try:
        yield
    finally:
        model.train(was_training)
        if cache:
            config.use_cache = cache


def _task_deltas(layers: dict[str, _Layer], n: int) -> list[dict]:
    return [{name: layer.loras[i] for name, layer in layers.items()} for i in range(n)]


def _quiet(progress: bool) -> bool:
    return not progress or bool(os.environ.get("TQDM_DISABLE"))


def _iterate(model, layers: dict[str, _Layer], batches, forwards, settings: MergeSettings, progress,
             on_iteration=None) -> list[IterationRecord]:
    """The Jacobi schedule: every layer solved from the previous merge's features, `max_iter` times."""
    targets = {name: layer.target for name, layer in layers.items()}
    dtype = settings.gram_torch_dtype
    task_deltas = _task_deltas(layers, len(batches))
    quiet = _quiet(progress)
    history: list[IterationRecord] = []
    with DeltaHooks(targets) as hooks:
        bar = tqdm(range(1, settings.max_iter + 1), desc=f"{settings.method} solves", disable=quiet)
        for t in bar:
            tick = time.perf_counter()
            stats = []  # the previous solve's statistics are released before new ones are summed
            merged = {name: layer.factors for name, layer in layers.items()}
            for i in tqdm(range(len(batches)), desc=f"solve {t}: tasks", leave=False, disable=quiet):
                if t == 1:
                    hooks.set(task_deltas[i])
                    task = gram_pass(model, targets, batches[i], forwards[i], dtype)
                else:
                    task = paired_pass(model, targets, batches[i], hooks, task_deltas[i], merged, forwards[i], dtype)
                check_coverage(task, targets, i)
                stats.append(task)
            record = _solve_all(layers, stats, settings, t)
            record.seconds = time.perf_counter() - tick
            history.append(record)
            if on_iteration is not None:
                hooks.set({})  # the callback sees the base model W0, as merge_loras' caller does
                on_iteration(record, _weight_layout(layers))
            bar.set_postfix(objective=f"{record.mean_objective():.3g}")
            tol = settings.tol
            if tol is not None and t > 1 and max(record.change.values()) < tol:
                break
    return history


def _sweep(model, layers: dict[str, _Layer], batches, forwards, settings: MergeSettings, progress,
           on_iteration=None) -> list[IterationRecord]:
    """The one-sweep schedule (sweep.py): each layer solved once, from the merged model's own features."""
    tick = time.perf_counter()
    record = IterationRecord(1, {}, {}, {}, {}, {})
    tasks = [SweepTask(b, f, d) for b, f, d in zip(batches, forwards, _task_deltas(layers, len(batches)))]
    current: list[Statistics] = []  # float64 statistics of the module solved last, reused by modules sharing them

    def solve_one(name: str, stats: list[Statistics], shared: bool):
        if not shared:
            current[:] = [st.float64(settings.shrink) for st in stats]
        _solve_layer(name, layers[name], current, settings, record, features="final merge")
        return layers[name].factors

    targets = {name: layer.target for name, layer in layers.items()}
    with tqdm(total=len(targets), desc="iteris sweep: layers", disable=_quiet(progress)) as bar:
        one_sweep(model, targets, tasks, solve_one, settings.gram_torch_dtype, on_solved=lambda name: bar.update())
    record.seconds = time.perf_counter() - tick
    if on_iteration is not None:
        on_iteration(record, _weight_layout(layers))
    return [record]


def _solve_all(layers, stats: list[TaskStatistics], settings: MergeSettings, t: int) -> IterationRecord:
    """Jacobi's solve t of every layer; a group's float64 statistics are built once for its modules."""
    record = IterationRecord(t, {}, {}, {} if t > 1 else None, {}, {})
    group, current = None, []
    for name, layer in layers.items():
        groups = [task.group_of(name) for task in stats]
        if groups != group:
            group, current = groups, [task.groups[g].float64(settings.shrink) for task, g in zip(stats, groups)]
        _solve_layer(name, layer, current, settings, record, features="tasks" if t == 1 else "previous merge")
    return record


def _solve_layer(name: str, layer: _Layer, stats: list[Statistics], settings: MergeSettings,
                 record: IterationRecord, features: str) -> None:
    """Solve one layer from its float64 statistics per task (S_i = X_iᵀX_i for λ, P_i = X_iᵀX̃_i, Q_i = X̃_iᵀX̃_i)
    and record what it did. `features` says which model produced X̃: "tasks" (X̃ = X), "previous merge" (Jacobi)
    or "final merge" (the sweep: the merge being built, every layer upstream final)."""
    with exact(stats[0].s):
        if not layer.lambdas:
            _fix_lambdas(layer, [st.s for st in stats], settings, layer.target.weight_matrix())
        problem = LayerProblem(name, layer.loras, [st.p for st in stats], [st.q for st in stats], layer.lambdas,
                               sum(st.rows for st in stats), shrunk=settings.shrink < 1)
        previous_factors, previous = layer.factors, layer.delta
        B, A = solve(problem, settings.alpha)
        layer.factors, layer.delta = (B, A), B @ A
        record.lambdas[name] = list(layer.lambdas)
        record.objective[name] = _relative(objective(problem, B, A, layer.energies), layer.energies)
        if features != "tasks":
            producer = (B, A) if features == "final merge" else previous_factors
            record.merged_objective[name] = _relative(objective(problem, *producer, layer.energies), layer.energies)
        record.change[name] = 1.0 if previous is None else float(
            torch.linalg.matrix_norm(layer.delta - previous) / torch.linalg.matrix_norm(layer.delta).clamp_min(1e-30))
        record.drift[name] = [float((torch.trace(st.s) - 2 * torch.trace(st.p) + torch.trace(st.q)) / torch.trace(st.s))
                              for st in stats]


def _fix_lambdas(layer: _Layer, s: list[torch.Tensor], settings: MergeSettings, w0: torch.Tensor) -> None:
    """λ_i (times the user's weight of task i) and ‖X_iΔW_iᵀ‖² from S_i = X_iᵀX_i, fixed at the layer's first solve:
    X_i never changes."""
    lams = [adaptive_weight(lora, s_i, w0, settings.adaptive_weights) for lora, s_i in zip(layer.loras, s)]
    known = [lam for lam in lams if lam is not None]
    fill = sum(known) / len(known) if known else 1.0
    layer.lambdas = [(fill if lam is None else lam) * w for lam, w in zip(lams, settings.weights)]
    layer.energies = [0.0 if lora is None else output_energy(lora, s_i) for lora, s_i in zip(layer.loras, s)]


def _relative(values: list[float], energies: list[float]) -> list[float]:
    return [v / e if e > 0 else v for v, e in zip(values, energies)]
