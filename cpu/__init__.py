"""The `cpu` backend: the reference. Every op is the canonical composite, so it meets the `exact` level."""
from dsv4.backends.expert_parallel import add_expert_parallel_kernels
from dsv4.backends.registry import Backend, Registry, add_canonical_kernels


def register(registry: Registry) -> None:
    backend = registry.add_backend(Backend(
        name="cpu", device_types=("cpu",), description="reference: canonical composites in plain torch"))
    add_expert_parallel_kernels(backend)
    add_canonical_kernels(backend)
