"""The checkpoint layout, random checkpoints, the loader's checks, and the FP8/FP4/e8m0 codecs it relies on."""
from __future__ import annotations

import collections
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dsv4.checkpoint import (INDEX_FILE, TensorSpec, checkpoint_files, load_checkpoint, official_layout,
                             random_weights, runtime_layout, write_checkpoint)
from dsv4.config import preset
from dsv4.errors import DSV4Error
from dsv4.formats import (dequantize_fp8_weight, e8m0_to_float, float_to_e8m0, quantize_weight_fp8, to_e4m3,
                          unpack_fp4)
from dsv4.manifest import MANIFEST_FILE, write_manifest

from conftest import same_bits

BF16, F32, E4M3, E8M0, I8, I64 = (torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.float8_e8m0fnu,
                                  torch.int8, torch.int64)


# -- layout ---------------------------------------------------------------------------------------------------------
def test_official_layout_reproduces_the_published_v4_flash_tensor_and_dtype_counts():
    layout = official_layout(preset("v4-flash"))
    assert len(layout) == 69187
    dtypes = collections.Counter(spec.dtype for spec in layout.values())
    assert dtypes == {BF16: 433, F32: 417, E4M3: 375, E8M0: 34167, I8: 33792, I64: 3}
    assert sum(name.startswith("mtp.0.") for name in layout) == 1575


def test_official_layout_reproduces_the_published_v4_pro_tensor_count():
    assert len(official_layout(preset("v4-pro"))) == 145116


def test_official_layout_shapes_match_the_spec_table():
    flash, pro = official_layout(preset("v4-flash")), official_layout(preset("v4-pro"))
    expect = {
        "layers.5.attn.wq_a.weight": TensorSpec((1024, 4096), E4M3),
        "layers.5.attn.wq_a.scale": TensorSpec((8, 32), E8M0),
        "layers.5.attn.wo_a.weight": TensorSpec((8192, 4096), E4M3),
        "layers.5.attn.wo_a.scale": TensorSpec((64, 32), E8M0),
        "layers.5.attn.wo_b.scale": TensorSpec((32, 64), E8M0),
        "layers.2.attn.compressor.ape": TensorSpec((4, 1024), F32),
        "layers.3.attn.compressor.ape": TensorSpec((128, 512), F32),
        "layers.2.attn.indexer.compressor.wkv.weight": TensorSpec((256, 4096), BF16),
        "layers.2.attn.indexer.wq_b.scale": TensorSpec((64, 8), E8M0),
        "layers.7.ffn.experts.255.w1.weight": TensorSpec((2048, 2048), I8),
        "layers.7.ffn.experts.255.w1.scale": TensorSpec((2048, 128), E8M0),
        "layers.7.ffn.experts.0.w2.weight": TensorSpec((4096, 1024), I8),
        "layers.7.ffn.experts.0.w2.scale": TensorSpec((4096, 64), E8M0),
        "layers.2.ffn.gate.tid2eid": TensorSpec((129280, 6), I64),
        "layers.3.ffn.gate.bias": TensorSpec((256,), F32),
        "mtp.0.ffn.gate.bias": TensorSpec((256,), F32),
        "mtp.0.e_proj.scale": TensorSpec((32, 32), E8M0),
        "hc_head_fn": TensorSpec((4, 16384), F32),
        "layers.0.hc_attn_fn": TensorSpec((24, 16384), F32),
    }
    assert {name: flash[name] for name in expect} == expect
    assert "layers.1.attn.compressor.ape" not in flash          # sliding-window-only layer
    assert "layers.3.attn.indexer.wq_b.weight" not in flash     # HCA layer: compressor, no indexer
    assert "layers.3.ffn.gate.tid2eid" not in flash and "layers.2.ffn.gate.bias" not in flash
    assert not any(name.startswith("mtp.0.") and ("emb" in name or name.endswith("head.weight")) for name in flash)
    assert pro["layers.4.attn.wq_b.weight"] == TensorSpec((65536, 1536), E4M3)
    assert pro["layers.4.attn.wq_b.scale"] == TensorSpec((512, 12), E8M0)
    assert pro["layers.4.ffn.experts.383.w1.weight"] == TensorSpec((3072, 3584), I8)
    assert pro["layers.0.attn.compressor.ape"] == TensorSpec((128, 512), F32)


