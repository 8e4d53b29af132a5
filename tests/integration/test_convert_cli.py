"""python -m megatron_tip.convert (hf-to-megatron, megatron-to-hf, check): happy path and bad input.

Bad input must fail with one clear message, a non-zero exit code, and no output left behind.
"""
import json
from pathlib import Path

import pytest

from tests.helpers.convert_cases import make_hf_model
from megatron_tip.convert.__main__ import main as convert_main

pytestmark = pytest.mark.timeout(600)


def convert(argv: list[str]) -> int:
    return convert_main(argv)


def check(argv: list[str]) -> int:
    return convert_main(["check", *argv])


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    # Small shards: exercises the index + multi-file path on read.
    return make_hf_model("qwen2", tmp_path_factory.mktemp("cli") / "hf", max_shard_size="40KB")


def _fails(capsys, argv, match: str, out: Path) -> None:
    before = set(out.parent.iterdir()) if out.parent.exists() else set()
    capsys.readouterr()  # drop earlier output
    assert convert(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and match in err, err
    after = set(out.parent.iterdir()) if out.parent.exists() else set()
    assert after == before, f"left behind: {after - before}"


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_unsupported_architecture(tmp_path, capsys, qwen2_dir):
    d = _copy(qwen2_dir, tmp_path / "moe")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"])
    (d / "config.json").write_text(json.dumps(cfg))
    _fails(capsys, ["hf-to-megatron", "--hf-dir", str(d), "--out", str(tmp_path / "o")],
           "unsupported model: model_type='qwen2_moe'", tmp_path / "o")


def test_missing_shard_file(tmp_path, capsys, qwen2_dir):
    d = _copy(qwen2_dir, tmp_path / "broken")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    _fails(capsys, ["hf-to-megatron", "--hf-dir", str(d), "--out", str(tmp_path / "o")],
           f"shard {shards[-1].name!r}", tmp_path / "o")


def test_config_weights_shape_mismatch(tmp_path, capsys, qwen2_dir):
    d = _copy(qwen2_dir, tmp_path / "mismatch")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    _fails(capsys, ["hf-to-megatron", "--hf-dir", str(d), "--out", str(tmp_path / "o")],
           "model.layers.0.mlp.gate_proj.weight: checkpoint has (96, 64), config implies (128, 64)",
           tmp_path / "o")


def test_bad_layout_and_missing_megatron_dir(tmp_path, capsys, qwen2_dir):
    _fails(capsys, ["hf-to-megatron", "--hf-dir", str(qwen2_dir), "--out", str(tmp_path / "o"),
                    "--tp", "3"], "not divisible by tensor_parallel size 3", tmp_path / "o")
    _fails(capsys, ["megatron-to-hf", "--megatron-dir", str(tmp_path / "nope"), "--out",
                    str(tmp_path / "o")], "is not a megatron checkpoint", tmp_path / "o")


def test_end_to_end_cli_and_existing_outputs(tmp_path, capsys, qwen2_dir):
    mg, out = tmp_path / "mg", tmp_path / "hf_out"
    assert convert(["hf-to-megatron", "--hf-dir", str(qwen2_dir), "--out", str(mg), "--tp", "2"]) == 0
    marker = (mg / "metadata.json").read_text()
    # An existing checkpoint is not overwritten without --overwrite, and stays intact.
    _fails(capsys, ["hf-to-megatron", "--hf-dir", str(qwen2_dir), "--out", str(mg)],
           "already holds a checkpoint; pass --overwrite", mg)
    assert (mg / "metadata.json").read_text() == marker

    assert check(["--hf-dir", str(qwen2_dir), "--megatron-dir", str(mg), "--tp", "1", "--seq", "16"]) == 0
    assert "max |dlogit|" in capsys.readouterr().out
    # A tolerance no conversion can meet must fail (exit 1).
    assert check(["--hf-dir", str(qwen2_dir), "--megatron-dir", str(mg), "--seq", "16",
                  "--tol", "-1"]) == 1

    assert convert(["megatron-to-hf", "--megatron-dir", str(mg), "--out", str(out),
                    "--max-shard-size", "60KB", "--no-progress"]) == 0
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("*.safetensors"))) > 1
    _fails(capsys, ["megatron-to-hf", "--megatron-dir", str(mg), "--out", str(out)],
           "already holds a checkpoint", out)
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(qwen2_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)

    # --overwrite replaces the checkpoint (here: at another layout) and leaves no temp dirs.
    assert convert(["hf-to-megatron", "--hf-dir", str(qwen2_dir), "--out", str(mg), "--pp", "2",
                    "--overwrite"]) == 0
    assert json.loads((mg / "metadata.json").read_text())["pp"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_out", "mg"]
