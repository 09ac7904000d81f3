import os
from collections.abc import Iterator

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