def test_runtime_layout_upcasts_norms_and_scales_keeps_bf16_weights_dequantises_wo_a_and_stacks_experts():
    runtime = runtime_layout(preset("v4-flash"))
    assert runtime["layers.7.ffn.experts.w1.weight"] == TensorSpec((256, 2048, 2048), I8)
    assert runtime["layers.7.ffn.experts.w2.scale"] == TensorSpec((256, 4096, 64), F32)
    assert runtime["layers.7.attn.wo_a.weight"] == TensorSpec((8192, 4096), BF16)
    assert "layers.7.attn.wo_a.scale" not in runtime
    assert runtime["layers.7.attn.wq_a.weight"] == TensorSpec((1024, 4096), E4M3)
    assert runtime["layers.7.attn.wq_a.scale"] == TensorSpec((8, 32), F32)
    for name in ("norm.weight", "mtp.0.enorm.weight", "layers.2.attn.q_norm.weight",
                 "layers.2.attn.indexer.compressor.norm.weight"):
        assert runtime[name].dtype == F32, name
    # bf16 in the release and in memory: the head, gate and compressor projections read bf16 and multiply in fp32
    for name in ("embed.weight", "head.weight", "layers.2.ffn.gate.weight", "layers.2.attn.compressor.wkv.weight",
                 "layers.2.attn.indexer.compressor.wgate.weight", "layers.2.attn.indexer.weights_proj.weight"):
        assert runtime[name].dtype == BF16, name
    assert runtime["layers.0.ffn.gate.tid2eid"].dtype == I64
    assert not any(".experts.0." in name for name in runtime)


def test_fp8_experts_keep_e4m3_weights_with_128_blocks():
    config = dataclasses.replace(preset("v4-flash"), expert_dtype="fp8")
    assert official_layout(config)["layers.7.ffn.experts.3.w2.scale"] == TensorSpec((32, 16), E8M0)
    assert runtime_layout(config)["layers.7.ffn.experts.w2.weight"] == TensorSpec((256, 4096, 2048), E4M3)


# -- random checkpoints and loading ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_checkpoint(preset("tiny"), tmp_path_factory.mktemp("tiny"), seed=1, shards=3)


@pytest.fixture(scope="module")
def tiny_loaded(tiny_dir):
    return load_checkpoint(tiny_dir)


