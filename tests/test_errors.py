"""Bad input, class by class: each is refused before any work, as one line naming the problem (`error: ...`, exit 2
on the command line; a DSV4Error in the API), never a traceback, a misleading message or a silent success."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

import dsv4
from dsv4 import api, manifest
from dsv4.backends.conformance import Check, Report
from dsv4.checkpoint import INDEX_FILE, checkpoint_files, load_checkpoint, random_weights, verify_checkpoint
from dsv4.cli import main
from dsv4.config import ModelConfig, preset
from dsv4.engine import Request
from dsv4.errors import DSV4Error
from dsv4.evaluation import perplexity
from dsv4.manifest import MANIFEST_FILE, write_manifest

from test_cli import _one_line_error, dsv4 as dsv4_process, dsv4_at_once

SHARD = "model-00001-of-00001.safetensors"


def cli(*args: str) -> tuple[int, str]:
    """Run the command line in this process: (exit code, stderr)."""
    result = CliRunner().invoke(main, list(args), prog_name="dsv4")
    return result.exit_code, result.stderr


def refused(code_and_stderr: tuple[int, str], *needles: str) -> str:
    """Exit 2 with exactly one line, `error: ...`, holding every needle; no traceback."""
    code, stderr = code_and_stderr
    assert code == 2, stderr
    lines = stderr.rstrip("\n").split("\n")
    assert lines[-1].startswith("error: ") and not any(l.startswith("error: ") for l in lines[:-1]), stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


def api_error(fn, *needles: str) -> str:
    """`fn()` raises a one-line DSV4Error holding every needle."""
    with pytest.raises(DSV4Error) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if the command gets as far as loading a model: the input must be refused before."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")
    monkeypatch.setattr(api, "load", load)


@pytest.fixture
def no_weights_read(monkeypatch):
    """Fail the test if `dsv4.load` gets as far as reading (or writing) a checkpoint."""
    def read(*args, **kwargs):
        raise AssertionError("a checkpoint was read before the bad input was refused")
    monkeypatch.setattr(api, "load_checkpoint", read)
    monkeypatch.setattr(api, "preset_checkpoint", read)


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def _tensor_bytes(path: Path, key: str) -> tuple[int, int]:
    """File offsets [begin, end) of tensor `key`'s bytes in a safetensors file."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    begin, end = json.loads(data[8:8 + n])[key]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def _poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _edit_tensor(root: Path, key: str, edit) -> None:
    """Rewrite tensor `key` of the single shard as `edit(tensor)`, then re-write the manifest (a checkpoint that was
    already bad when its manifest was written, as a corrupt upload would be)."""
    with safe_open(str(root / SHARD), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[key] = edit(tensors[key])
    save_file(tensors, root / SHARD)
    write_manifest(root, checkpoint_files(root))


# -- numbers --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (("run", "--max-new-tokens", "0"), "--max-new-tokens"),
    (("run", "--max-new-tokens", "-5"), "--max-new-tokens"),
    (("run", "--temperature", "nan"), "--temperature"),
    (("run", "--temperature", "inf"), "--temperature"),
    (("run", "--temperature", "-0.5"), "--temperature"),
    (("run", "--top-p", "1.5"), "--top-p"),
    (("run", "--top-p", "nan"), "--top-p"),
    (("run", "--seed", "-1"), "--seed"),
    (("run", "--prefill-chunk", "0"), "--prefill-chunk"),
    (("run", "--dist-timeout", "inf"), "--dist-timeout"),
    (("run", "--nproc", "0"), "--nproc"),
    (("eval", "--batch", "0"), "--batch"),
    (("eval", "--segments", "-1"), "--segments"),
])
def test_a_number_out_of_range_names_the_option(nothing_loads, args, needle):
    refused(cli(*args), needle, "Invalid value")


@pytest.mark.parametrize("settings, needle", [
    ({"seed": -1}, "seed must be >= 0"),
    ({"max_batch": 0}, "max_batch must be >= 1"),
    ({"prefill_chunk": 0}, "prefill_chunk must be >= 1"),
])
def test_api_engine_settings_out_of_range_are_refused(tiny, settings, needle):
    api_error(lambda: tiny.engine(**settings), needle)


