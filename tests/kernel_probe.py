"""A few steps of the real training and scoring code; prints a digest of the weights, maps and scores.

Run in a new process by ``tests/integration/test_cpu_kernels.py`` under CPU instruction sets forced by
environment variables, as other machines would choose them: ``python -m tests.kernel_probe avx2|native``.
"""

from __future__ import annotations

import hashlib
import sys

import torch

from adps.model.memory_bank import build_bank
from adps.runtime import setup_torch
from adps.training.checkpoints import build_model, model_spec
from adps.training.phases import distill_loss_of
from tests.conftest import tiny_params


def main(kernels: str) -> str:
    params = tiny_params(runtime={"cpu_kernels": kernels, "threads": 2})
    setup_torch(params)
    model = build_model(model_spec(params))
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, 64, 64, generator=gen)
    masks = (torch.rand(4, 1, 64, 64, generator=gen) > 0.8).float()
    optimizer = torch.optim.Adam(model.student.parameters(), lr=1e-3)
    for _ in range(2):  # distillation steps: convolutions forward and backward, Adam
        optimizer.zero_grad()
        distill_loss_of(model, images, masks, params.loss)[0].backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():  # the memory bank (matrix products, coreset) and the whole scoring path
        build_bank(model.memory, model.teacher, [images[:2]], [images[2:]], 0.5, 64, 16, 0)
        out = model.segment(model.distill(images), (64, 64))
    digest = hashlib.sha256()
    for tensor in [*model.state_dict().values(), out.anomaly_map, out.image_score]:
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return f"{torch.backends.cpu.get_cpu_capability()} {digest.hexdigest()}"


if __name__ == "__main__":
    print(main(sys.argv[1]))
