"""Issue 18, the writers: one destination rule for save_adapter, write_diffusers_lora and the CLI (io/destination.py).

Each test is one case of the issue (data loss, races and leftovers, misleading messages, the inner-module merge);
every one fails on the code before the rule. Inputs are fingerprinted (sha256 of every file) before and after.
"""
import copy
import errno
import hashlib
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import iteris_lab
from iteris_lab import AdapterError, ExportError, IterisError, merge_loras, read_diffusers_lora, write_diffusers_lora
from iteris_lab.cli import main
from iteris_lab.io import destination
from tiny import build_tiny, make_lora, merge_case, outputs, saved_model, token_batches

ROOT = Path(__file__).resolve().parents[1]


def fingerprint(*places) -> dict:
    """{path: sha256} of every file under the given files and folders (symlinks not followed)."""
    out = {}
    for place in map(Path, places):
        files = [place] if place.is_file() else [p for p in place.rglob("*") if p.is_file()]
        out.update({str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
    return out


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir())


@pytest.fixture
def case(tmp_path):
    return merge_case("mlp", tmp_path / "inputs", n_tasks=2)


@pytest.fixture
def result(case):
    return merge_loras(case.model, case.adapters, method="linear", progress=False)


# -- data loss ---------------------------------------------------------------------------------------------------

def test_save_adapter_never_replaces_an_input_adapter(case, result):
    before = fingerprint(*case.adapters)
    with pytest.raises(ExportError, match="is an input of this write"):
        result.save_adapter(case.adapters[0], overwrite=True)
    with pytest.raises(ExportError, match="lies inside an input"):
        result.save_adapter(Path(case.adapters[1]) / "merged", overwrite=True)
    with pytest.raises(ExportError, match="contains an input"):
        result.save_adapter(Path(case.adapters[0]).parent, overwrite=True)
    assert fingerprint(*case.adapters) == before
    assert listing(Path(case.adapters[1])) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_more_inputs_can_be_protected_by_the_caller(result, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(ExportError, match="lies inside an input"):
        result.save_adapter(base / "merged", inputs=[base])
    assert listing(base) == ["model.safetensors"]


def test_overwrite_replaces_only_the_files_the_write_produces(case, result, tmp_path):
    """A Trainer output folder: the adapter at the top, checkpoints, optimizer state and a README beside it."""
    trainer = tmp_path / "run"
    result.save_adapter(trainer)
    (trainer / "checkpoint-500").mkdir()
    (trainer / "checkpoint-500" / "optimizer.pt").write_bytes(b"state")
    (trainer / "README.md").write_text("my notes")
    (trainer / "training_args.bin").write_bytes(b"args")
    before = fingerprint(trainer)
    with pytest.raises(ExportError, match="holds README.md, checkpoint-500, training_args.bin besides the adapter"):
        result.save_adapter(trainer, overwrite=True)
    assert fingerprint(trainer) == before
    shutil.rmtree(trainer / "checkpoint-500")  # once only files this write produces remain, it is replaced
    (trainer / "training_args.bin").unlink()
    report = result.save_adapter(trainer, overwrite=True, extra_files={"README.md": "merged card",
                                                                       "iteris_report.json": "{}"})
    assert report.path == str(trainer)
    assert (trainer / "README.md").read_text() == "merged card"
    assert listing(trainer) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "iteris_report.json"]
    # a stale report never stays beside a new adapter: iteris_report.json is always the writer's own file
    result.save_adapter(trainer, overwrite=True, extra_files={"README.md": "again"})
    assert listing(trainer) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_a_checkpoint_inside_the_folder_that_is_an_input_is_named(case, tmp_path):
    trainer = tmp_path / "run"
    first = merge_loras(case.model, case.adapters, method="linear", progress=False)
    first.save_adapter(trainer)
    checkpoint = make_lora(case.model, trainer / "checkpoint-500", ["0", "2", "4"], seed=7)
    second = merge_loras(case.model, [case.adapters[0], checkpoint], method="linear", progress=False)
    before = fingerprint(trainer)
    with pytest.raises(ExportError, match=r"contains an input of this write \(.*checkpoint-500\)"):
        second.save_adapter(trainer, overwrite=True)
    assert fingerprint(trainer) == before


@pytest.fixture
def lora_files(case, result, tmp_path):
    """Two diffusers-format LoRA files of the mlp, and a merge of them (its inputs are those files)."""
    files = []
    for i, seed in enumerate((3, 4)):
        other = merge_loras(case.model, case.adapters, method="linear", weights=[1.0, float(seed)], progress=False)
        folder = tmp_path / f"lora{i}"
        write_diffusers_lora(other, folder)
        files.append(folder)
    adapters = [read_diffusers_lora(f, case.model) for f in files]
    merged = merge_loras(case.model, adapters, method="linear", progress=False)
    return files, merged


def test_write_diffusers_lora_never_replaces_an_input_lora(lora_files):
    folders, merged = lora_files
    before = fingerprint(*folders)
    for destination_ in (folders[0], folders[1] / "pytorch_lora_weights.safetensors"):
        with pytest.raises(ExportError, match="is an input of this write"):
            write_diffusers_lora(merged, destination_)
        with pytest.raises(ExportError, match="is an input of this write"):
            write_diffusers_lora(merged, destination_, overwrite=True)
    assert fingerprint(*folders) == before


def test_write_diffusers_lora_never_replaces_a_base_model_file(result, tmp_path):
    weights = tmp_path / "model.safetensors"
    save_file({"0.weight": torch.ones(2, 2)}, str(weights))
    before = fingerprint(weights)
    with pytest.raises(ExportError, match="already exists; pass overwrite=True"):
        write_diffusers_lora(result, weights)
    with pytest.raises(ExportError, match=r"holds the tensor 0\.weight, which is not a LoRA factor, so it is not "
                                          "replaced even with overwrite"):
        write_diffusers_lora(result, weights, overwrite=True)
    assert fingerprint(weights) == before
    first = write_diffusers_lora(result, tmp_path / "merged.safetensors")
    write_diffusers_lora(result, first.path, overwrite=True)  # a LoRA file is replaced when asked
    assert listing(tmp_path) == ["inputs", "merged.safetensors", "model.safetensors"]


def test_write_diffusers_lora_refuses_nan_and_writes_nothing(result, tmp_path):
    result.factors["2"][0][0, 0] = float("nan")
    with pytest.raises(ExportError, match=r"unet\.2\.lora_B\.weight: the merged adapter contains NaN or Inf; "
                                          "nothing was written"):
        write_diffusers_lora(result, tmp_path / "merged")
    assert listing(tmp_path) == ["inputs"]


# -- races and leftovers -------------------------------------------------------------------------------------------

SLOW_SAVE = """
import sys, time
from pathlib import Path
import torch
import iteris_lab.io.export as export
result = torch.load(sys.argv[1], weights_only=False)
real = export.save_file
def slow(tensors, file, **kw):
    real(tensors, file, **kw)
    print("staged", flush=True)
    while not Path(sys.argv[3]).exists():  # hold the write open until the test says go (or kills us)
        time.sleep(0.05)
export.save_file = slow
result.save_adapter(sys.argv[2], overwrite=True, extra_files={"iteris_report.json": "first run"})
print("saved", flush=True)
"""


def start_slow_save(result, out: Path, go: Path, tmp_path) -> subprocess.Popen:
    """A second Python process saving `result` to `out`, paused after its files are staged until `go` exists."""
    pickled = tmp_path / "result.pt"
    torch.save(result, pickled)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    process = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(pickled), str(out), str(go)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert line.strip() == "staged", process.stderr.read()
    return process


def staging_folders(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}{destination.STAGING}*"))


def test_two_concurrent_writers_of_one_destination(case, result, tmp_path):
    out = tmp_path / "merged"
    other = merge_loras(case.model, case.adapters, method="task_arithmetic", progress=False)
    other.save_adapter(out)
    go = tmp_path / "go"
    first = start_slow_save(result, out, go, tmp_path)
    try:
        staged = staging_folders(out)
        assert len(staged) == 1
        with pytest.raises(ExportError, match=rf"process {first.pid} is writing .*merged right now"):
            other.save_adapter(out, overwrite=True, extra_files={"iteris_report.json": "second run"})
        with pytest.raises(ExportError, match="is writing"):  # and the up-front check says so too
            destination.check_destination(out, overwrite=True)
        assert staging_folders(out) == staged  # the second writer touched nothing of the first's
    finally:
        go.touch()
        stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0 and "saved" in stdout, stderr
    assert (out / "iteris_report.json").read_text() == "first run"  # the first run's adapter with its own report
    reference = tmp_path / "reference"
    result.save_adapter(reference)
    assert (out / "adapter_model.safetensors").read_bytes() == (reference / "adapter_model.safetensors").read_bytes()
    assert listing(tmp_path) == ["go", "inputs", "merged", "reference", "result.pt"]  # no staging, no lock left


def test_a_run_may_hold_the_lock_around_its_whole_work(result, tmp_path):
    """The CLI can take the lock before its merge: its own save then writes under it, other threads are refused."""
    import threading

    out = tmp_path / "merged"
    errors = []
    with destination.writer_lock(out):
        destination.check_destination(out)  # not "busy" for the holder
        other = threading.Thread(target=lambda: errors.append(pytest.raises(ExportError, result.save_adapter, out)))
        other.start()
        other.join()
        result.save_adapter(out, extra_files={"iteris_report.json": "{}"})
    assert "is writing" in str(errors[0].value)
    assert listing(tmp_path) == ["inputs", "merged"]
    with destination.writer_lock(tmp_path / "new" / "deeper" / "merged"):  # parents made for the lock file
        assert (tmp_path / "new" / "deeper").is_dir()
    assert listing(tmp_path) == ["inputs", "merged"]  # and removed again, being empty


def test_kill_9_mid_save_keeps_the_old_adapter_and_the_next_write_cleans_up(case, result, tmp_path):
    out = tmp_path / "merged"
    old = merge_loras(case.model, case.adapters, method="task_arithmetic", progress=False)
    old.save_adapter(out, extra_files={"iteris_report.json": "old"})
    before = fingerprint(out)
    process = start_slow_save(result, out, tmp_path / "never", tmp_path)
    process.kill()  # SIGKILL: no finally, no cleanup
    process.wait(timeout=60)
    assert fingerprint(out) == before
    assert staging_folders(out) and (tmp_path / f".merged{destination.LOCK}").exists()  # what a kill leaves
    with pytest.raises(ExportError, match="already exists"):  # the lock died with its holder: no "busy"
        result.save_adapter(out)
    result.save_adapter(out, overwrite=True)
    assert listing(tmp_path) == ["inputs", "merged", "result.pt"]


def test_a_report_that_fails_to_write_leaves_the_old_adapter_and_report(case, result, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    result.save_adapter(out, extra_files={"iteris_report.json": "old report"})
    before = fingerprint(out)
    real = Path.write_bytes

    def disk_full(self, data):
        if self.name == "iteris_report.json":
            real(self, data[:0])  # the 0-byte report a full disk leaves
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    other = merge_loras(case.model, case.adapters, method="task_arithmetic", progress=False)
    with pytest.raises(ExportError, match="could not write .*merged: the disk is full .*the old output is unchanged"):
        other.save_adapter(out, overwrite=True, extra_files={"iteris_report.json": "new report"})
    assert fingerprint(out) == before
    assert listing(tmp_path) == ["inputs", "merged"]


def test_permissions_of_a_replaced_folder_are_kept(case, result, tmp_path):
    mask = os.umask(0o022)
    try:
        new = tmp_path / "new"
        result.save_adapter(new)
        assert oct(new.stat().st_mode & 0o777) == oct(0o755)  # the umask's mode, not mkdtemp's 0700
        assert [oct(p.stat().st_mode & 0o777) for p in sorted(new.iterdir())] == [oct(0o644)] * 2  # not 0600
        os.chmod(new, 0o750)
        os.chmod(new / "adapter_model.safetensors", 0o640)
        result.save_adapter(new, overwrite=True)
        assert oct(new.stat().st_mode & 0o777) == oct(0o750)
        assert oct((new / "adapter_model.safetensors").stat().st_mode & 0o777) == oct(0o640)
        file = write_diffusers_lora(result, tmp_path / "lora.safetensors").path
        assert oct(Path(file).stat().st_mode & 0o777) == oct(0o644)  # not mkstemp's 0600
    finally:
        os.umask(mask)


# -- messages that say what is true --------------------------------------------------------------------------------

def test_a_symlinked_destination_is_called_a_link(result, tmp_path):
    real = tmp_path / "real"
    result.save_adapter(real)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(ExportError, match=r"link is a symbolic link to .*real; a link or a special file is never "
                                          "replaced nor written through"):
        result.save_adapter(link, overwrite=True)
    assert link.is_symlink() and (real / "adapter_config.json").is_file()


def test_out_dot_dot_is_its_real_folder_and_leaves_nothing_inside_the_adapter(case, result, monkeypatch):
    adapter = Path(case.adapters[0])
    before = fingerprint(adapter)
    with pytest.raises(ExportError, match="contains an input"):
        result.save_adapter(adapter / "..", overwrite=True)
    monkeypatch.chdir(adapter.parent)
    with pytest.raises(ExportError, match="current directory"):
        result.save_adapter(Path(adapter.name) / "..", overwrite=True)
    assert fingerprint(adapter) == before and listing(adapter) == sorted(Path(p).name for p in before)


def test_an_unwritable_destination_is_found_before_the_work(result, tmp_path, monkeypatch):
    real_mkdir = os.mkdir

    def read_only(path, *args, **kwargs):
        if Path(path).parent == tmp_path / "shared":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    (tmp_path / "shared").mkdir()
    monkeypatch.setattr(destination.os, "mkdir", read_only)
    with pytest.raises(ExportError, match=r"cannot write .*shared/merged: creating a file in .*shared fails "
                                          r"\(Permission denied\)"):
        destination.check_destination(tmp_path / "shared" / "merged")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused_up_front(result, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o555)
    with pytest.raises(ExportError, match="cannot write"):
        destination.check_destination(shared / "merged")


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "dangling"])
def test_special_weight_files_are_named_as_what_they_are(case, tmp_path, kind):
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes((Path(case.adapters[0]) / "adapter_config.json").read_bytes())
    weights = folder / "adapter_model.safetensors"
    if kind == "fifo":
        os.mkfifo(weights)
        expected = r"is a FIFO \(named pipe\)"
    elif kind == "dev_zero":
        weights.symlink_to("/dev/zero")
        expected = r"is a symbolic link to /dev/zero \(a character device\)"
    else:
        weights.symlink_to(tmp_path / "gone.safetensors")
        expected = "is a symbolic link to .*gone.safetensors, which does not exist"
    with pytest.raises(AdapterError, match=expected + ", not a regular file"):
        iteris_lab.load_adapter(folder)


