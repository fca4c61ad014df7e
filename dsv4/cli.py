"""The `dsv4` command line. Errors are one line on stderr and a non-zero exit, never a traceback."""
from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import click

from dsv4 import validate
from dsv4.backends.contracts import CONTRACTS
from dsv4.backends.levels import LEVEL_NAMES
from dsv4.benchmarks import options as bench
from dsv4.errors import DSV4Error
from dsv4.manifest import HASH_ON_LOAD_LIMIT, MANIFEST_FILE
from dsv4.progress import Progress

if TYPE_CHECKING:
    from dsv4.parallel import ExpertGroup

# The start of a Python function, for the embedded default model (docs/model-card.md): with the docstring, greedy
# decoding writes the body; after a bare `def ...:` line this small model greedily repeats indentation.
DEFAULT_PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'


def one_line(message: str) -> str:
    """An error is one line, whatever text it quotes."""
    return " ".join(message.split("\n"))


def friendly_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
            code = 0
        except DSV4Error as e:
            click.echo(f"error: {one_line(str(e))}", err=True)
            code = 2
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            code = 130
        if os.environ.get("WORLD_SIZE", "1") != "1":
            # A launched rank ends here, skipping interpreter teardown: gloo's threads can abort the process while
            # C++ objects are destroyed at exit ("terminate called without an active exception") after a clean run.
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
        if code:
            sys.exit(code)
        return result
    return wrapper


