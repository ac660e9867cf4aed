"""Shared test setup: one torch thread per test process, so parallel work never oversubscribes."""

import torch

torch.set_num_threads(1)
