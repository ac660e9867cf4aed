"""ONNX export of a (pruned) model, and its check against PyTorch with onnxruntime.

``torch.onnx.export`` with the TorchScript-based exporter (``dynamo=False``): it needs no package
beyond torch to write the file, where the newer exporter needs ``onnxscript``. The batch axis is
dynamic. ``onnx`` (to validate the file) and ``onnxruntime`` (to run it) come with the ``onnx``
extra: ``pip install "prunetune[onnx]"``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from prunetune.pruning.errors import UserError

INPUT_NAME, OUTPUT_NAME = "input", "logits"
OPSET = 17


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | Path) -> None:
    """Write ``model`` (in eval mode, on the CPU) as ONNX to ``path``, the batch axis dynamic."""
    model = model.cpu().eval()
    example = torch.zeros(1, *input_shape)
    with warnings.catch_warnings():  # the TorchScript-based exporter's deprecation notice
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    try:
        import onnx
    except ImportError:
        return
    onnx.checker.check_model(onnx.load(str(path)))


def onnx_session(path: str | Path):
    """An onnxruntime CPU session of the file; UserError when onnxruntime is not installed."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError("onnxruntime is not installed, so the ONNX export cannot be run; "
                        'pip install "prunetune[onnx]", or export without --check') from None
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def onnx_outputs(session, images: torch.Tensor) -> torch.Tensor:
    """The logits the ONNX model computes for a batch of ``images``."""
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.cpu().numpy()})
    return torch.from_numpy(logits)