class OneLineErrors(click.Group):
    """Click's own usage errors (a bad option value, an unknown option) look like every other error: one line
    `error: ...` on stderr and exit code 2, instead of click's usage block."""

    def main(self, *args, **kwargs):
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            click.echo(f"error: {one_line(e.format_message())}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)


class FiniteFloat(click.FloatRange):
    """click's FloatRange, which lets NaN and infinity through, without them."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class Checked(click.ParamType):
    """A click type from a dsv4.validate function: the command line and the Python API refuse the same inputs with
    the same words, before any work starts."""

    def __init__(self, name: str, check: Callable[[str], Any]):
        self.name, self.check = name, check

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self.check(value)
        except DSV4Error as e:
            self.fail(str(e), param, ctx)


DEVICE = Checked("device", validate.device)
OUTPUT_FILE = Checked("file", lambda path: str(validate.output_file(path)))
PROMPT_TEXT = Checked("text", validate.text)
TOKEN_IDS = Checked("ids", validate.parse_token_ids)
INPUT_FILE = click.Path(exists=True, dir_okay=False, readable=True)
INPUT_DIR = click.Path(exists=True, file_okay=False, readable=True)
VERIFY = click.option("--verify/--no-verify", default=None,
                      help=f"Hash every checkpoint file against its {MANIFEST_FILE} on load, or skip the manifest. "
                           f"Default: hash checkpoints up to {HASH_ON_LOAD_LIMIT >> 30} GiB, check only the file "
                           f"sizes of larger ones.")


def say_note(message: str) -> None:
    click.echo(f"note: {one_line(message)}", err=True)


@click.group(cls=OneLineErrors)
@click.version_option(package_name="dsv4")
def main() -> None:
    """DeepSeek-V4 inference on any accelerator, with determinism you can prove."""


def options(*decorators: Callable) -> Callable:
    """One decorator for a group of click options shared by several commands, listed in --help in the order given."""
    def apply(fn):
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn
    return apply


backend_options = options(
    click.option("--device", type=DEVICE, default="cpu", show_default=True,
                 help="cpu, cuda or npu (optionally :index)."),
    click.option("--determinism", type=click.Choice(LEVEL_NAMES), default="fast", show_default=True,
                 help="Determinism level every kernel must declare."),
    click.option("--ops-config", type=INPUT_FILE, default=None,
                 help="TOML file with an [ops] table of per-op overrides."),
    click.option("--ops", "op_overrides", default=None,
                 help="Per-op kernel overrides: op=backend[:kernel],... (also DSV4_OP_OVERRIDES)."),
)
parallel_options = options(
    click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
                 help="Run as this many local processes, the routed experts split among them (expert "
                 "parallelism). Launching under torchrun works too."),
    click.option("--dist-timeout", type=FiniteFloat(min=0, min_open=True), default=600.0,
                 show_default=True, help="Seconds a process waits for the others (rendezvous and every "
                 "collective) before it gives up with an error."),
)
quiet_option = click.option("--quiet", is_flag=True, help="No progress on stderr.")
SPECULATE = click.option("--speculate", type=click.IntRange(min=0), default=0, show_default=True,
                         help="Draft up to N tokens a step with the MTP block and verify them in one step: the same "
                              "tokens at batch-invariant and exact, faster (docs/speculative.md).")
threads_option = click.option(
    "--threads", type=click.IntRange(min=1), default=None,
    help="Threads of torch's CPU kernels. Default on CPU: 1 (the default model's ops are too small to gain from "
         "splitting; docs/cpu.md); elsewhere torch's own choice.")


def set_threads(threads: int | None, device: str) -> None:
    if threads or device.split(":")[0] == "cpu":
        import torch

        torch.set_num_threads(threads or 1)
model_option = click.option(
    "--model", type=click.Path(), default=None,
    help="Checkpoint directory (official safetensors layout), or a Hugging Face repo id (org/name[@revision]) "
         "already in the local Hugging Face cache; nothing is downloaded.")


def ranks_launched(nproc: int, n_experts: Callable[[], int]) -> bool:
    """Start `nproc` ranks of this command line when asked to and not already one of them; True once they all
    succeeded (the caller is done). `n_experts()` lets a bad split fail before any process starts."""
    from dsv4.launch import launch
    from dsv4.parallel import expert_range, launch_environment

    launched = launch_environment()
    if launched is not None:
        if nproc > 1 and nproc != launched[1]:
            raise DSV4Error(f"--nproc {nproc} does not match WORLD_SIZE={launched[1]} set by the launcher")
        return False
    if nproc == 1:
        return False
    expert_range(n_experts(), 0, nproc)
    launch(nproc, sys.argv[1:])
    return True


@contextlib.contextmanager
def rank_zero_speaks(group: ExpertGroup | None) -> Iterator[None]:
    """Only rank 0 prints and streams; other ranks run silently (their errors still reach stderr)."""
    if group is None or group.rank == 0:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        yield


@main.command()
@model_option
@click.option("--preset", default=None, help="Run a preset's randomly initialised checkpoint (tiny, small, ...).")
@backend_options
@click.option("--prompt", "prompts", type=PROMPT_TEXT, multiple=True,
              help=f"Prompt text; repeat to decode a batch. [default: {DEFAULT_PROMPT!r}]")
@click.option(validate.PROMPT_IDS_OPTION, "prompt_ids", type=TOKEN_IDS, multiple=True,
              help="A prompt as comma-separated token ids (what the tokenizer gives for its text, BOS added before "
                   "them), instead of --prompt; repeat to decode a batch.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=48, show_default=True)
@click.option("--temperature", type=FiniteFloat(min=0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=FiniteFloat(0, 1), default=1.0, show_default=True)
@click.option("--seed", type=click.IntRange(0, validate.SEED_LIMIT - 1), default=0, show_default=True)
@click.option("--prefill-chunk", type=click.IntRange(min=1), default=None,
              help="Prefill the prompt in chunks of this many tokens.")
@click.option("--logits-out", type=OUTPUT_FILE, default=None,
              help="Save every generated token's logits (fp32) to this safetensors file, one tensor per prompt.")
@click.option("--eager", is_flag=True, help="On a GPU, run decode steps eagerly instead of replaying CUDA graphs "
              "(same bits).")
@SPECULATE
@threads_option
@VERIFY
@quiet_option
@parallel_options
@friendly_errors
def run(model, preset, device, determinism, ops_config, op_overrides, prompts, prompt_ids, max_new_tokens,
        temperature, top_p, seed, prefill_chunk, logits_out, eager, speculate, threads, verify, quiet, nproc,
        dist_timeout):
    """Generate text. With no arguments: the embedded default model on CPU, nothing downloaded.

    One prompt streams its completion; several prompts decode together as one batch and print in order."""
    from dsv4.api import checkpoint_config, checkpoint_tokenizer, load, prompt_tokens
    from dsv4.backends.registry import collect_overrides
    from dsv4.engine import Request, prompt_key
    from dsv4.parallel import join
    from dsv4.tokenizer import IncrementalDecoder

    if prompts and prompt_ids:
        raise DSV4Error(f"give prompts as --prompt text or as {validate.PROMPT_IDS_OPTION}, not both")
    given = prompts or prompt_ids or (DEFAULT_PROMPT,)
    # Every request is checked against the model's config and tokenizer before any weights are read.
    config, tokenizer = checkpoint_config(model, preset), checkpoint_tokenizer(model, preset)
    requests = []
    for prompt in given:
        ids = prompt_tokens(prompt, tokenizer, config)
        # A request's sampling key is its prompt's content: the same tokens wherever it sits in a batch.
        requests.append(Request(ids, max_new_tokens, temperature, top_p, request_id=prompt_key(ids)))
        validate.request(config, requests[-1])
    validate.speculate(config, speculate, nproc > 1)
    texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in given]
    overrides = collect_overrides(op_overrides, ops_config)
    if ranks_launched(nproc, lambda: config.n_routed_experts):
        return
    set_threads(threads, device)
    settings = {"model": model, "preset": preset, "device": device, "determinism": determinism, "ops": overrides,
                "prompts": list(given), "max_new_tokens": max_new_tokens, "temperature": temperature,
                "top_p": top_p, "seed": seed, "prefill_chunk": prefill_chunk, "speculate": speculate}
    with join(device.split(":")[0], settings, dist_timeout) as group, rank_zero_speaks(group), \
            Progress(enabled=not quiet) as progress:
        device = group.place(device) if group else device
        pipe = load(model, preset, device, determinism, overrides, progress=progress.loading, group=group,
                    verify=verify, notice=say_note)
        engine = pipe.engine(seed=seed, max_batch=len(requests), prefill_chunk=prefill_chunk, graphs=not eager,
                             speculate=speculate)
        decoder = IncrementalDecoder(pipe.tokenizer)
        streaming = len(requests) == 1
        if streaming:
            progress.hidden.add("decode")     # the streamed text is the progress; a bar or lines would break it up
        started = []

        def stream(_: int, token: int) -> None:
            if not started:                   # the prompt, once the prefill (and its bar) is done
                started.append(True)
                click.echo(texts[0], nl=False)
            if token != config.eos_token_id:
                click.echo(decoder.push(token), nl=False)

        results = engine.generate(requests, on_token=stream if streaming else None, record_logits=bool(logits_out),
                                  progress=progress)
        progress.close()
        if streaming:
            click.echo(decoder.finish())
        else:
            for text, result in zip(texts, results):
                click.echo(text + pipe.tokenizer.decode([t for t in result.tokens if t != config.eos_token_id]))
        if logits_out and not (group and group.rank):
            import torch
            from safetensors.torch import save_file

            save_file({f"prompt{i}": torch.stack(r.logits) for i, r in enumerate(results)}, logits_out)
        t = engine.timings
        ranks = f", {group.size} expert-parallel ranks" if group else ""
        drafts = engine.speculator.stats if engine.speculator else None
        speculated = (f", {100 * drafts.acceptance_rate:.0f}% of drafts accepted, {drafts.tokens_per_step:.2f} "
                      f"tokens per verification step" if drafts else "")
        click.echo(f"[{pipe.model.ops.backend}/{device}, {determinism}{ranks}] prefill {t.prefill_tokens} tokens at "
                   f"{t.prefill_tps:.1f} tok/s, decode {t.decode_tokens} tokens at {t.decode_tps:.1f} tok/s"
                   f"{speculated}", err=True)


@main.command()
@click.option("--level", type=click.Choice(LEVEL_NAMES), default=None,
              help="Show which kernel each op resolves to at this level.")
@friendly_errors
def backends(level):
    """List backends, their devices and availability, and a per-op table of kernels and levels."""
    from dsv4.backends.registry import default_registry

    registry = default_registry()
    names = sorted(registry.backends)
    for name in names:
        b = registry.backends[name]
        reason = b.unavailable_reason()
        status = "available" if reason is None else f"unavailable: {reason}"
        click.echo(f"{name:8} devices={','.join(b.device_types):10} {status}")
        if b.description:
            click.echo(f"{'':8} {b.description}")
    for name, err in registry.load_errors.items():
        click.echo(f"{name:8} {err}")
    click.echo("")
    rows = [[op] + [", ".join(f"{k.name}({k.level.label})" for k in registry.backends[n].kernels.get(op, [])) or "-"
                    for n in names] for op in CONTRACTS]
    widths = [max(len(r[i]) for r in rows + [["op"] + names]) + 2 for i in range(len(names) + 1)]
    for row in [["op"] + names] + rows:
        click.echo("".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    if level:
        click.echo("")
        for n in names:
            try:
                registry.resolve(n, level, check_available=False)
                click.echo(f"{n} at {level}: ok")
            except DSV4Error as e:
                click.echo(f"{n} at {level}: {e}")


def _presets(text: str) -> tuple[str, ...]:
    """Comma-separated preset names, each a known one."""
    from dsv4.config import preset

    names = tuple(p.strip() for p in text.split(",") if p.strip())
    for name in names:
        preset(name)
    return names


@main.command()
@click.option("--backend", required=True, help="Backend to certify (cpu, cuda, npu or a vendor plugin).")
@click.option("--device", type=DEVICE, default=None, help="Device to run on (default: the backend's device type).")
@click.option("--level", type=click.Choice(LEVEL_NAMES), default="exact", show_default=True)
@click.option("--presets", default="tiny", show_default=True, help="Comma-separated presets for whole-model checks.")
@click.option("--report", "report_path", type=OUTPUT_FILE, default=None, help="Write the JSON report here.")
@quiet_option
@friendly_errors
def verify(backend, device, level, presets, report_path, quiet):
    """Check a backend's kernels against the levels they declare; non-zero exit on any failure."""
    from pathlib import Path

    from dsv4.backends.conformance import verify as run_verify

    with Progress(enabled=not quiet) as progress:
        report = run_verify(backend, device, level, _presets(presets), progress=progress)
    if report_path:
        Path(report_path).write_text(report.to_json())
    click.echo(report.table())
    sys.exit(0 if report.ok else 1)


@main.command()
@click.argument("first", type=INPUT_FILE)
@click.argument("second", type=INPUT_FILE)
@friendly_errors
def compare(first, second):
    """Diff two `dsv4 verify` reports (e.g. from two machines) check by check; non-zero exit if they differ."""
    from dsv4.backends.conformance import Report, compare as diff_reports

    a, b = Report.load(first), Report.load(second)
    click.echo(f"{first}: {a.backend} on {a.device} at {a.level} ({a.environment.get('device_name')})")
    click.echo(f"{second}: {b.backend} on {b.device} at {b.level} ({b.environment.get('device_name')})")
    diffs = diff_reports(a, b)
    for line in diffs:
        click.echo(f"  DIFF  {line}")
    click.echo(f"{len(diffs)} difference(s) over {len({c.name for c in a.checks} | {c.name for c in b.checks})} checks")
    sys.exit(1 if diffs else 0)


@main.command()
@click.option("--presets", default="tiny", show_default=True)
@friendly_errors
def golden(presets):
    """Maintainers: regenerate the golden digests from the CPU reference (backends/golden/digests.json)."""
    from dsv4.backends.conformance import GOLDEN_FILE, regenerate_golden

    digests = regenerate_golden(_presets(presets))
    click.echo(f"wrote {len(digests)} digests to {GOLDEN_FILE}")


@main.group()
def checkpoint() -> None:
    """Checksum manifests (dsv4-manifest.json) of checkpoint directories: verify one, or write one for a download."""


@checkpoint.command("verify")
@click.argument("directory", type=INPUT_DIR)
@quiet_option
@friendly_errors
def checkpoint_verify(directory, quiet):
    """Hash every file of DIRECTORY against its manifest, whatever the checkpoint's size; a mismatch is an error
    naming the file and the tensor."""
    from dsv4.checkpoint import verify_checkpoint

    with Progress(enabled=not quiet) as progress:
        found = verify_checkpoint(directory, progress=lambda done, total: progress("verify", done, total))
    click.echo(f"{directory}: {len(found.files)} files ({found.nbytes / 1e6:.1f} MB) match {MANIFEST_FILE}")


@checkpoint.command("manifest")
@click.argument("directory", type=INPUT_DIR)
@click.option("--force", is_flag=True, help="Replace an existing manifest.")
@quiet_option
@friendly_errors
def checkpoint_manifest(directory, force, quiet):
    """Write DIRECTORY/dsv4-manifest.json: the sha256 of every file a load reads and of every tensor in them; later
    loads and `dsv4 checkpoint verify` check against it. Run it once on a fresh download, and compare the sha256
    it prints (sha256sum format) with the publisher's: Hugging Face lists one per file."""
    from pathlib import Path

    from dsv4.checkpoint import checkpoint_files
    from dsv4.manifest import write_manifest

    root = Path(directory)
    target = validate.output_file(root / MANIFEST_FILE, "manifest")
    if target.exists() and not force:
        raise DSV4Error(f"{target} exists (`dsv4 checkpoint verify {root}` checks against it; --force replaces it)")
    with Progress(enabled=not quiet) as progress:
        written = write_manifest(root, checkpoint_files(root), lambda done, total: progress("hash", done, total))
    for name, entry in written.files.items():
        click.echo(f"{entry.sha256}  {name}")
    click.echo(f"wrote {target}", err=True)


@main.command("eval")
@model_option
@click.option("--preset", default=None, help="Score a preset's randomly initialised checkpoint instead.")
@click.option("--backend", default=None, help="Backend by name (e.g. a vendor plugin) instead of the device's own.")
@backend_options
@click.option("--segments", "max_segments", type=click.IntRange(min=0), default=128, show_default=True,
              help="Score this many evenly spaced 512-token segments (0: all of them).")
@click.option("--file", "files", multiple=True, type=INPUT_FILE,
              help="Score these text files instead of the held-out standard-library files; repeatable.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Segments per forward step.")
@VERIFY
@quiet_option
@friendly_errors
def evaluate(model, preset, backend, device, determinism, ops_config, op_overrides, max_segments, files, batch,
             verify, quiet):
    """Perplexity on the held-out Python standard-library files, which the default model never saw in training.

    Prints the perplexity, the float64 NLL sum and a digest of the scored logits: backends that agree bit for bit
    (the `exact` level) print the same line."""
    import platform
    from pathlib import Path

    from dsv4 import evaluation
    from dsv4.api import load
    from dsv4.backends.registry import collect_overrides

    for f in files:
        validate.read_bytes(f, "file to score")       # an empty or unreadable file fails before the model loads
    with Progress(enabled=not quiet) as progress:
        pipe = load(model, preset, device, determinism, collect_overrides(op_overrides, ops_config),
                    backend=backend, progress=progress.loading, verify=verify, notice=say_note)
        paths = [Path(f) for f in files] or evaluation.split(evaluation.stdlib_files())[1]
        segs = evaluation.segments([pipe.tokenizer.encode(evaluation.read_source(p)) for p in paths],
                                   pipe.config.bos_token_id)
        chosen = evaluation.evenly_spaced(segs, max_segments)
        result = evaluation.perplexity(pipe.model, chosen, pipe.device, batch,
                                       progress=lambda done, total: progress("eval", done, total))
    source = (f"{len(paths)} file(s)" if files else
              f"{len(paths)} held-out standard-library files of Python {platform.python_version()}")
    click.echo(f"perplexity {result.value:.4f} ({result.bits_per_token:.4f} bits/token) over {result.tokens} tokens: "
               f"{len(chosen)} of {len(segs)} segments of {source}")
    click.echo(f"nll_sum {result.nll_sum!r} logits-sha256 {result.digest} "
               f"[{pipe.model.ops.backend}/{device}, {determinism}]")


# -- benchmarks: `dsv4 bench <what>`; each benchmark is a subcommand of this group (the code: dsv4.benchmarks) ------
SIZE = Checked("size", validate.byte_size)


@main.command()
@model_option
@click.option("--preset", default=None, help="Serve a preset's randomly initialised checkpoint (tiny, small, ...).")
@backend_options
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=None,
              help="Requests decoding at once (cache slots). [default: the model config's max_batch_size]")
