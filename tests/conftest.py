"""Test configuration: on machines without CUDA, Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before `triton.jit` decorates anything, i.e. before
`kernels` is imported, so it is set here at collection start.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `make test` runs one pytest-xdist worker per core: each gets its share of the cores for torch's
# intra-op threads (oversubscribed threads make the small ops of these tests several times slower).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def reference_ops(device):
    """Run the ops through refrag_kernels.reference on CPU (the pipeline is under test, not the kernels:
    the interpreter is too slow for whole models). CUDA keeps the Triton kernels."""
    import refrag_kernels

    if device.type == "cpu":
        with refrag_kernels.use_backend("reference"):
            yield
    else:
        yield


@pytest.fixture
def device():
    """The device kernels are tested on: CUDA when present, else CPU (Triton interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