def test_written_checkpoint_has_the_official_files_and_index(tiny_dir):
    shards = [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    index = json.loads((tiny_dir / INDEX_FILE).read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    layout = official_layout(preset("tiny"))
    assert list(index["weight_map"]) == list(layout)
    assert index["metadata"]["total_size"] == sum(spec.nbytes for spec in layout.values())
    for shard in shards:
        with safe_open(str(tiny_dir / shard), framework="pt") as f:
            assert set(f.keys()) == {name for name, file in index["weight_map"].items() if file == shard}
    assert json.loads((tiny_dir / "config.json").read_text()) == preset("tiny").to_json()


def test_reload_gives_exactly_the_runtime_layout(tiny_loaded):
    config, tensors, tokenizer = tiny_loaded
    assert config == preset("tiny")
    runtime = runtime_layout(config)
    assert list(tensors) == list(runtime)
    for name, spec in runtime.items():
        assert (tuple(tensors[name].shape), tensors[name].dtype) == (spec.shape, spec.dtype), name
    assert (tokenizer.bos_id, tokenizer.eos_id) == (256, 257)


def test_two_loads_are_bitwise_identical_and_progress_counts_every_tensor(tiny_dir, tiny_loaded):
    calls = []
    _, again, _ = load_checkpoint(tiny_dir, progress=lambda done, total: calls.append((done, total)))
    first = tiny_loaded[1]
    assert all(same_bits(first[name], again[name]) for name in first)
    total = len(official_layout(preset("tiny")))
    assert calls == [(i, total) for i in range(1, total + 1)]


def test_reload_matches_the_generated_weights_within_quantisation_error(tiny_loaded):
    config, tensors, _ = tiny_loaded
    layout = official_layout(config)
    for name, intent in random_weights(config, seed=1):
        expert = name.split(".experts.")
        if len(expert) == 2:  # stacked at run time
            e, leaf = expert[1].split(".", 1)
            weight = tensors[f"{expert[0]}.experts.{leaf}"][int(e)]
            scale = tensors[f"{expert[0]}.experts.{leaf.replace('weight', 'scale')}"][int(e)]
        else:
            weight, scale = tensors[name], tensors.get(name.replace(".weight", ".scale"))
        if layout[name].dtype == I8:   # FP4: half a step of e2m1 is at most a quarter of the value or the scale
            scale = scale.repeat_interleave(32, dim=1)
            value = unpack_fp4(weight) * scale
            assert ((value - intent).abs() <= (intent.abs() + scale) / 4).all(), name
        elif layout[name].dtype == E4M3:  # FP8 e4m3: 2^-4 relative, or half the subnormal step 2^-9 of the scale
            if scale is None:  # wo_a, which the loader dequantises to bf16
                assert same_bits(weight, dequantize_fp8_weight(*quantize_weight_fp8(intent)).to(BF16)), name
                continue
            scale = scale.repeat_interleave(128, 0)[:intent.shape[0]].repeat_interleave(128, 1)[:, :intent.shape[1]]
            value = weight.float() * scale
            assert ((value - intent).abs() <= intent.abs() * 2 ** -4 + scale * 2 ** -10).all(), name
        else:
            assert torch.equal(weight, intent.to(weight.dtype)), name


def test_random_model_starts_from_a_plain_residual(tiny_loaded):
    config, tensors, _ = tiny_loaded
    hc = config.hc_mult
    base = tensors["layers.0.hc_attn_base"]
    assert torch.allclose(torch.sigmoid(base[:hc]), torch.full((hc,), 1 / hc))        # pre: average the streams
    assert torch.equal(2 * torch.sigmoid(base[hc:2 * hc]), torch.ones(hc))              # post: add once
    comb = torch.softmax(base[2 * hc:].view(hc, hc), dim=-1)
    assert torch.allclose(comb, torch.eye(hc), atol=0.01)                                # mixing: identity
    tid2eid = tensors["layers.0.ffn.gate.tid2eid"]
    assert all(len(set(row.tolist())) == config.n_activated_experts for row in tid2eid)
    counts = torch.bincount(tid2eid.flatten(), minlength=config.n_routed_experts)
    assert counts.max() - counts.min() <= config.n_activated_experts
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())


def test_same_seed_writes_identical_files_and_another_seed_does_not(tmp_path, tiny_dir):
    again = write_checkpoint(preset("tiny"), tmp_path / "again", seed=1, shards=3)
    other = write_checkpoint(preset("tiny"), tmp_path / "other", seed=2, shards=3)
    shard = "model-00002-of-00003.safetensors"
    assert (again / shard).read_bytes() == (tiny_dir / shard).read_bytes()
    assert (other / shard).read_bytes() != (tiny_dir / shard).read_bytes()


def test_given_weights_are_quantised_and_written_like_random_ones(tmp_path, tiny_dir):
    """A trained model goes through the same writer: given weights produce the files random ones do."""
    given = write_checkpoint(preset("tiny"), tmp_path, shards=3, weights=random_weights(preset("tiny"), seed=1))
    for shard in ("model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors"):
        assert (given / shard).read_bytes() == (tiny_dir / shard).read_bytes()


@pytest.mark.parametrize("edit, message", [
    (lambda w: w[1:], "out of order"),
    (lambda w: w[:-1], "weights end before"),
    (lambda w: [(w[0][0], w[0][1][:-1])] + w[1:], "shape"),
    (lambda w: [(w[0][0], w[0][1].float())] + w[1:], "dtype"),
])
def test_given_weights_must_match_the_layout(tmp_path, edit, message):
    weights = list(random_weights(preset("tiny"), seed=0))
    with pytest.raises(DSV4Error, match=message):
        write_checkpoint(preset("tiny"), tmp_path, weights=edit(weights))


@pytest.mark.parametrize("change", [dict(expert_dtype="fp8"), dict(dtype="bf16")])
def test_other_weight_formats_round_trip(tmp_path, change):
    config = dataclasses.replace(preset("tiny"), **change)
    loaded, tensors, _ = load_checkpoint(write_checkpoint(config, tmp_path, shards=1))
    assert loaded == config
    runtime = runtime_layout(config)
    assert {name: TensorSpec(tuple(t.shape), t.dtype) for name, t in tensors.items()} == runtime


def test_a_config_whose_activation_scales_are_not_ue8m0_is_refused():
    """scale_fmt (a config.json field of the release) says how activation scales are rounded; dsv4 implements only
    ue8m0 (powers of two), so a checkpoint asking for another format is refused rather than run with wrong scales."""
    assert preset("v4-flash").scale_fmt == "ue8m0"
    with pytest.raises(DSV4Error, match="scale_fmt 'e4m3': only ue8m0"):
        dataclasses.replace(preset("tiny"), scale_fmt="e4m3")


def _hf_name(name: str) -> str:
    """The inverse of convert.py's renames, as HF-style checkpoints spell tensors."""
    name = name.replace(".attn.", ".self_attn.").replace(".ffn.", ".mlp.").replace("gate.bias",
                                                                                  "gate.e_score_correction_bias")
    if name.endswith(".scale"):
        name = name.removesuffix(".scale") + ".weight_scale_inv"
    return "model." + name


def test_hf_named_checkpoint_loads_to_the_same_tensors(tmp_path, tiny_dir, tiny_loaded):
    hf = tmp_path / "hf"
    shutil.copytree(tiny_dir, hf)
    index = json.loads((hf / INDEX_FILE).read_text())
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(hf / shard), framework="pt") as f:
            tensors = {_hf_name(key): f.get_tensor(key) for key in f.keys()}
        if shard.startswith("model-00003"):  # MTP copies of embed and head, which convert.py drops
            tensors["model.mtp.0.embed_tokens.weight"] = torch.zeros(2, 2)
            tensors["model.mtp.0.head.weight"] = torch.zeros(2, 2)
        save_file(tensors, hf / shard)
    index["weight_map"] = {_hf_name(k): v for k, v in index["weight_map"].items()}
    (hf / INDEX_FILE).write_text(json.dumps(index))
    write_manifest(hf, checkpoint_files(hf))         # as for a download: its own manifest
    assert "model.layers.0.self_attn.wq_a.weight_scale_inv" in index["weight_map"]

    _, tensors, _ = load_checkpoint(hf)
    assert all(same_bits(tensors[name], t) for name, t in tiny_loaded[1].items())