@click.option("--max-queue", type=click.IntRange(min=1), default=256, show_default=True,
              help="Requests that may wait for a slot; more are refused with 429.")
@click.option("--kv-cache-memory", type=SIZE, default=None,
              help="Memory for the paged KV cache blocks, e.g. 4GiB. [default: a full context per slot]")
@click.option("--prefix-cache-dir", type=click.Path(file_okay=False), default=None,
              help="Persist cached prompt prefixes here, so they survive a restart.")
@click.option("--prefix-cache-size", type=SIZE, default="10GiB", show_default=True,
              help="Size cap of --prefix-cache-dir (least recently used files go first).")
@click.option("--no-prefix-cache", is_flag=True, help="Compute every prompt from scratch (no reuse, no files).")
@SPECULATE
@threads_option
@VERIFY
@friendly_errors
def serve(model, preset, device, determinism, ops_config, op_overrides, host, port, max_batch, max_queue,
          kv_cache_memory, prefix_cache_dir, prefix_cache_size, no_prefix_cache, speculate, threads, verify):
    """An OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models, /health) with
    continuous batching and a prefix cache; at batch-invariant and exact, a request's bits do not depend on the
    load. docs/serve.md."""
    try:
        from dsv4.serve import app
    except ImportError as e:
        raise DSV4Error(f"dsv4 serve needs the serve extra ({e.name} is missing): pip install 'dsv4[serve]'") from None
    from dsv4.api import checkpoint_config
    from dsv4.backends.registry import collect_overrides

    def warn(message: str) -> None:
        click.echo(f"warning: {one_line(message)}", err=True)

    validate.speculate(checkpoint_config(model, preset), speculate)     # before any weights are read
    set_threads(threads, device)
    service = app.load_service(model, preset, device, determinism, collect_overrides(op_overrides, ops_config),
                               verify, max_batch, max_queue, kv_cache_memory, prefix_cache_dir, prefix_cache_size,
                               not no_prefix_cache, speculate, warn)
    app.run(service, host, port, lambda line: click.echo(line, err=True))


