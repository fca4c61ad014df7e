"""The Python API: open a model on a device at a determinism level, then generate.

    pipe = dsv4.load(preset="tiny", device="cpu", determinism="exact")
    text = pipe.complete("def fib(n):", max_new_tokens=32)
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dsv4 import validate
from dsv4.backends.levels import Level
from dsv4.backends.registry import OpTable, Registry, default_registry
from dsv4.checkpoint import (CONFIG_FILE, RANDOM_WEIGHTS_VERSION, TOKENIZER_FILE, checkpoint_files, load_checkpoint,
                             write_checkpoint)
from dsv4.config import ModelConfig, preset as preset_config
from dsv4.engine import Engine, Request
from dsv4.errors import DSV4Error
from dsv4.hub import resolve_model
from dsv4.manifest import MANIFEST_FILE, write_manifest
from dsv4.model import Transformer
from dsv4.parallel import ExpertGroup
from dsv4.tokenizer import Tokenizer, byte_level_tokenizer_json

DEFAULT_MODEL = Path(__file__).parent / "assets" / "default"   # trained by tools/train_default.py (docs/model-card.md)


def cache_dir() -> Path:
    return Path(os.environ.get("DSV4_CACHE", Path.home() / ".cache" / "dsv4"))


def preset_checkpoint(name: str, seed: int = 0) -> Path:
    """A randomly initialised checkpoint of preset `name` in the official layout, written once to the cache dir.

    It is written to a staging directory renamed into place when complete, so an interrupted first write (an
    exception, Ctrl-C) leaves nothing behind."""
    config = preset_config(name)
    target = cache_dir() / f"random-{name}-seed{seed}-v{RANDOM_WEIGHTS_VERSION}"
    if target.is_dir() and not (target / MANIFEST_FILE).exists():   # written by a dsv4 before manifests
        write_manifest(target, checkpoint_files(target))
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        try:
            write_checkpoint(config, staging, seed=seed)
            try:
                staging.rename(target)
            except OSError:
                if not target.is_dir():        # else another process finished first; theirs is identical
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _checkpoint_dir(model: str | Path | None, preset: str | None) -> Path | None:
    """The checkpoint directory `model` names (a path, or a Hugging Face repo id in the local cache: dsv4.hub;
    default: the embedded model), or None for a preset, which must come alone and be a known one."""
    if preset is not None:
        if model is not None:
            raise DSV4Error("give either a model directory or a preset, not both")
        preset_config(preset)
        return None
    return DEFAULT_MODEL if model is None else validate.directory(resolve_model(model), "model directory")


def checkpoint_path(model: str | Path | None = None, preset: str | None = None) -> Path:
    """The checkpoint directory `load` reads (a preset's random checkpoint is written first if needed)."""
    path = _checkpoint_dir(model, preset)
    return preset_checkpoint(preset) if path is None else path


def checkpoint_config(model: str | Path | None = None, preset: str | None = None) -> ModelConfig:
    """The config `load` would use, without reading or writing any weights."""
    path = _checkpoint_dir(model, preset)
    return preset_config(preset) if path is None else ModelConfig.from_file(path / CONFIG_FILE)


def checkpoint_tokenizer(model: str | Path | None = None, preset: str | None = None) -> Tokenizer:
    """The tokenizer `load` would use, without reading or writing any weights."""
    path = _checkpoint_dir(model, preset)
    if path is not None:
        return Tokenizer.from_file(path / TOKENIZER_FILE)
    config = preset_config(preset)
    return Tokenizer.from_str(byte_level_tokenizer_json(config.vocab_size, config.bos_token_id, config.eos_token_id))


def prompt_tokens(prompt: str | Sequence[int], tokenizer: Tokenizer, config: ModelConfig) -> list[int]:
    """What the model reads for a prompt: BOS, then the prompt's tokens. A prompt is text (valid UTF-8) or the token
    ids themselves, as `tokenizer.encode` would give them (each checked against the vocabulary)."""
    if isinstance(prompt, str):
        return [config.bos_token_id] + tokenizer.encode(validate.text(prompt))
    return [config.bos_token_id] + validate.token_ids(prompt, config.vocab_size)


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
               graphs: bool | None = None, speculate: int = 0) -> Engine:
        """An engine over this model; `graphs=False` keeps a GPU's decode steps eager (default: CUDA graphs);
        `speculate=N` drafts up to N tokens a step with the MTP block (dsv4.speculative)."""
        return Engine(self.model, self.device, seed=seed, max_batch=max_batch, prefill_chunk=prefill_chunk,
                      graphs=graphs, speculate=speculate)

    def complete(self, prompt: str | Sequence[int], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, speculate: int = 0) -> str:
        """The completion of `prompt`: text, or a list of token ids (see `prompt_tokens`)."""
        ids = prompt_tokens(prompt, self.tokenizer, self.config)
        engine = self.engine(seed=seed, speculate=speculate)
        result = engine.generate([Request(ids, max_new_tokens, temperature, top_p)])[0]
        tokens = [t for t in result.tokens if t != self.config.eos_token_id]
        return self.tokenizer.decode(tokens)


def load(model: str | Path | None = None, preset: str | None = None, device: str = "cpu",
         determinism: Level | str = Level.FAST, overrides: dict[str, str] | None = None,
         backend: str | None = None, registry: Registry | None = None, progress=None,
         group: ExpertGroup | None = None, verify: bool | None = None,
         notice: Callable[[str], None] = warnings.warn) -> Pipeline:
    """Open a checkpoint directory or a Hugging Face repo id in the local cache (`model`, see dsv4.hub) or a preset's
    random checkpoint; default: the embedded trained model.
    With an expert-parallel `group`, this process loads and runs only its share of the routed experts.

    Every argument is checked before anything is read. The files are checked against the checkpoint's checksum
    manifest: `verify` None hashes them up to dsv4.manifest.HASH_ON_LOAD_LIMIT bytes (a larger checkpoint gets
    its sizes checked and a `notice`), True always, False never."""
    path = _checkpoint_dir(model, preset)
    ops = resolve_ops(validate.device(device), determinism, overrides, registry, backend)
    torch_device = torch.device(device)
    validate.device_present(torch_device)
    if path is None:
        path = preset_checkpoint(preset)
    shard = None if group is None else (group.rank, group.size)
    config, tensors, tokenizer = load_checkpoint(path, device=torch_device, progress=progress, expert_shard=shard,
                                                 verify=verify, notice=notice)
    with torch.device("meta"):
        net = Transformer(config, ops, group)
    net.load_state_dict(tensors, strict=True, assign=True)
    return Pipeline(net.eval(), tokenizer, torch_device)
