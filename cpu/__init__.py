"""The `cpu` backend: the reference. Every op's canonical composite meets `exact` (and serves every level but
`fast`); at `fast` the plain-torch kernels of `cpu.fast` (BLAS GEMMs on weights dequantised once) run instead."""
from dsv4.backends.cpu.fast import add_fast_kernels
from dsv4.backends.expert_parallel import add_expert_parallel_kernels
from dsv4.backends.registry import Backend, Registry, add_canonical_kernels


def register(registry: Registry) -> None:
    backend = registry.add_backend(Backend(
        name="cpu", device_types=("cpu",), description="reference: canonical composites in plain torch; "
                                                       "plain-torch BLAS kernels at fast"))
    add_fast_kernels(backend)
    add_expert_parallel_kernels(backend)
    add_canonical_kernels(backend)