@main.group("bench")
def bench_group() -> None:
    """Benchmarks of dsv4's kernels and collectives, with the hardware limits measured in the same run."""


json_option = click.option("--json", "json_out", type=OUTPUT_FILE, default=None, help="Also write JSON here.")
bench_options = options(*bench.SHARED, json_option, quiet_option)


@bench_group.command("serve")
@model_option
@click.option("--preset", default=None, help="Serve a preset's randomly initialised checkpoint instead.")
@click.option("--device", type=DEVICE, default="cpu", show_default=True)
@click.option("--determinism", type=click.Choice(LEVEL_NAMES), default="exact", show_default=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=None, help="The server's --max-batch.")
@click.option("--requests", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--concurrency", type=click.IntRange(min=1), default=8, show_default=True,
              help="Requests in flight at once.")
@click.option("--shared-prefixes", type=click.IntRange(min=1), default=2, show_default=True,
              help="Distinct long prefixes the requests share (request i takes prefix i mod this).")
@click.option("--prefix-words", type=click.IntRange(min=1), default=100, show_default=True,
              help="Length of each shared prefix, in random words (about 6 tokens each on the byte-level "
                   "default model).")
@click.option("--suffix-words", type=click.IntRange(min=1), default=4, show_default=True,
              help="Each request's own words after its prefix.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--probes", type=click.IntRange(min=1), default=3, show_default=True,
              help="Single requests timed for each of cold, memory-hit and disk-hit TTFT (medians).")
