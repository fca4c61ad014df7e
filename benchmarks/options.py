"""What the `dsv4 bench` commands take and give: their shared options, size and level lists, the GPU they need and
the JSON file they write. The commands themselves are in dsv4/cli.py; the benchmarks in this package."""
from __future__ import annotations

import json

import click

from dsv4.backends.levels import Level
from dsv4.errors import DSV4Error

# The options `dsv4 bench ops` and `dsv4 bench layer` share, in --help order (then dsv4.cli's --json and --quiet).
SHARED = (
    click.option("--device", default="cuda", show_default=True),
    click.option("--preset", "preset_name", default="v4-flash", show_default=True,
                 help="Take every dimension from this preset (v4-flash, v4-pro, ...)."),
    click.option("--batches", default="1,16,64,256", show_default=True, help="Decode batch sizes."),
    click.option("--prefills", default="4096,65536", show_default=True, help="Prefill lengths ('' for none)."),
    click.option("--context", type=click.IntRange(min=1), default=8192, show_default=True,
                 help="Tokens each decoding sequence already holds."),
    click.option("--levels", default="fast,batch-invariant,exact", show_default=True),
)


def say(quiet: bool):
    """A benchmark's progress lines on stderr ("bench: ..."), or nothing with --quiet."""
    return (lambda line: None) if quiet else (lambda line: click.echo(f"bench: {line}", err=True))


def parse_sizes(text: str, option: str) -> tuple[int, ...]:
    """A comma-separated list of positive integers (empty allowed), or a DSV4Error naming the option."""
    try:
        sizes = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        sizes = (0,)
    if any(n < 1 for n in sizes):
        raise DSV4Error(f"{option} must be comma-separated positive integers, got {text!r}")
    return sizes


def parse_levels(text: str) -> tuple[Level, ...]:
    return tuple(Level.parse(t) for t in text.split(",") if t.strip())


def require_gpu(device: str) -> None:
    """The GPU benchmarks time with CUDA events: a clear error anywhere else."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise DSV4Error(f"dsv4 bench times kernels with CUDA events: it needs --device cuda on a machine with an "
                        f"NVIDIA GPU (got {device!r}, GPU visible: {torch.cuda.is_available()})")


def write_json(result: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def write_text(text: str, path: str) -> None:
    with open(path, "w") as f:
        f.write(text)
