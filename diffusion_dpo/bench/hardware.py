"""Dense peak throughput of common GPUs, for model FLOPs utilisation (MFU).

Values are the vendor's dense (no 2:4 sparsity) tensor-core peaks in TFLOP/s, per GPU, from the
NVIDIA data sheets (A100: 312 bf16/fp16, 156 tf32; H100 SXM and H200: 989 bf16/fp16, 495 tf32; ...).
``torch.cuda.get_device_name()`` is matched against the keys in order, so the more specific names
come first ("H100 PCIe" before "H100", "L40S" before "L4"). Unknown devices get no MFU unless
``--peak_tflops`` is given.
"""

from __future__ import annotations

#: (substring of the device name, {"bf16", "fp16", "tf32", "fp32"} dense TFLOP/s)
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("GB200", {"bf16": 2500.0, "fp16": 2500.0, "tf32": 1250.0, "fp32": 80.0}),
    ("B200", {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 80.0}),
    ("H200 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 67.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM (HBM3)
    ("H800", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("A800", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    ("L40", {"bf16": 181.0, "fp16": 181.0, "tf32": 90.5, "fp32": 90.5}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("RTX 6000 Ada", {"bf16": 364.2, "fp16": 364.2, "tf32": 182.1, "fp32": 91.1}),
    ("RTX 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
]


def compute_precision(mixed_precision: str, allow_tf32: bool) -> str:
    """The tensor-core precision a run's matmuls and convolutions use: bf16, fp16, tf32 or fp32.

    A run without mixed precision counts against the TF32 peak when ``allow_tf32`` (PyTorch also runs
    cuDNN convolutions in TF32 by default), else against plain fp32.
    """
    if mixed_precision in ("bf16", "fp16"):
        return mixed_precision
    return "tf32" if allow_tf32 else "fp32"


def peak_tflops(device_name: str, precision: str) -> tuple[float | None, str]:
    """``(dense peak TFLOP/s or None, where it comes from)`` for a CUDA device name."""
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            if precision in peaks:
                return peaks[precision], f"table: {key} dense {precision} peak"
            return None, f"table: {key} has no {precision} tensor cores"
    return None, f"{device_name!r} is not in the peak table; pass --peak_tflops"
