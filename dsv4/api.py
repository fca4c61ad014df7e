"""The Python API: open a model on a device at a determinism level, then generate.

    pipe = dsv4.load(preset="tiny", device="cpu", determinism="exact")
    text = pipe.complete("def fib(n):", max_new_tokens=32)
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from dsv4.backends.levels import Level
from dsv4.backends.registry import OpTable, Registry, default_registry
from dsv4.checkpoint import RANDOM_WEIGHTS_VERSION, load_checkpoint, write_checkpoint
from dsv4.config import ModelConfig, preset as preset_config
from dsv4.engine import Engine, Request
from dsv4.errors import DSV4Error
from dsv4.hub import resolve_model
from dsv4.model import Transformer
from dsv4.parallel import ExpertGroup
from dsv4.tokenizer import Tokenizer

DEFAULT_MODEL = Path(__file__).parent / "assets" / "default"   # trained by tools/train_default.py (docs/model-card.md)


def cache_dir() -> Path:
    return Path(os.environ.get("DSV4_CACHE", Path.home() / ".cache" / "dsv4"))


def preset_checkpoint(name: str, seed: int = 0) -> Path:
    """A randomly initialised checkpoint of preset `name` in the official layout, written once to the cache dir."""
    config = preset_config(name)
    target = cache_dir() / f"random-{name}-seed{seed}-v{RANDOM_WEIGHTS_VERSION}"
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        write_checkpoint(config, staging, seed=seed)
        try:
            staging.rename(target)
        except OSError:                 # another process finished first; theirs is identical
            shutil.rmtree(staging, ignore_errors=True)
    return target


def checkpoint_config(model: str | Path | None = None, preset: str | None = None) -> ModelConfig:
    """The config `load` would use, without reading or writing any weights."""
    if model is None and preset is not None:
        return preset_config(preset)
    return ModelConfig.from_file((resolve_model(model) if model is not None else DEFAULT_MODEL) / "config.json")


def resolve_ops(device: str, determinism: Level | str = Level.FAST, overrides: dict[str, str] | None = None,
                registry: Registry | None = None, backend: str | None = None) -> OpTable:
    """The op table for a device (or an explicit backend) at a level; a clear error when it cannot run here."""
    registry = registry or default_registry()
    chosen = registry.backend(backend) if backend else registry.backend_for_device(device.split(":")[0])
    return registry.resolve(chosen, determinism, overrides)


@dataclass
class Pipeline:
    model: Transformer
    tokenizer: Tokenizer
    device: torch.device

    @property
    def config(self):
        return self.model.config

    def engine(self, seed: int = 0, max_batch: int | None = None, prefill_chunk: int | None = None,
               graphs: bool | None = None) -> Engine:
        """An engine over this model; `graphs=False` keeps a GPU's decode steps eager (default: CUDA graphs)."""
        return Engine(self.model, self.device, seed=seed, max_batch=max_batch, prefill_chunk=prefill_chunk,
                      graphs=graphs)

    def complete(self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0) -> str:
        ids = [self.config.bos_token_id] + self.tokenizer.encode(prompt)
        result = self.engine(seed=seed).generate([Request(ids, max_new_tokens, temperature, top_p)])[0]
        tokens = [t for t in result.tokens if t != self.config.eos_token_id]
        return self.tokenizer.decode(tokens)


def load(model: str | Path | None = None, preset: str | None = None, device: str = "cpu",
         determinism: Level | str = Level.FAST, overrides: dict[str, str] | None = None,
         backend: str | None = None, registry: Registry | None = None, progress=None,
         group: ExpertGroup | None = None) -> Pipeline:
    """Open a checkpoint directory or a Hugging Face repo id in the local cache (`model`, see dsv4.hub) or a preset's
    random checkpoint; default: the embedded trained model.
    With an expert-parallel `group`, this process loads and runs only its share of the routed experts."""
    if model is not None and preset is not None:
        raise DSV4Error("give either a model directory or a preset, not both")
    ops = resolve_ops(device, determinism, overrides, registry, backend)
    path = (resolve_model(model) if model is not None else preset_checkpoint(preset) if preset is not None
            else DEFAULT_MODEL)
    torch_device = torch.device(device)
    shard = None if group is None else (group.rank, group.size)
    config, tensors, tokenizer = load_checkpoint(path, device=torch_device, progress=progress, expert_shard=shard)
    with torch.device("meta"):
        net = Transformer(config, ops, group)
    net.load_state_dict(tensors, strict=True, assign=True)
    return Pipeline(net.eval(), tokenizer, torch_device)
