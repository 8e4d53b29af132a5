"""Checkpoints that are damaged, foreign or escape their directory are not trusted (issues #24, #26):
the manifest, fallback on resume, identity checks, full disks, unreadable JSON, storage paths, links."""
import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_tip.checkpoint.manifest import MANIFEST, CorruptCheckpointError, verify_checkpoint, write_manifest
from megatron_tip.checkpoint.safe_load import UnsafeCheckpointError, read_dcp_metadata, verify_dist_checkpoint
from megatron_tip.checkpoint.training import complete_checkpoints, usable_checkpoint
from megatron_tip.launch import run_distributed
from tests.helpers.paths import REPO
from tests.helpers.trainer_cases import make_pair, overrides, run_train_main

pytestmark = pytest.mark.timeout(600)
CONFIG = str(REPO / "tests/helpers/empty.yaml")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    return (root,) + make_pair(root)



def cli(pair, out, module="megatron_tip.train", **kw):
    """The real CLI in a subprocess: (exit code, stdout, stderr)."""
    root, teacher, student = pair
    argv = overrides(root, teacher, student, **{"train.steps": 4, "run.out_dir": out, **kw})
    res = subprocess.run([sys.executable, "-m", module, "--config", CONFIG, *argv], capture_output=True,
                         text=True, timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    return res.returncode, res.stdout, res.stderr


def convert(ckpt, out):
    res = subprocess.run([sys.executable, "-m", "megatron_tip.convert", "megatron-to-hf", "--megatron-dir",
                          str(ckpt), "--out", str(out), "--no-progress"], capture_output=True, text=True,
                         timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    return res.returncode, res.stdout, res.stderr


def metrics(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def error_line(stderr, match):
    lines = [ln for ln in stderr.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and match in lines[0], stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


def ckpt(out, step):
    return out / "checkpoints" / f"step_{step:06d}"


@pytest.fixture(scope="module")
def saved(pair, tmp_path_factory):
    """A 4-step run stopped after step 2 with checkpoints at steps 0, 1 and 2 (with manifests)."""
    root, teacher, student = pair
    out = tmp_path_factory.mktemp("saved") / "run"
    argv = ["--config", CONFIG, *overrides(root, teacher, student, **{
        "train.steps": 4, "run.out_dir": out, "run.save_every": 1, "run.exit_interval": 3})]
    assert run_distributed(run_train_main, 1, argv)[0][0] == "ok"
    assert [p.name for p, _ in complete_checkpoints(out)] == ["step_000000", "step_000001", "step_000002"]
    return out


@pytest.fixture
def run_copy(saved, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(saved, out)
    return out


# ---- ways to damage a checkpoint (each returns the file it damaged) -----------------------------
def _tensor_item(model_dir, file):
    """(offset, length) of the largest tensor item stored in ``file`` of a dist_checkpointing dir."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    meta = read_dcp_metadata(model_dir / ".metadata")
    byte_keys = {k for k, v in meta.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    items = [(int(i.length), int(i.offset)) for idx, i in meta.storage_data.items()
             if i.relative_path == file and idx.fqn not in byte_keys]
    length, offset = max(items)
    return offset, length


def flip_bit(c):
    path = c / "model" / "__0_1.distcp"
    offset, length = _tensor_item(c / "model", "__0_1.distcp")
    data = bytearray(path.read_bytes())
    data[offset + length // 2] ^= 0x10
    path.write_bytes(bytes(data))
    return path


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    return path


def truncate_shard(c):
    return _truncate(c / "model" / "__0_0.distcp")


def truncate_optim(c):
    return _truncate(c / "optim_rank00000.pt")


def delete_common(c):
    (c / "model" / "common.pt").unlink()
    return c / "model" / "common.pt"


def damage_zip_header(c):
    path = c / "optim_rank00000.pt"
    data = bytearray(path.read_bytes())
    data[:4] = b"\0\0\0\0"  # the zip local-file-header signature PK\3\4
    path.write_bytes(bytes(data))
    return path


DAMAGES = [flip_bit, truncate_shard, truncate_optim, delete_common, damage_zip_header]


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__)
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_used(run_copy, damage, capsys):
    bad = damage(ckpt(run_copy, 2))
    path, state, verified = usable_checkpoint(run_copy)
    assert (path, state["step"], verified) == (ckpt(run_copy, 1), 1, True)
    warnings = [ln for ln in capsys.readouterr().out.splitlines() if "damaged" in ln]
    assert len(warnings) == 1 and str(bad) in warnings[0], warnings
    with pytest.raises(CorruptCheckpointError, match=bad.name):
        verify_checkpoint(ckpt(run_copy, 2))


def test_resume_after_a_flipped_bit_falls_back_and_trains_the_same_steps(saved, run_copy, pair):
    flip_bit(ckpt(run_copy, 2))
    code, out, err = cli(pair, run_copy, **{"run.resume": "auto"})
    assert code == 0, err[-3000:]
    warned = [ln for ln in out.splitlines() if "is damaged" in ln]
    assert len(warned) == 1 and "__0_1.distcp" in warned[0] and "sha256 differs" in warned[0], out[-2000:]
    assert "resuming from" in out and "step_000001" in out
    redone = metrics(run_copy)
    assert sorted(redone) == [0, 1, 2, 3]
    assert redone[2] == metrics(saved)[2]  # step 2 redone from the step-1 checkpoint: bit-exact


def test_resume_survives_a_truncated_optimizer_file_and_a_garbage_metrics_tail(saved, run_copy, pair):
    truncate_optim(ckpt(run_copy, 2))
    with (run_copy / "metrics.jsonl").open("ab") as f:
        f.write(bytes(range(256)) + os.urandom(44))
    code, out, err = cli(pair, run_copy, **{"run.resume": "auto"})
    assert code == 0 and "Traceback" not in err, err[-3000:]
    assert any("optim_rank00000.pt" in ln and "truncated" in ln for ln in out.splitlines()), out[-2000:]
    assert any(str(run_copy / "metrics.jsonl") in ln and "dropped" in ln for ln in out.splitlines()), out[-2000:]
    redone = metrics(run_copy)
    assert sorted(redone) == [0, 1, 2, 3] and redone[2] == metrics(saved)[2]


def test_an_interrupted_final_manifest_means_incomplete_and_no_manifest_means_older(run_copy, capsys):
    c2 = ckpt(run_copy, 2)
    manifest = json.loads((c2 / MANIFEST).read_text())
    del manifest["files"]["trainer_state.json"]  # the model part's manifest: the save stopped before its last act
    (c2 / MANIFEST).write_text(json.dumps(manifest))
    assert [p.name for p, _ in complete_checkpoints(run_copy)] == ["step_000000", "step_000001"]
    (ckpt(run_copy, 1) / MANIFEST).unlink()  # written before manifests existed: used, unverified
    assert usable_checkpoint(run_copy)[::2] == (ckpt(run_copy, 1), False)


def test_a_checkpoint_of_another_run_or_with_another_step_is_refused(run_copy, pair):
    record = json.loads((run_copy / "run.json").read_text())
    other = {**record, "run_id": "0123456789ab"}  # this directory now says it is another run
    (run_copy / "run.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match=f"belongs to run {record['run_id']}.*is run 0123456789ab"):
        usable_checkpoint(run_copy)
    (run_copy / "run.json").write_text(json.dumps(record))
    state_file = ckpt(run_copy, 2) / "trainer_state.json"
    for step in (99, 0):
        state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "step": step}))
        with pytest.raises(ValueError, match=f"says step {step}, its directory name says step_000002"):
            usable_checkpoint(run_copy)
    code, _, err = cli(pair, run_copy, **{"run.resume": "auto"})
    assert code == 2
    error_line(err, "trainer_state.json says step 0")
    assert sorted(metrics(run_copy)) == [0, 1, 2]  # nothing was trained


def test_unreadable_run_and_spec_files_are_named(run_copy, pair, tmp_path):
    for text, match in (('{"run_id": "x",', "run.json: not valid JSON"),
                        ("[1, 2]", "run.json: expected a JSON object")):
        (run_copy / "run.json").write_text(text)
        code, _, err = cli(pair, run_copy, **{"run.resume": "auto"})
        assert code == 2
        error_line(err, match)
    teacher = tmp_path / "teacher_ckpt"
    shutil.copytree(ckpt(run_copy, 2), teacher)
    (teacher / "model_spec.json").write_text("{'hidden_size': 32}")
    code, _, err = cli(pair, tmp_path / "t", **{"teacher.path": teacher})
    assert code == 2
    error_line(err, f"{teacher / 'model_spec.json'}: not valid JSON")


def test_a_damaged_checkpoint_fails_load_and_convert_with_one_line(run_copy, pair, tmp_path):
    teacher = tmp_path / "teacher_ckpt"
    shutil.copytree(ckpt(run_copy, 2), teacher)
    bad = flip_bit(teacher)
    code, _, err = convert(teacher, tmp_path / "hf")
    assert code == 2 and not (tmp_path / "hf").exists()
    error_line(err, f"{bad}: sha256 differs from the manifest")
    code, _, err = cli(pair, tmp_path / "t", **{"teacher.path": teacher, "train.steps": 1})
    assert code == 2 and not (tmp_path / "t" / "checkpoints").exists()
    error_line(err, f"{bad}: sha256 differs from the manifest")


def _tmpfs(path, size):
    path.mkdir(parents=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip()}): needs root in a container "
                    f"that allows mounts")


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(saved, pair, tmp_path):
    size = sum(f.stat().st_size for f in ckpt(saved, 0).rglob("*") if f.is_file())
    disk = tmp_path / "disk"
    _tmpfs(disk, f"{size * 5 // 2 // 1024}k")  # room for two checkpoints, not three
    try:
        out = disk / "run"
        code, _, err = cli(pair, out, **{"train.steps": 3, "run.save_every": 1})
        assert code == 2
        line = error_line(err, "No space left on device")
        assert str(ckpt(out, 2)) in line and "the last complete checkpoint is step 1" in line
        assert "needs about" in line and "free there" in line
        assert usable_checkpoint(out)[::2] == (ckpt(out, 1), True)  # intact: it verifies
        assert not ckpt(out, 2).exists() and not list((out / "checkpoints").glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# ---- issue #26: storage paths and links ---------------------------------------------------------
def test_tensor_storage_paths_outside_the_checkpoint_are_refused(run_copy, tmp_path):
    teacher = tmp_path / "a" / "b" / "c" / "teacher_ckpt"
    shutil.copytree(ckpt(run_copy, 2), teacher)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(teacher / "model" / "__0_1.distcp", outside / "__0_1.distcp")
    meta = read_dcp_metadata(teacher / "model" / ".metadata")
    escape = "../../../../outside/__0_1.distcp"
    meta.storage_data = {k: dataclasses.replace(v, relative_path=escape) if v.relative_path == "__0_1.distcp" else v
                         for k, v in meta.storage_data.items()}
    with open(teacher / "model" / ".metadata", "wb") as f:
        pickle.dump(meta, f)
    write_manifest(teacher)  # a consistent forgery: the manifest cannot be what stops it
    with pytest.raises(UnsafeCheckpointError, match="not a file of the checkpoint directory"):
        verify_dist_checkpoint(teacher / "model")
    code, _, err = convert(teacher, tmp_path / "hf")
    assert code == 2 and not (tmp_path / "hf").exists()
    error_line(err, "stores item")
    assert escape in err


def test_a_checkpoint_of_links_into_a_blob_store_loads(run_copy, tmp_path):
    """The HF hub cache layout: snapshots/<rev>/... are links into ../blobs (named by content)."""
    from safetensors.torch import load_file

    plain = ckpt(run_copy, 2)
    hub = tmp_path / "hub"
    (hub / "blobs").mkdir(parents=True)
    snap = hub / "snapshots" / "rev0"
    for f in sorted(p for p in plain.rglob("*") if p.is_file()):
        rel = f.relative_to(plain)
        blob = hub / "blobs" / f"blob{len(list((hub / 'blobs').iterdir()))}"
        shutil.copy(f, blob)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    assert (snap / "model" / "__0_0.distcp").is_symlink()
    for src, dst in ((plain, tmp_path / "hf_plain"), (snap, tmp_path / "hf_links")):
        code, _, err = convert(src, dst)
        assert code == 0, err[-2000:]
    a, b = load_file(str(tmp_path / "hf_plain" / "model.safetensors")), load_file(str(tmp_path / "hf_links" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