@pytest.mark.parametrize("kwargs, needle", [
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"temperature": float("inf")}, "temperature must be a finite number"),
    ({"top_p": -0.1}, "top_p must be >= 0"),
    ({"seed": 1 << 64}, "seed must be >= 0 and < 18446744073709551616"),
])
def test_api_sampling_settings_out_of_range_are_refused(tiny, kwargs, needle):
    api_error(lambda: tiny.complete("x", **kwargs), needle)


# -- devices --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device, needles", [
    ("cuda:x", ("'cuda:x' is not of the form type[:index]",)),
    ("CPU", ("'CPU' is not of the form",)),
    ("gpu", ("no backend serves device 'gpu'",)),
    ("cpu:3", ("device cpu:3 does not exist", "1 cpu device")),
])
def test_a_bad_device_is_refused_in_the_cli_and_the_api(no_weights_read, tiny_dir, device, needles):
    refused(cli("run", "--model", str(tiny_dir), "--device", device), *needles)
    api_error(lambda: dsv4.load(tiny_dir, device=device), *needles)


# -- paths ----------------------------------------------------------------------------------------------------------
def test_missing_and_mistyped_paths_are_named(nothing_loads, tiny_dir, tmp_path):
    refused(cli("run", "--model", str(tmp_path / "absent")), "absent", "does not exist")
    refused(cli("run", "--model", str(tiny_dir / "config.json")), "config.json", "is a file")
    refused(cli("run", "--ops-config", str(tmp_path / "ops.toml")), "ops.toml", "does not exist")
    refused(cli("compare", str(tmp_path), str(tmp_path)), "is a directory")


def test_api_model_paths_are_checked_before_reading(no_weights_read, tiny_dir, tmp_path):
    api_error(lambda: dsv4.load(tiny_dir / "config.json"), "model directory", "is a file, not a directory")
    api_error(lambda: dsv4.load(tmp_path / "absent"), "model directory", "absent does not exist")
    api_error(lambda: dsv4.load(tiny_dir, preset="tiny"), "not both")


@pytest.mark.parametrize("args", [
    ("run", "--logits-out", "{missing}/logits.st"),
    ("run", "--logits-out", "{dir}"),
    ("verify", "--backend", "cpu", "--report", "{missing}/report.json"),
    ("bench", "ops", "--json", "{missing}/ops.json"),
    ("bench", "layer", "--plot", "{missing}/layer.svg"),
])
def test_an_output_path_that_cannot_be_written_is_refused_before_the_work(nothing_loads, tmp_path, args):
    paths = {"missing": str(tmp_path / "no-such-dir"), "dir": str(tmp_path)}
    refused(cli(*(a.format(**paths) for a in args)), "cannot write")


def test_an_unreadable_checkpoint_file_is_called_unreadable_not_missing(tiny_dir, tmp_path, monkeypatch):
    root = _copy(tiny_dir, tmp_path / "ckpt")
    denied = str(root / "config.json")
    real_access = __import__("os").access
    monkeypatch.setattr("os.access", lambda path, mode: str(path) != denied and real_access(path, mode))
    api_error(lambda: load_checkpoint(root), "config.json", "not readable (permission denied)")

    def read_bytes(self):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr("os.access", real_access)
    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    api_error(lambda: ModelConfig.from_file(root / "config.json"), "cannot read config", "Permission denied")


# -- text and token ids ---------------------------------------------------------------------------------------------
def test_prompt_bytes_that_are_not_utf8_are_named_with_how_to_pass_them(tiny_dir, tiny):
    exe = shutil.which("dsv4") or os.path.join(os.path.dirname(sys.executable), "dsv4")
    proc = subprocess.run([exe, "run", "--model", str(tiny_dir), "--prompt", b"def \xff\xfe(x):"],
                          capture_output=True, text=True)
    _one_line_error(proc, "not valid UTF-8", "0xff 0xfe", "character 4", "--prompt-ids")
    assert "load:" not in proc.stderr                       # refused before the model loaded
    api_error(lambda: tiny.complete("def \udcff(x):"), "not valid UTF-8", "0xff", "list of ints")
    api_error(lambda: tiny.complete("\ud800"), "not valid UTF-8", "U+D800")


