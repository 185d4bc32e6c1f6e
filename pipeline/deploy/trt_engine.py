"""TensorRT 10: build an engine from ONNX (with an on-disk cache) and run it on torch CUDA tensors.

Replaces the official `trtexec --onnx=model.onnx --saveEngine=model.engine --fp16` step and the
`TRTInference` class of `tools/benchmark/trt_benchmark.py`, with a dynamic-batch optimisation
profile and `execute_async_v3` (the official code uses the removed `execute_v2` bindings list).
Known FP16 pitfalls of D-FINE/DEIM engines (D-FINE #44, #98; DEIMv2 #60) have two switches here:
`tf32=False` (the `--noTF32` fix) and `fp32_layers` (pin layers whose name contains a pattern to
fp32, e.g. normalisation or the first decoder attention).

`tensorrt` is optional: `tensorrt_status()` says what is missing instead of raising on import.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

INSTALL_HINT = ("install TensorRT 10 from NVIDIA's package index "
                "(pip install tensorrt --extra-index-url https://pypi.nvidia.com) on a machine with a CUDA GPU")


def tensorrt_status() -> tuple[bool, str]:
    """(usable, reason): whether a TensorRT engine can be built and run here, and if not, why."""
    try:
        import tensorrt as trt
    except ImportError as e:
        return False, f"tensorrt is not installed ({e.msg}); {INSTALL_HINT}"
    except Exception as e:  # the PyPI stub raises at import when the real libraries are absent
        return False, f"tensorrt failed to import ({type(e).__name__}: {e}); {INSTALL_HINT}"
    if not torch.cuda.is_available():
        return False, f"tensorrt {trt.__version__} is installed but no CUDA GPU is visible to torch"
    major = int(trt.__version__.split(".")[0])
    if major < 10:
        return False, f"tensorrt {trt.__version__} is too old: the engine code uses the TensorRT 10 API"
    return True, f"tensorrt {trt.__version__} on {torch.cuda.get_device_name()}"


@dataclass
class EngineSpec:
    """Everything that changes the engine; its hash is the cache key."""

    min_shapes: dict[str, tuple[int, ...]]
    opt_shapes: dict[str, tuple[int, ...]]
    max_shapes: dict[str, tuple[int, ...]]
    fp16: bool = True
    tf32: bool = True
    fp32_layers: tuple[str, ...] = ()
    workspace_gib: float = 4.0

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "fp32"


def image_profile(image_size: int = 640, min_batch: int = 1, opt_batch: int = 1, max_batch: int = 32,
                  **kw) -> EngineSpec:
    """Dynamic-batch profile for the deploy graph's inputs `images` [N,3,H,W] and `orig_target_sizes` [N,2]."""
    def shapes(n):
        return {"images": (n, 3, image_size, image_size), "orig_target_sizes": (n, 2)}
    return EngineSpec(shapes(min_batch), shapes(opt_batch), shapes(max_batch), **kw)


def cache_key(onnx_bytes: bytes, spec: EngineSpec, trt_version: str, gpu_name: str) -> str:
    """sha256 over the ONNX bytes, the profile shapes, the precision switches, TensorRT version and GPU.

    An engine is only valid for the TensorRT version and GPU model that built it, so both are keyed.
    """
    h = hashlib.sha256(onnx_bytes)
    meta = {"spec": asdict(spec), "trt": trt_version, "gpu": gpu_name}
    h.update(json.dumps(meta, sort_keys=True, default=list).encode())
    return h.hexdigest()