def test_a_symlink_to_a_regular_weights_file_still_loads(case, tmp_path):
    folder = tmp_path / "linked"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).symlink_to(Path(case.adapters[0]) / name)
    assert iteris_lab.load_adapter(folder).layers.keys() == iteris_lab.load_adapter(case.adapters[0]).layers.keys()


# -- the inner module -----------------------------------------------------------------------------------------------

def test_a_merge_on_an_inner_module_exports_keys_that_load_into_the_full_model(tmp_path):
    from peft import PeftModel

    full = build_tiny("bert")
    adapters = [make_lora(full, tmp_path / f"a{i}", ["query", "value"], seed=i + 1) for i in range(2)]
    calibration = [token_batches("bert", seed=10 + i) for i in range(2)]
    result = merge_loras(full.bert, adapters, calibration, method="iteris", progress=False)
    result.save_adapter(tmp_path / "merged")
    batch = token_batches("bert", seed=7)[0]
    dense = outputs(result.apply_to(copy.deepcopy(full)), batch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(copy.deepcopy(full), str(tmp_path / "merged"))
    assert not [w for w in caught if "missing" in str(w.message).lower()]
    torch.testing.assert_close(outputs(loaded, batch), dense, atol=1e-4, rtol=0)
    assert (dense - outputs(full, batch)).abs().max() > 1e-3  # not a no-op adapter
    assert result.settings["module_prefix"] == "bert"  # the note in the report
    assert result.report()["settings"]["module_prefix"] == "bert"


# -- the CLI checks the destination before anything slow -----------------------------------------------------------

@pytest.fixture
def cli_case(tmp_path, monkeypatch):
    """A llama base folder, two adapters, and a load_base that fails the test if the CLI gets that far."""
    import iteris_lab.cli.merge as cli

    base, model = saved_model("llama", tmp_path / "base")
    adapters = [make_lora(model, tmp_path / f"a{i}", ["q_proj", "v_proj"], seed=i + 1) for i in range(2)]

    def never(*args, **kwargs):
        raise AssertionError("the base model was loaded before the destination was checked")

    monkeypatch.setattr(cli, "load_base", never)
    return base, adapters, tmp_path


def run_cli(cli_case, out, *extra) -> int:
    base, adapters, _ = cli_case
    argv = ["merge", "--base", base, "--out", str(out), "--method", "linear", "--quiet", *extra]
    for adapter in adapters:
        argv += ["--adapter", adapter]
    return main(argv)


def test_cli_refuses_bad_destinations_before_loading_the_base(cli_case, capsys, monkeypatch):
    base, adapters, tmp_path = cli_case
    before = fingerprint(base, *adapters)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "a0")
    cases = [(adapters[0], "is an input of this write"), (Path(adapters[1]) / "merged", "lies inside an input"),
             (Path(adapters[0]) / "..", "contains an input"), (Path(base) / "merged", "lies inside an input"),
             (link, "is a symbolic link to")]
    for out, message in cases:
        assert run_cli(cli_case, out, "--overwrite") == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (out, err)
    real_mkdir = os.mkdir
    monkeypatch.setattr(destination.os, "mkdir", lambda path, *a: (_ for _ in ()).throw(
        PermissionError(errno.EROFS, "Read-only file system", str(path))) if ".iteris-probe-" in str(path)
        else real_mkdir(path, *a))
    assert run_cli(cli_case, tmp_path / "merged") == 2
    assert "creating a file in" in capsys.readouterr().err
    assert fingerprint(base, *adapters) == before