def test_single_file_without_index_loads(tmp_path, tiny_loaded):
    config = preset("tiny")
    write_checkpoint(config, tmp_path, seed=1, shards=1)
    (tmp_path / INDEX_FILE).unlink()
    write_manifest(tmp_path, checkpoint_files(tmp_path))
    _, tensors, _ = load_checkpoint(tmp_path)
    assert all(same_bits(tensors[name], t) for name, t in tiny_loaded[1].items())


# -- bad checkpoints --------------------------------------------------------------------------------------------------
def _edit_shard(root: Path, shard: str, edit) -> None:
    """Rewrite one shard after `edit(tensors)` changed its name -> tensor dict in place."""
    with safe_open(str(root / shard), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    edit(tensors)
    save_file(tensors, root / shard)


def _shard_of(root: Path, name: str) -> str:
    return json.loads((root / INDEX_FILE).read_text())["weight_map"][name]


@pytest.fixture
def bad_dir(tmp_path, tiny_dir) -> Path:
    """A copy without its manifest, so that the loader's structural checks (not the checksums) see each edit."""
    root = Path(shutil.copytree(tiny_dir, tmp_path / "ckpt"))
    (root / MANIFEST_FILE).unlink()
    return root


def _load_error(root: Path) -> str:
    with pytest.raises(DSV4Error) as info:
        load_checkpoint(root, notice=lambda message: None)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_tensor_is_named_with_the_shard_that_should_hold_it(bad_dir):
    name = "layers.2.attn.compressor.ape"
    shard = _shard_of(bad_dir, name)
    _edit_shard(bad_dir, shard, lambda t: t.pop(name))
    message = _load_error(bad_dir)
    assert name in message and shard in message and "missing" in message


def test_unexpected_tensor_is_named_with_its_file(bad_dir):
    shard = "model-00001-of-00003.safetensors"
    _edit_shard(bad_dir, shard, lambda t: t.update({"layers.0.attn.surprise": torch.zeros(3)}))
    message = _load_error(bad_dir)
    assert "layers.0.attn.surprise" in message and shard in message and "unexpected" in message


def test_wrong_shape_is_named_with_file_and_both_shapes(bad_dir):
    name = "layers.1.attn.wq_b.scale"
    shard = _shard_of(bad_dir, name)
    _edit_shard(bad_dir, shard, lambda t: t.update({name: t[name][:1].contiguous()}))
    message = _load_error(bad_dir)
    assert name in message and shard in message and "[1, 1]" in message and "[4, 1]" in message


def test_wrong_dtype_is_named_with_file_and_both_dtypes(bad_dir):
    name = "layers.3.ffn_norm.weight"
    shard = _shard_of(bad_dir, name)
    _edit_shard(bad_dir, shard, lambda t: t.update({name: t[name].float()}))
    message = _load_error(bad_dir)
    assert name in message and shard in message and "F32" in message and "BF16" in message


def test_truncated_shard_is_named(bad_dir):
    shard = bad_dir / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    message = _load_error(bad_dir)
    assert shard.name in message and "truncated" in message


def test_missing_shard_is_named(bad_dir):
    (bad_dir / "model-00003-of-00003.safetensors").unlink()
    message = _load_error(bad_dir)
    assert "model-00003-of-00003.safetensors" in message and INDEX_FILE in message


def test_corrupt_config_json_is_named(bad_dir):
    (bad_dir / "config.json").write_text('{"dim": 256,')
    assert "config.json" in _load_error(bad_dir)


def test_corrupt_index_is_named(bad_dir):
    (bad_dir / INDEX_FILE).write_text("[]")
    assert INDEX_FILE in _load_error(bad_dir)


def test_nan_e8m0_scale_is_named_with_its_file(bad_dir):
    name = "layers.1.ffn.experts.3.w2.scale"
    shard = _shard_of(bad_dir, name)

    def poison(tensors):
        codes = tensors[name].view(torch.uint8).clone()
        codes[0, 0] = 255
        tensors[name] = codes.view(E8M0)
    _edit_shard(bad_dir, shard, poison)
    message = _load_error(bad_dir)
    assert name in message and shard in message and "NaN" in message


def test_shards_must_be_between_one_and_the_tensor_count(tmp_path):
    with pytest.raises(DSV4Error, match="shards"):
        write_checkpoint(preset("tiny"), tmp_path, shards=0)


# -- formats ----------------------------------------------------------------------------------------------------------
def test_all_16_fp4_codes_unpack_low_nibble_first():
    packed = torch.tensor([lo | (hi << 4) for lo, hi in zip(range(0, 16, 2), range(1, 16, 2))], dtype=torch.uint8)
    values = unpack_fp4(packed.view(torch.int8))
    table = [0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6]
    assert values.tolist() == table
    assert torch.signbit(values).tolist() == [i >= 8 for i in range(16)]   # code 8 is -0
    assert unpack_fp4(torch.tensor([0x70], dtype=torch.uint8).view(torch.int8)).tolist() == [0.0, 6.0]


@pytest.mark.parametrize("x, expected", [
    (448.0, 448.0), (-448.0, -448.0), (1000.0, 448.0),
    (2.0 ** -9, 2.0 ** -9),                   # smallest subnormal
    (2.0 ** -10, 0.0), (1.5 * 2.0 ** -9, 2.0 ** -8),   # halfway between subnormals: to even
    (1.0625, 1.0), (1.1875, 1.25),            # halfway between normals: to the even mantissa
    (432.0, 448.0), (-1.0625, -1.0),
])
def test_e4m3_edge_values_round_to_nearest_even(x, expected):
    assert to_e4m3(torch.tensor([x])).float().item() == expected


def test_e4m3_keeps_the_sign_of_zero():
    zeros = to_e4m3(torch.tensor([0.0, -0.0])).float()
    assert zeros.tolist() == [0.0, 0.0] and torch.signbit(zeros).tolist() == [False, True]


def test_e8m0_round_trips_every_power_of_two_from_2_pow_minus_127_to_2_pow_127():
    exponents = torch.arange(-127, 128)
    scales = torch.pow(2.0, exponents.double()).float()
    codes = float_to_e8m0(scales)
    assert codes.dtype == E8M0
    assert torch.equal(codes.view(torch.uint8).long(), exponents + 127)
    assert torch.equal(e8m0_to_float(codes), scales)
    assert torch.equal(codes.float(), scales)   # agrees with torch's own e8m0 decoding