@json_option
@quiet_option
@friendly_errors
def bench_serve(model, preset, device, determinism, max_batch, requests, concurrency, shared_prefixes, prefix_words,
                suffix_words, max_tokens, probes, json_out, quiet):
    """Throughput, TTFT and TPOT (p50/p99), prefix-cache hit rate, and TTFT cold vs memory hit vs disk hit after a
    restart, of a `dsv4 serve` this command starts on a free local port."""
    import dsv4.benchmarks.serve as serve_bench

    args = ["--device", device, "--determinism", determinism, "--max-queue", str(max(requests, 1))]
    args += ["--model", model] if model else []
    args += ["--preset", preset] if preset else []
    args += ["--max-batch", str(max_batch)] if max_batch else []
    result = serve_bench.run(args, requests, concurrency, shared_prefixes, prefix_words, suffix_words, max_tokens,
                             probes, bench.say(quiet))
    click.echo(serve_bench.table(result))
    bench.write_json(result, json_out)


@bench_group.command("ops")
@bench_options
@click.option("--ops", "op_names", default="", help="Only these ops (comma-separated), e.g. quant_linear.")
@friendly_errors
def bench_ops(device, preset_name, batches, prefills, context, levels, json_out, quiet, op_names):
    """Every hot op of one layer at the preset's dimensions: each level's kernel against the torch composite,
    cuBLAS / torch._scaled_mm (GEMMs) and SDPA (attention), and against the HBM and tensor-core limits measured in
    the same run."""
    from dsv4.benchmarks import ops

    bench.require_gpu(device)
    names = tuple(o for o in op_names.split(",") if o)
    unknown = set(names) - set(CONTRACTS)
    if unknown:
        raise DSV4Error(f"--ops names unknown op(s): {', '.join(sorted(unknown))}")
    say = bench.say(quiet)
    row_line = lambda row: say(f"{row['kernel']} {row['us']:.1f} us ({100 * row['hbm_fraction']:.1f}% HBM)")
    result = ops.run(preset_name, bench.parse_sizes(batches, "--batches"), bench.parse_sizes(prefills, "--prefills"),
                     context, bench.parse_levels(levels), device, names, progress=say, on_row=row_line)
    click.echo(ops.table(result))
    bench.write_json(result, json_out)