@pytest.mark.parametrize("args, needles", [
    (("--prompt-ids", "1,2,x"), ("comma-separated integers", "'1,2,x'")),
    (("--prompt-ids", "104,999"), ("token 1 is 999", "0 to 259")),
    (("--prompt-ids", "-1"), ("token 0 is -1",)),
    (("--prompt-ids", "1", "--prompt", "hi"), ("not both",)),
    (("--prompt", "x" * 600), ("exceeds the context length of 512",)),
    (("--prompt", "x" * 500, "--max-new-tokens", "100"), ("plus 100 new tokens exceeds",)),
])
def test_prompts_are_checked_against_the_vocabulary_and_context_before_loading(nothing_loads, tiny_dir, args,
                                                                               needles):
    refused(cli("run", "--model", str(tiny_dir), *args), *needles)


def test_a_prompt_of_token_ids_reads_as_its_text(tiny):
    assert tiny.complete(list(b"def f(x):"), max_new_tokens=2) == tiny.complete("def f(x):", max_new_tokens=2)
    api_error(lambda: tiny.complete([104, 260]), "token 1 is 260", "0 to 259")
    api_error(lambda: tiny.complete([]), "empty prompt")
    api_error(lambda: tiny.complete([1.0]), "token 0 is 1.0")


def test_cli_prompt_ids_generate_like_the_same_text(tiny_dir):
    common = ["run", "--model", str(tiny_dir), "--max-new-tokens", "2", "--quiet"]
    by_text = CliRunner().invoke(main, common + ["--prompt", "def f(x):"])
    by_ids = CliRunner().invoke(main, common + ["--prompt-ids", ",".join(str(b) for b in b"def f(x):")])
    assert by_ids.exit_code == 0 and by_ids.stdout == by_text.stdout, by_ids.stderr
    assert by_ids.stdout.startswith("def f(x):")


# -- config.json ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("edit, needles", [
    ({"dim": "256"}, ("dim must be an integer", "'256'")),
    ({"dim": True}, ("dim must be an integer", "True")),
    ({"n_layers": -4}, ("n_layers must be positive", "-4")),
    ({"norm_eps": 0.0}, ("norm_eps must be positive",)),
    ({"rope_theta": float("nan")}, ("rope_theta must be a finite number",)),
    ({"compress_ratios": [0, 4, "x", 4, 0]}, ("compress_ratios[2] must be an integer",)),
    ({"score_func": 3}, ("score_func must be a string",)),
    ({"eos_token_id": 300}, ("eos_token_id 300 is outside the vocabulary of 260",)),
    ({"n_layer": 4}, ("unknown key 'n_layer'", "did you mean 'n_layers'?")),
    ({"hidden_size": 512}, ("dim is given twice", "256", "512")),
    ({"rope_scaling": {"factor": 16.0, "mscal": 1.0}}, ("rope_scaling: unknown key 'mscal'", "'mscale'")),
    ({"rope_scaling": [1]}, ("rope_scaling must be an object",)),
])
def test_config_fields_of_the_wrong_type_range_or_name_are_named(tiny_dir, tmp_path, edit, needles):
    root = _copy(tiny_dir, tmp_path / "ckpt")
    data = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**data, **edit}))
    message = api_error(lambda: load_checkpoint(root, verify=False), *needles)
    assert message.startswith(str(root / "config.json"))


def test_the_hf_fields_dsv4_ignores_and_integral_floats_are_accepted(tiny_dir):
    data = json.loads((tiny_dir / "config.json").read_text())
    hf = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "torch_dtype": "bfloat16",
          "num_key_value_heads": 1, "quantization_config": {"fmt": "e4m3"}, "beta_fast": 32.0,
          "rope_scaling": {"type": "yarn", "factor": 16.0, "mscale": 1.0}}
    assert ModelConfig.from_json({**data, **hf}) == preset("tiny")


@pytest.mark.parametrize("content, needle", [("", "is empty"), ("{", "not valid JSON"), ("[1]", "JSON object"),
                                             ("\xff", "not UTF-8 text: byte 0xff at offset 0")])
