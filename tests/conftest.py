"""Test-session settings shared by every test module."""

import os

import torch

# Without CUDA the Triton kernels run in Triton's CPU interpreter. Triton reads the variable when a kernel is
# decorated, so it is set here, before any test module imports a kernel (the one place the suite sets it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist each worker is one process per core: one intra-op thread each keeps N workers from
# oversubscribing the cores (OpenMP threads that spin while another process holds the core slow tests tenfold).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
