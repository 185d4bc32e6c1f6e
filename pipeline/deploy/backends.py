"""Inference backends for a deploy graph `f(images [N,3,H,W] in [0,1], orig_target_sizes [N,2]) -> (labels, boxes, scores)`.

Every backend separates `prepare` (move/convert inputs once, untimed) from `infer` (the call the
latency harness times) and `detections` (outputs as CPU torch tensors, for parity checks).
`label` names backend, precision and device, and is printed next to every number.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

OUTPUT_NAMES = ("labels", "boxes", "scores")


class TorchBackend:
    """torch eager (or `torch.compile`d) module; `precision` "fp16"/"bf16" runs it under autocast."""

    name = "torch"

    def __init__(self, module: nn.Module, device: str = "cpu", precision: str = "fp32",
                 compile: bool = False):
        if precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
        if precision == "fp16" and device == "cpu":
            raise ValueError("fp16 autocast is a GPU precision; use bf16 on CPU")
        self.device, self.precision = device, precision
        self.module = module.eval().to(device)
        self.fn = torch.compile(self.module) if compile else self.module
        if compile:
            self.name = "torch.compile"

    @property
    def label(self) -> str:
        return f"{self.name} {self.precision} {self.device}"

    def _autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(self.device.split(":")[0], dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[self.precision])

    def prepare(self, images: torch.Tensor, sizes: torch.Tensor):
        return images.to(self.device), sizes.to(self.device)

    @torch.inference_mode()
    def infer(self, images, sizes):
        with self._autocast():
            return self.fn(images, sizes)

    def detections(self, images, sizes):
        return _to_cpu(self.infer(*self.prepare(images, sizes)))


class OnnxRuntimeBackend:
    """onnxruntime session; CUDA execution provider when asked and available, else CPU."""

    name = "onnxruntime"
    precision = "fp32"

    def __init__(self, onnx_path: str | Path, threads: int | None = 2, device: str = "cpu"):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError("onnxruntime has no CUDAExecutionProvider here: "
                                   "pip install onnxruntime-gpu, or use device='cpu'")
            providers.insert(0, "CUDAExecutionProvider")
        self.device, self.threads = device, threads
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._int_inputs = {i.name for i in self.session.get_inputs() if "int" in i.type}

    @property
    def label(self) -> str:
        t = f", {self.threads} thread{'s' if self.threads > 1 else ''}" if self.threads and self.device == "cpu" else ""
        return f"{self.name} {self.precision} {self.device}{t}"

    def prepare(self, images: torch.Tensor, sizes: torch.Tensor):
        feeds = {}
        for name, t in zip(self.input_names, (images, sizes)):
            a = t.detach().cpu().numpy()
            feeds[name] = a.astype(np.int64 if name in self._int_inputs else np.float32)
        return (feeds,)

    def infer(self, feeds):
        return self.session.run(self.output_names, feeds)

    def detections(self, images, sizes):
        out = dict(zip(self.output_names, self.infer(*self.prepare(images, sizes))))
        return tuple(torch.from_numpy(out[n]) for n in OUTPUT_NAMES)


class TensorRTBackend:
    """A serialised TensorRT engine (see pipeline/deploy/trt_engine.py), on CUDA."""

    name = "tensorrt"
    device = "cuda"

    def __init__(self, engine_path: str | Path, precision: str):
        from pipeline.deploy.trt_engine import TRTRunner
        self.runner = TRTRunner(engine_path)
        self.precision = precision

    @property
    def label(self) -> str:
        return f"{self.name} {self.precision} {self.device}"

    def prepare(self, images, sizes):
        return tuple(t.to(device="cuda", dtype=self.runner.dtype(n)).contiguous()
                     for n, t in zip(self.runner.input_names, (images, sizes)))

    def infer(self, *inputs):
        return self.runner(*inputs)

    def detections(self, images, sizes):
        out = dict(zip(self.runner.output_names, self.infer(*self.prepare(images, sizes))))
        torch.cuda.synchronize()
        return tuple(out[n].detach().cpu().clone() for n in OUTPUT_NAMES)


def _to_cpu(outputs) -> tuple[torch.Tensor, ...]:
    if isinstance(outputs, dict):
        outputs = tuple(outputs[n] for n in OUTPUT_NAMES)
    return tuple(o.detach().float().cpu() if o.is_floating_point() else o.detach().cpu() for o in outputs)