def test_an_empty_or_malformed_config_json_is_named(tiny_dir, tmp_path, content, needle):
    root = _copy(tiny_dir, tmp_path / "ckpt")
    (root / "config.json").write_bytes(content.encode("latin-1"))
    api_error(lambda: load_checkpoint(root, verify=False), "config", needle)


def test_a_bad_config_json_is_refused_on_the_command_line_before_loading(nothing_loads, tiny_dir, tmp_path):
    root = _copy(tiny_dir, tmp_path / "ckpt")
    data = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**data, "max_seq_len": "512"}))
    refused(cli("run", "--model", str(root)), "config.json", "max_seq_len must be an integer")


# -- checkpoint integrity -------------------------------------------------------------------------------------------
def test_flipped_bytes_in_one_tensor_are_caught_on_load_naming_file_and_tensor(tiny_dir, tmp_path):
    root = _copy(tiny_dir, tmp_path / "ckpt")
    begin, _ = _tensor_bytes(root / SHARD, "layers.1.attn.wq_a.weight")
    byte = (root / SHARD).read_bytes()[begin + 10]
    _poke(root / SHARD, begin + 10, bytes([byte ^ 0x10]))          # same size, one bit
    needles = (SHARD, "does not match its sha256", "tensor layers.1.attn.wq_a.weight")
    api_error(lambda: dsv4.load(root), *needles)
    api_error(lambda: verify_checkpoint(root), *needles)
    for proc in dsv4_at_once(("run", "--model", str(root)), ("checkpoint", "verify", str(root))):
        _one_line_error(proc, *needles)


def test_a_corrupt_header_or_a_changed_small_file_is_caught(tiny_dir, tmp_path):
    root = _copy(tiny_dir, tmp_path / "ckpt")
    _poke(root / SHARD, 9, b"[")                                     # inside the JSON header
    api_error(lambda: load_checkpoint(root), SHARD, "its safetensors header is not readable")
    root = _copy(tiny_dir, tmp_path / "ckpt2")
    text = (root / "tokenizer.json").read_text()
    (root / "tokenizer.json").write_text(text.replace("unused_258", "unused_852"))
    api_error(lambda: load_checkpoint(root), "tokenizer.json", "does not match its sha256")


def test_truncated_missing_and_unlisted_files_are_caught_by_the_manifest(tiny_dir, tmp_path):
    root = _copy(tiny_dir, tmp_path / "ckpt")
    (root / SHARD).write_bytes((root / SHARD).read_bytes()[:-1])
    api_error(lambda: load_checkpoint(root, verify=True), SHARD, "bytes", "truncated or replaced")
    (root / SHARD).unlink()
    api_error(lambda: load_checkpoint(root), SHARD, "is missing")
    root = _copy(tiny_dir, tmp_path / "ckpt2")
    listed = json.loads((root / MANIFEST_FILE).read_text())
    del listed["files"][INDEX_FILE]
    (root / MANIFEST_FILE).write_text(json.dumps(listed))
    api_error(lambda: load_checkpoint(root), INDEX_FILE, "not listed in its dsv4-manifest.json")