@bench_group.command("layer")
@bench_options
@click.option("--kinds", default="csa,hca", show_default=True, help="Layer kinds: csa, hca, window.")
@click.option("--exact-prefill-max", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Time the exact level on prefills up to this length (it runs on CUDA cores: slow).")
@click.option("--plot", "plot_out", type=OUTPUT_FILE, default=None,
              help="Also draw decode GPU time against batch size per level here (SVG).")
@friendly_errors
def bench_layer(device, preset_name, batches, prefills, context, levels, json_out, quiet, kinds,
                exact_prefill_max, plot_out):
    """One whole layer (mHC, attention, MoE) at the preset's dimensions with random weights: decode steps and
    prefills at each level, wall and GPU time, against the weight-read floor."""
    from dsv4.benchmarks import layer

    bench.require_gpu(device)
    kind_names = tuple(k for k in kinds.split(",") if k)
    bad = set(kind_names) - set(layer.LAYER_KINDS)
    if bad or not kind_names:
        raise DSV4Error(f"--kinds takes {', '.join(layer.LAYER_KINDS)}; got {kinds!r}")
    say = bench.say(quiet)
    result = layer.run(preset_name, kind_names, bench.parse_sizes(batches, "--batches"),
                       bench.parse_sizes(prefills, "--prefills"), context, bench.parse_levels(levels), device,
                       exact_prefill_max, progress=say)
    click.echo(layer.table(result))
    bench.write_json(result, json_out)
    if plot_out:
        from dsv4.benchmarks.plot import layer_decode_svg

        bench.write_text(layer_decode_svg(result), plot_out)


@bench_group.command("model")
@click.option("--device", type=DEVICE, default="cuda", show_default=True)
@click.option("--preset", "preset_name", default="v4-flash", show_default=True,
              help="Take every dimension and the layer pattern from this preset.")
@click.option("--layers", type=click.IntRange(min=1), default=16, show_default=True,
              help="The preset's first N layers (a full V4-Flash does not fit one GPU).")
@click.option("--batches", default="1,16,64,256", show_default=True, help="Decode batch sizes.")
@click.option("--contexts", default="8192", show_default=True, help="Positions each decoding sequence holds.")
@click.option("--long-contexts", default="131072,1048576", show_default=True,
              help="Further contexts, decoded at batch 1 only ('' for none).")
@click.option("--prefill", type=click.IntRange(min=0), default=4096, show_default=True,
              help="Prompt length of the prefill timing (0: none).")
@click.option("--levels", default="fast,batch-invariant,exact", show_default=True)
@json_option
@click.option("--plot", "plot_out", type=OUTPUT_FILE, default=None,
              help="Also draw time per output token against batch size per level here (SVG).")
@quiet_option
@friendly_errors
def bench_model(device, preset_name, layers, batches, contexts, long_contexts, prefill, levels, json_out, plot_out,
                quiet):
    """A stack of N layers of the preset, end to end through the engine (CUDA graphs): time per output token and
    tokens/s per level and batch, at long contexts too, against the bytes-read floor; prefill tokens/s."""
    from dsv4.benchmarks import model

    bench.require_gpu(device)
    result = model.run(preset_name, layers, bench.parse_sizes(batches, "--batches"),
                       bench.parse_sizes(contexts, "--contexts"), prefill, bench.parse_levels(levels), device,
                       bench.parse_sizes(long_contexts, "--long-contexts"), progress=bench.say(quiet))
    click.echo(model.table(result))
    bench.write_json(result, json_out)
    if plot_out:
        from dsv4.benchmarks.plot import model_decode_svg

        bench.write_text(model_decode_svg(result), plot_out)


@bench_group.command("speculate")
@model_option
@click.option("--device", type=DEVICE, default="cpu", show_default=True)
@click.option("--levels", default="fast,deterministic,batch-invariant,exact", show_default=True)
@click.option("--batches", default="1,4,16", show_default=True, help="Decode batch sizes.")
@click.option("--speculate", "drafts", default="1,2,3", show_default=True,
              help="Draft counts N, each compared with plain decoding.")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Tokens of held-out code per prompt.")
@click.option("--new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--temperature", type=FiniteFloat(min=0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Runs of each setting, interleaved; the best decode speed counts.")
@json_option
@quiet_option
@friendly_errors
def bench_speculate(model, device, levels, batches, drafts, prompt_tokens, new_tokens, temperature, repeats, json_out,
                    quiet):
    """Speculative decoding with the MTP block on held-out standard-library code: drafts accepted, tokens per
    verification step and decode speed-up over plain decoding per level and batch, and whether the tokens are
    plain decoding's."""
    import torch

    from dsv4.api import checkpoint_config
    from dsv4.benchmarks import speculate
    from dsv4.engine import Request

    config = checkpoint_config(model)
    counts = bench.parse_sizes(drafts, "--speculate")
    sizes = bench.parse_sizes(batches, "--batches")
    if not counts or not sizes:
        raise DSV4Error("--speculate and --batches each need at least one positive integer")
    for n in counts:
        validate.speculate(config, n)
    validate.request(config, Request([config.bos_token_id] * (prompt_tokens + 1), new_tokens, temperature))
    validate.device_present(torch.device(device))
    result = speculate.run(model, device, bench.parse_levels(levels), sizes, counts, prompt_tokens, new_tokens,
                           temperature, repeats, progress=bench.say(quiet))
    click.echo(speculate.table(result))
    bench.write_json(result, json_out)


@bench_group.command("moe")
@click.option("--device", type=DEVICE, default="cpu", show_default=True, help="cpu, cuda or npu.")
@click.option("--preset", "preset_name", default="v4-flash", show_default=True,
              help="Take dim, routed experts and top-k from this preset.")
@click.option("--tokens", default="16,128,512", show_default=True, help="Comma-separated tokens per step.")
@click.option("--iters", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--json", "json_out", type=OUTPUT_FILE, default=None, help="Also write the rows here.")
@parallel_options
@friendly_errors
def bench_moe(device, preset_name, tokens, iters, json_out, nproc, dist_timeout):
    """Expert-parallel dispatch and combine against the raw all-gather and all-reduce on the same sizes.

    Needs several ranks: --nproc N, or a torchrun launch."""
    from dsv4.benchmarks import moe
    from dsv4.config import preset
    from dsv4.parallel import join

    counts = bench.parse_sizes(tokens, "--tokens")
    if not counts:
        raise DSV4Error(f"--tokens must be comma-separated positive integers, got {tokens!r}")
    if ranks_launched(nproc, lambda: preset(preset_name).n_routed_experts):
        return
    settings = {"device": device, "preset": preset_name, "tokens": counts, "iters": iters}
    with join(device.split(":")[0], settings, dist_timeout) as group, rank_zero_speaks(group):
        if group is None:
            raise DSV4Error("dsv4 bench moe measures collectives: run it as several ranks (--nproc N or torchrun)")
        result = moe.run(group, group.place(device), preset_name, counts, iters)
        click.echo(moe.table(result))
        if group.rank == 0:
            bench.write_json(result, json_out)


if __name__ == "__main__":
    main()
