"""Triton-Ascend kernels for ops that torch-npu has no operator for. Written in standard `triton.language`, so the
same source runs under Triton's CPU interpreter (TRITON_INTERPRET=1), which is how they are tested here; the npu
backend registers them only when `import triton` is Triton-Ascend with an NPU target. Not yet run on an NPU."""