def test_a_download_gets_a_manifest_once_and_later_loads_check_it(tiny_dir, tmp_path):
    root = _copy(tiny_dir, tmp_path / "download")
    (root / MANIFEST_FILE).unlink()
    notes = []
    load_checkpoint(root, notice=notes.append)
    assert len(notes) == 1 and "no dsv4-manifest.json" in notes[0] and "dsv4 checkpoint manifest" in notes[0]
    api_error(lambda: load_checkpoint(root, verify=True), "no dsv4-manifest.json", "dsv4 checkpoint manifest")
    proc = dsv4_process("checkpoint", "manifest", str(root), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert f"{manifest.digest(root / SHARD).sha256}  {SHARD}" in proc.stdout.splitlines()   # sha256sum format
    _one_line_error(dsv4_process("checkpoint", "manifest", str(root)), "exists", "--force")
    notes.clear()
    load_checkpoint(root, notice=notes.append)
    assert notes == []
    begin, _ = _tensor_bytes(root / SHARD, "head.weight")
    _poke(root / SHARD, begin, b"\x00\x00")
    api_error(lambda: load_checkpoint(root), "tensor head.weight")


def test_a_checkpoint_over_the_hashing_limit_is_size_checked_and_says_how_to_verify(tiny_dir, tmp_path, monkeypatch):
    root = _copy(tiny_dir, tmp_path / "ckpt")
    begin, _ = _tensor_bytes(root / SHARD, "embed.weight")
    _poke(root / SHARD, begin, b"\x01")
    monkeypatch.setattr(manifest, "HASH_ON_LOAD_LIMIT", 1000)
    notes = []
    load_checkpoint(root, notice=notes.append)                       # not hashed: the flip goes unseen
    assert len(notes) == 1 and f"dsv4 checkpoint verify {root}" in notes[0] and "not hashed" in notes[0]
    api_error(lambda: load_checkpoint(root, verify=True), "tensor embed.weight")
    api_error(lambda: verify_checkpoint(root), "tensor embed.weight")


def test_the_embedded_model_and_written_checkpoints_carry_a_manifest_that_matches(tiny_dir):
    for root in (api.DEFAULT_MODEL, tiny_dir):
        found = verify_checkpoint(root)
        assert set(found.files) == set(checkpoint_files(root))
        assert len(found.files[SHARD].tensors) > 100


@pytest.mark.parametrize("content, needles", [
    ('{"format": "dsv4-manifest", "version": 1}', ("missing field 'files'",)),
    ('{"format": "dsv4-manifest", "version": 2, "files": {}}', ("version 1",)),
    ('{"format": "dsv4-manifest", "version": 1, "files": {"config.json": {"size": "9", "sha256": ""}}}',
     ("'size' must be an integer",)),
    ("", ("is empty",)),
])
def test_a_malformed_manifest_is_named(tiny_dir, tmp_path, content, needles):
    root = _copy(tiny_dir, tmp_path / "ckpt")
    (root / MANIFEST_FILE).write_text(content)
    api_error(lambda: load_checkpoint(root), "manifest", *needles)


# -- values of weights ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, edit, needles", [
    ("layers.3.ffn_norm.weight", lambda t: t.index_fill(0, torch.tensor([5]), float("nan")),
     ("tensor layers.3.ffn_norm.weight", "1 NaN or Inf")),
    ("layers.1.attn.attn_sink", lambda t: t.fill_(float("inf")), ("tensor layers.1.attn.attn_sink", "4 NaN or Inf")),
    ("layers.0.ffn.gate.tid2eid", lambda t: t.index_fill(0, torch.tensor([7]), 8),
     ("layers.0.ffn.gate.tid2eid", "outside 0..7")),
])
def test_nan_inf_or_out_of_range_weights_are_named_on_load(tiny_dir, tmp_path, key, edit, needles):
    root = _copy(tiny_dir, tmp_path / "ckpt")
    _edit_tensor(root, key, edit)
    api_error(lambda: load_checkpoint(root), SHARD, *needles)


@pytest.fixture(scope="module")
def nan_weights_dir(tiny_dir, tmp_path_factory) -> Path:
    """The tiny checkpoint with e4m3 NaN codes in one FP8 weight of layer 2, under a matching manifest: weights that
    only the forward pass can find bad."""
    root = _copy(tiny_dir, tmp_path_factory.mktemp("nan") / "ckpt")
    _edit_tensor(root, "layers.2.attn.wq_b.weight",
                 lambda t: t.view(torch.uint8).index_fill(0, torch.tensor([3]), 0x7F).view(t.dtype))
    return root


def test_non_finite_logits_stop_generation_naming_the_first_non_finite_layer(nan_weights_dir):
    pipe = dsv4.load(nan_weights_dir)
    needles = ("logits hold NaN or Inf", "layers.2 (first in layers.2.attn.wq_b)")
    api_error(lambda: pipe.complete("def f(x):", max_new_tokens=4), *needles)
    api_error(lambda: perplexity(pipe.model, [[pipe.config.bos_token_id, 1, 2, 3]], pipe.device), *needles)
    _one_line_error(dsv4_process("run", "--model", str(nan_weights_dir), "--max-new-tokens", "2"), *needles)