def build_engine(onnx_path: str | Path, spec: EngineSpec, cache_dir: str | Path | None = None,
                 verbose: bool = False) -> Path:
    """Build (or reuse from `cache_dir`) a serialised engine for `onnx_path`; returns its path.

    The cache file name carries the model stem, precision and the first 16 hex digits of
    `cache_key`; a JSON sidecar records the full key and spec.
    """
    import tensorrt as trt

    onnx_path = Path(onnx_path)
    data = onnx_path.read_bytes()
    gpu = torch.cuda.get_device_name()
    key = cache_key(data, spec, trt.__version__, gpu)
    cache_dir = Path(cache_dir) if cache_dir is not None else onnx_path.parent / "engines"
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / f"{onnx_path.stem}-{spec.precision}-{key[:16]}.engine"
    if out.is_file():
        return out

    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(data, str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n{errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(spec.workspace_gib * (1 << 30)))
    if spec.fp16:  # weakly-typed fp16 (trtexec --fp16): TensorRT picks fp16 kernels where faster
        config.set_flag(trt.BuilderFlag.FP16)
    if not spec.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    if spec.fp32_layers:
        _pin_fp32(trt, network, spec.fp32_layers)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)

    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        if name not in spec.opt_shapes:
            raise ValueError(f"ONNX input {name!r} of {onnx_path} has no shape in the engine profile "
                             f"(profile names: {sorted(spec.opt_shapes)})")
        profile.set_shape(name, spec.min_shapes[name], spec.opt_shapes[name], spec.max_shapes[name])
    config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (rerun with verbose=True)")
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(out)  # atomic: a crashed build never leaves a half-written cache entry
    out.with_suffix(".json").write_text(json.dumps(
        {"onnx": str(onnx_path), "key": key, "tensorrt": trt.__version__, "gpu": gpu,
         "spec": asdict(spec)}, indent=2, default=list))
    return out


def _pin_fp32(trt, network, patterns) -> int:
    """Force layers whose name contains any pattern to compute and output in fp32."""
    n = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if any(p in layer.name for p in patterns):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                if layer.get_output(j).dtype in (trt.float32, trt.float16):  # not TopK indices etc.
                    layer.set_output_type(j, trt.float32)
            n += 1
    if n == 0:
        raise ValueError(f"no TensorRT layer name contains any of {list(patterns)}")
    return n


def _torch_dtype(trt, dt) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int64: torch.int64, trt.int8: torch.int8, trt.bool: torch.bool,
             trt.bfloat16: torch.bfloat16}
    return table[dt]


@dataclass
class TRTRunner:
    """Runs a serialised engine on torch CUDA tensors: `runner(images, orig_target_sizes)` -> outputs.

    Inputs are bound by address (`set_tensor_address`) without copies; outputs are preallocated
    torch tensors, reallocated only when the batch shape changes; `execute_async_v3` runs on the
    current torch CUDA stream, so CUDA-event timing brackets exactly the engine call.
    """

    engine_path: str | Path
    verbose: bool = False
    input_names: list[str] = field(init=False)
    output_names: list[str] = field(init=False)

    def __post_init__(self):
        import tensorrt as trt
        self._trt = trt
        logger = trt.Logger(trt.Logger.VERBOSE if self.verbose else trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(logger, "")
        self._runtime = trt.Runtime(logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(self.engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"could not deserialise {self.engine_path}: it was built by another "
                               f"TensorRT version or GPU; delete it and rebuild")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        self._outputs: dict[str, torch.Tensor] = {}
        self._shapes: dict[str, tuple] = {}

    def dtype(self, name: str) -> torch.dtype:
        return _torch_dtype(self._trt, self.engine.get_tensor_dtype(name))

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"engine takes {self.input_names}, got {len(inputs)} tensors")
        for name, t in zip(self.input_names, inputs):
            t = t.to(device="cuda", dtype=self.dtype(name)).contiguous()
            if self._shapes.get(name) != tuple(t.shape):
                self.context.set_input_shape(name, tuple(t.shape))
                self._shapes[name] = tuple(t.shape)
                self._outputs.clear()
            self.context.set_tensor_address(name, t.data_ptr())
        if not self._outputs:
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                self._outputs[name] = torch.empty(shape, dtype=self.dtype(name), device="cuda")
                self.context.set_tensor_address(name, self._outputs[name].data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.engine_path} failed")
        return tuple(self._outputs[n] for n in self.output_names)
