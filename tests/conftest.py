import os
from collections.abc import Generator, Iterator

import pytest
import torch

# The Triton interpreter runs Triton kernels on CPU tensors; it must be switched on before triton is imported,
# and only where there is no GPU (there, the same tests run the compiled kernels).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run by benchmarks/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# A kernel fault (illegal address, misaligned access, trap) leaves the process's CUDA context unusable, so every
# later GPU test in it would fail with the same error and hide which tests really fail. After a failure that left
# the context broken, the process stops: under pytest-xdist the worker is replaced by a fresh one (its next test
# is reported as crashed), without xdist the run ends with a message naming the cause.
_CUDA_FAULT_WORDS = (
    "CUDA error",
    "illegal memory access",
    "misaligned address",
    "unspecified launch failure",
    "device-side assert",
    "CUDA_ERROR",
)


_CUDA_FAULT = pytest.StashKey[str]()  # the node id of the failed test that may have broken the context


def _cuda_context_broken() -> bool:
    try:
        torch.cuda.synchronize()
        (torch.ones(1, device="cuda") + 1).item()
    except RuntimeError:
        return True
    return False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Generator[None, None, None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed and torch.cuda.is_available() and any(w in str(report.longrepr) for w in _CUDA_FAULT_WORDS):
        item.config.stash[_CUDA_FAULT] = item.nodeid


def pytest_runtest_setup(item: pytest.Item) -> None:
    faulted = item.config.stash.get(_CUDA_FAULT, None)
    if faulted is None:
        return
    if not _cuda_context_broken():  # the failure did not break the context: carry on
        del item.config.stash[_CUDA_FAULT]
        return
    message = f"the CUDA context is broken since {faulted} failed; later GPU tests in this process cannot run"
    if os.environ.get("PYTEST_XDIST_WORKER"):
        print(message, flush=True)
        os._exit(70)
    pytest.exit(message, returncode=70)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    # Batches of 2 give each op too little work to split, and on a busy 2-core machine OpenMP threads spinning
    # for a core made the model test files ~10x slower (280 s against 25 s for cifar + preact).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def emulated_pool_ops_on_cpu(monkeypatch):
    """The two max-pool ops emulated on CPU and the stem's pool allowed to take them there: the training step's new
    branches (MaxPoolOfRecipe) run in CI (tests/test_max_pool_kernels.py, test_bn_passes_bench.py). Yields the
    calls ("forward", "backward")."""
    from fused_resnet.training import max_pool_train
    from tests.cuda_on_host import emulated_cuda_ops_on_cpu, max_pool, max_pool_bn_act_backward

    labels = {"max_pool_nhwc": "forward", "max_pool_bn_act_backward": "backward"}
    yield from emulated_cuda_ops_on_cpu(
        monkeypatch,
        {"max_pool_nhwc": max_pool, "max_pool_bn_act_backward": max_pool_bn_act_backward},
        max_pool_train,
        "extension_pools",
        record=lambda name, args: labels[name],
    )