def test_the_sampler_never_sees_a_non_finite_row(tiny, monkeypatch):
    seen = []
    real = tiny.model.ops.sample
    monkeypatch.setattr(tiny.model.ops, "sample", lambda logits, *a: seen.append(logits) or real(logits, *a))
    logits = torch.zeros(2, tiny.config.vocab_size)
    logits[1, 7] = float("nan")
    engine = tiny.engine()
    api_error(lambda: engine.sample(logits, [Request([1]), Request([2])], [1, 1]), "batch row 1")
    assert all(bool(torch.isfinite(s).all()) for s in seen)


# -- files read by compare, eval and --ops-config -------------------------------------------------------------------
def _report(tmp_path: Path, data) -> Path:
    path = tmp_path / "report.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


GOOD_REPORT = json.loads(Report("cpu", "cpu", "exact", {}, [Check("op/x/reference", "pass", "", "ab")]).to_json())


@pytest.mark.parametrize("data, needles", [
    ("", ("is empty",)),
    ("{", ("not valid JSON",)),
    ([], ("must be a JSON object",)),
    ({**GOOD_REPORT, "backend": 3}, ("field 'backend' must be a string", "3")),
    ({**GOOD_REPORT, "levle": "exact"}, ("unknown key 'levle'", "did you mean 'level'?")),
    ({k: v for k, v in GOOD_REPORT.items() if k != "device"}, ("missing field 'device'",)),
    ({**GOOD_REPORT, "checks": [{"name": "x", "status": "passed"}]}, ("status 'passed' is not one of",)),
    ({**GOOD_REPORT, "checks": [{"name": "x", "status": "pass", "digets": ""}]}, ("'digets'", "'digest'")),
])
def test_compare_names_what_is_wrong_with_a_report(tmp_path, data, needles):
    path = _report(tmp_path, data)
    refused(cli("compare", str(path), str(path)), str(path), *needles)


def test_eval_refuses_an_empty_file_before_loading(nothing_loads, tmp_path):
    (tmp_path / "empty.py").write_text("")
    refused(cli("eval", "--file", str(tmp_path / "empty.py")), "empty.py", "is empty")


@pytest.mark.parametrize("content, needles", [
    ("", ("is empty",)),
    ("# nothing\n", ("has no [ops] table",)),
    ("[ops\n", ("not valid TOML",)),
    ('[ops]\nrms_nrm = "cpu"\n', ("[ops]: unknown key 'rms_nrm'", "did you mean 'rms_norm'?")),
    ('[opps]\nrms_norm = "cpu"\n', ("unknown key 'opps'", "'ops'")),
    ("[ops]\nrms_norm = 3\n", ("[ops] rms_norm = 3", "backend[:kernel]")),
])
def test_an_op_config_file_is_checked_against_its_schema(nothing_loads, tmp_path, content, needles):
    path = tmp_path / "ops.toml"
    path.write_text(content)
    refused(cli("run", "--ops-config", str(path)), "ops.toml", *needles)


# -- preset cache ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("interruption", [KeyboardInterrupt(), OSError(28, "No space left on device")])
def test_an_interrupted_first_write_of_a_preset_leaves_nothing_in_the_cache(tmp_path, monkeypatch, interruption):
    monkeypatch.setenv("DSV4_CACHE", str(tmp_path / "cache"))
    real = api.write_checkpoint

    def interrupted(config, out_dir, seed):
        """The real write, interrupted half-way through the tensors (files written, one half-done)."""
        def weights():
            for i, item in enumerate(random_weights(config, seed)):
                if i == 200:
                    raise interruption
                yield item
        real(config, out_dir, seed=seed, weights=weights())
    monkeypatch.setattr(api, "write_checkpoint", interrupted)
    with pytest.raises(type(interruption)):
        api.preset_checkpoint("tiny")
    assert list((tmp_path / "cache").iterdir()) == []


# -- the command line's own errors ----------------------------------------------------------------------------------
def test_click_usage_errors_are_one_line_too():
    refused(cli("run", "--max-new-token", "5"), "No such option '--max-new-token'", "--max-new-tokens",
            "dsv4 run --help")
    refused(cli("frobnicate"), "No such command 'frobnicate'")
    refused(cli("verify"), "Missing option '--backend'")