def test_a_results_file_is_replaced_when_named_again_but_never_an_input_or_a_folder(tmp_path):
    from iteris_lab.io.destination import write_text

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "keep"}\n')
    with pytest.raises(ExportError):
        write_text(prompts, "{}", inputs=[prompts])  # --json naming one of the command's inputs
    assert prompts.read_text() == '{"text": "keep"}\n'
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(ExportError):
        write_text(tmp_path / "folder.json", "{}")
    results = tmp_path / "results.json"
    write_text(results, '{"a": 1}')
    write_text(results, '{"a": 2}')
    assert results.read_text() == '{"a": 2}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.json", "prompts.jsonl", "results.json"]


def test_bench_results_go_through_the_destination_rule(tmp_path, monkeypatch):
    """`iteris-lab bench --out DIR` writes <model>.json and .md like demo --json: staged, never onto a folder."""
    from iteris_lab.tracks.llm import track

    for name, fake in (("load_track", lambda model: None), ("_on_gpu", lambda t: t),
                       ("choose_iteris", lambda *a, **k: ({}, [])), ("run_methods", lambda *a, **k: []),
                       ("report", lambda *a, **k: {"results": []}), ("results_tables", lambda rows: "table")):
        monkeypatch.setattr(track, name, fake)
    track.run_bench("minilm", tmp_path / "new", quiet=True)
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["minilm.json", "minilm.md"]
    (tmp_path / "taken" / "minilm.json").mkdir(parents=True)
    with pytest.raises(IterisError, match="minilm.json"):
        track.run_bench("minilm", tmp_path / "taken", quiet=True)
    assert (tmp_path / "taken" / "minilm.json").is_dir()
