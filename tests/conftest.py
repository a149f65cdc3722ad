"""Test-session settings shared by every test module."""

import os

import torch

# Under pytest-xdist each worker is one process per core: one intra-op thread each keeps N workers from
# oversubscribing the cores (OpenMP threads that spin while another process holds the core slow tests tenfold).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
