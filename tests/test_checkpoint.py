"""HF-format checkpoints: sharding, FP8 block dequantization, and clear errors on bad folders."""

import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

import nanoseek
from conftest import randomize_
from nanoseek import CheckpointError, ConfigError, checkpoint, kernels
from nanoseek.checkpoint import dequantize_fp8, shard_map
from nanoseek.quant import FAST_INT4_ROWS, NarrowLinear, fbgemm_int8
from nanoseek.model import build_model, get_preset


@pytest.fixture
def saved(tmp_path):
    model = build_model(get_preset("tiny")).eval()
    randomize_(model)
    nanoseek.save_model(model, tmp_path / "m")
    return model, tmp_path / "m"


def logits(model, seed=1):
    x = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x).logits


def test_round_trip_single_file(saved):
    model, path = saved
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.tmp"))
    # readable as the config beside it is (safetensors itself writes 0600: others could not read a model)
    assert (path / "model.safetensors").stat().st_mode & 0o777 == (path / "config.json").stat().st_mode & 0o777
    torch.testing.assert_close(logits(nanoseek.load_model(path)), logits(model), atol=0, rtol=0)


def test_round_trip_sharded(tmp_path):
    model = build_model(get_preset("tiny")).eval()
    randomize_(model)
    nanoseek.save_model(model, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    torch.testing.assert_close(logits(nanoseek.load_model(tmp_path)), logits(model), atol=0, rtol=0)
    nanoseek.save_model(model, tmp_path)  # re-saving unsharded replaces the shards and the index
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_dtype_on_load(saved):
    _, path = saved
    model = nanoseek.load_model(path, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


def test_the_compute_dtype_follows_the_machine(saved, monkeypatch):
    """Small models compute in fp32; larger ones in the checkpoint's bf16 only where this CPU multiplies bf16
    fast, else in fp32: quantized weights stay integers, a bf16 model's linear weights stay bf16 (NarrowLinear),
    with logits that match the same weights widened to fp32."""
    _, path = saved
    nanoseek.save_model(nanoseek.load_model(path, dtype=torch.bfloat16), path)
    assert checkpoint.inference_dtypes(path) == (torch.float32, None)  # under 1 GB
    size = checkpoint.checkpoint_bytes(path)
    monkeypatch.setattr(checkpoint, "checkpoint_bytes", lambda p: int(3e9))  # as large as R1-Distill-1.5B
    assert checkpoint.inference_dtypes(path, None, fast_bf16=True) == (None, None)  # AMX / AVX-512 bf16
    # int8 through fbgemm computes in fp32 (its kernels' own dtype) even there; so does int4 through nanoseek's
    # kernel, its prompts multiplying in bf16
    int8 = (torch.float32, None) if fbgemm_int8() else (None, None)
    assert checkpoint.inference_dtypes(path, "int8", fast_bf16=True) == int8
    own_int4 = kernels.int4_isa() > 0 and kernels.library() is not None
    int4 = (torch.float32, torch.bfloat16) if own_int4 else (None, None)
    assert checkpoint.inference_dtypes(path, "int4", fast_bf16=True) == int4
    if own_int4:
        model = nanoseek.load_model(path, dtype=torch.float32, quantize="int4", weight_dtype=torch.bfloat16)
        layer = model.lm_head
        assert layer.bits == 4 and layer.convert_dtype == torch.bfloat16
        x = torch.randn(FAST_INT4_ROWS + 1, layer.in_features)  # a prompt: the weight converted, in bf16
        with torch.no_grad():
            want = (x.bfloat16() @ layer.dequantize(torch.bfloat16).t()).float()
            assert layer(x).dtype == torch.float32
            torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
    assert checkpoint.inference_dtypes(path, "int4", fast_bf16=False) == (torch.float32, None)  # AVX2 only
    dtype, weight_dtype = checkpoint.inference_dtypes(path, fast_bf16=False)
    assert (dtype, weight_dtype) == (torch.float32, torch.bfloat16)
    narrow = nanoseek.load_model(path, dtype=dtype, weight_dtype=weight_dtype)
    wide = nanoseek.load_model(path, dtype=torch.float32)
    layers = [m for m in narrow.modules() if isinstance(m, NarrowLinear)]
    assert narrow.lm_head in layers and all(m.weight.dtype == torch.bfloat16 for m in layers)
    assert narrow.model.embed_tokens.weight.dtype == torch.float32
    x = torch.randint(0, narrow.config.vocab_size, (2, 12))
    with torch.no_grad():  # (experts that get a few tokens multiply them in bf16)
        torch.testing.assert_close(narrow(x).logits, wide(x).logits, atol=0.05, rtol=0.05)
        for row in x:  # one token: bf16 products everywhere
            torch.testing.assert_close(narrow(row[None, :1]).logits, wide(row[None, :1]).logits, atol=0.05, rtol=0.05)
    nanoseek.save_model(narrow, path / "again")
    assert all(torch.equal(a, b.float()) for a, b in zip(wide.state_dict().values(),
                                                        nanoseek.load_model(path / "again").state_dict().values()))
    monkeypatch.setattr(checkpoint, "checkpoint_bytes", lambda p: size)
    nanoseek.save_model(nanoseek.load_model(path, quantize="int8"), path)  # a quantized folder, stored
    monkeypatch.setattr(checkpoint, "checkpoint_bytes", lambda p: int(3e9))
    assert checkpoint.inference_dtypes(path, fast_bf16=False) == (torch.float32, None)
    assert checkpoint.inference_dtypes(path, fast_bf16=True) == int8  # the folder says int8


def quantize_fp8(w: torch.Tensor, block: int):
    """Block-wise e4m3 quantization as DeepSeek ships it: scale_inv = amax / 448 per block."""
    out, inp = w.shape
    rows, cols = -(-out // block), -(-inp // block)
    padded = torch.zeros(rows * block, cols * block)
    padded[:out, :inp] = w
    blocks = padded.view(rows, block, cols, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0  # (rows, cols)
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(rows * block, cols * block)[:out, :inp]
    return q.contiguous(), scale


FP8_NAMES = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
             "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("block", [16, 128])
def test_fp8_checkpoint_dequantizes_exactly_and_matches_transformers(tmp_path, block):
    cfg = get_preset("tiny", num_nextn_predict_layers=0, v_head_dim=12)  # o_proj in=48: partial 16-blocks
    model = build_model(cfg)
    randomize_(model)
    tensors, expected = {}, {}
    for name, t in model.state_dict().items():
        if name.endswith(".weight") and name.split(".")[-2] in FP8_NAMES and name.startswith("model.layers."):
            q, scale = quantize_fp8(t, block)
            tensors[name], tensors[name + "_scale_inv"] = q, scale
            expected[name] = dequantize_fp8(q, scale, (block, block))
        else:
            tensors[name] = t.clone()
            expected[name] = t
    # split across two shards, a weight and its scale in different files
    names = sorted(tensors)
    half = len(names) // 2
    shard_a = {k: tensors[k] for k in names[:half]}
    shard_b = {k: tensors[k] for k in names[half:]}
    save_file(shard_a, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(shard_b, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in shard_a}
    weight_map |= {k: "model-00002-of-00002.safetensors" for k in shard_b}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    raw = cfg.to_dict() | {"torch_dtype": "float32", "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [block, block]}}
    (tmp_path / "config.json").write_text(json.dumps(raw))

    loaded = nanoseek.load_model(tmp_path)
    state = loaded.state_dict()
    n_fp8 = 0
    for name, want in expected.items():
        assert torch.equal(state[name], want), name
        n_fp8 += name + "_scale_inv" in tensors
    assert n_fp8 >= 10
    # a spot check of the formula itself on one block element
    q, s = tensors["model.layers.0.self_attn.o_proj.weight"], tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    assert state["model.layers.0.self_attn.o_proj.weight"][20, 40] == q[20, 40].float() * s[20 // block, 40 // block]

    # transformers on the dequantized weights (a plain fp32 checkpoint) gives the same logits
    plain = tmp_path / "plain"
    plain.mkdir()
    save_file({k: v.contiguous() for k, v in expected.items()}, str(plain / "model.safetensors"))
    (plain / "config.json").write_text(json.dumps(cfg.to_dict() | {"torch_dtype": "float32"}))
    hf = transformers.AutoModelForCausalLM.from_pretrained(plain).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, hf(x).logits, atol=1e-4, rtol=0)


def test_missing_shard_is_named(tmp_path):
    model = build_model(get_preset("tiny"))
    nanoseek.save_model(model, tmp_path, max_shard_bytes=200_000)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        nanoseek.load_model(tmp_path)


def test_a_path_that_is_no_folder_says_so(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        nanoseek.load_model(tmp_path / "nosuch")
    nanoseek.save_model(build_model(get_preset("tiny")), tmp_path / "m")
    with pytest.raises(CheckpointError, match=r"a file; give the model's folder \(.*m\)"):
        nanoseek.load_model(tmp_path / "m" / "config.json")


def test_the_forward_refuses_token_ids_past_the_vocabulary_and_an_empty_sequence():
    model = build_model(get_preset("tiny")).eval()
    V = model.config.vocab_size
    for bad, text in ((torch.tensor([[1, V]]), f"in \\[0, {V}\\)"), (torch.tensor([[-1]]), "token ids"),
                      (torch.zeros(1, 0, dtype=torch.long), "at least one token")):
        with pytest.raises(ValueError, match=text):
            model(bad)


def test_a_folder_of_pytorch_pickles_says_so(tmp_path):
    model = build_model(get_preset("tiny"))
    nanoseek.save_model(model, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or .*index\.json$"):
        nanoseek.load_model(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin is a PyTorch pickle.*convert it to safetensors"):
        nanoseek.load_model(tmp_path)


def test_truncated_shard_is_detected(saved):
    _, path = saved
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        nanoseek.load_model(path)


@pytest.mark.parametrize("damage", ["truncated", "zeros"])
def test_a_damaged_shard_of_many_is_named_before_loading(tmp_path, damage):
    """Found by a user: `nanoseek info` read only the index of a sharded folder, so a half-copied shard passed it
    (a single file did not); every shard's header is read now, by info and loading alike."""
    nanoseek.save_model(build_model(get_preset("tiny")), tmp_path, max_shard_bytes=200_000)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2] if damage == "truncated" else bytes(100))
    with pytest.raises(CheckpointError, match=f"{victim.name}: unreadable or truncated"):
        shard_map(tmp_path)


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(cfg | changes))


def test_wrong_shape_names_the_tensor(saved):
    _, path = saved
    edit_config(path, intermediate_size=200)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight.*shape"):
        nanoseek.load_model(path)


def test_missing_tensor_is_reported(tmp_path, saved):
    model, path = saved
    state = {k: v.clone() for k, v in model.state_dict().items() if "kv_b_proj" not in k}
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing.*kv_b_proj"):
        nanoseek.load_model(path)


def test_a_layer_count_that_disagrees_with_the_checkpoint_is_named(saved):
    """num_hidden_layers raised by one reads the MTP layer as a main layer: the error says so (it warned that the
    checkpoint had no MTP weights, then listed missing tensors)."""
    model, path = saved
    assert model.config.num_nextn_predict_layers > 0
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"num_hidden_layers {config['num_hidden_layers']}.*MTP layer"):
        nanoseek.load_model(path)


def test_unknown_architecture(saved):
    _, path = saved
    edit_config(path, model_type="mistral", architectures=["MistralForCausalLM"])
    with pytest.raises(ConfigError, match="unknown architecture"):
        nanoseek.load_model(path)


def test_a_missing_shape_field_is_named_and_a_dtype_key_of_either_name_is_read(saved):
    import json

    from typer.testing import CliRunner

    from nanoseek.cli import app

    _, path = saved
    raw = json.loads((path / "config.json").read_text())
    dtype = raw.pop("torch_dtype")
    (path / "config.json").write_text(json.dumps({**raw, "dtype": dtype}))  # as transformers 5 writes it
    r = CliRunner().invoke(app, ["info", str(path)])
    assert r.exit_code == 0 and f"({dtype} weights)" in r.output, r.output
    del raw["num_hidden_layers"]
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="num_hidden_layers missing"):
        nanoseek.load_model(path)
    r = CliRunner().invoke(app, ["info", str(path)])
    assert r.exit_code == 2 and "num_hidden_layers missing" in r.output, r.output


def test_config_field_out_of_range(saved):
    _, path = saved
    edit_config(path, topk_group=7)
    with pytest.raises(ConfigError, match="topk_group"):
        nanoseek.load_model(path)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        nanoseek.load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(get_preset("tiny").to_dict()))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        nanoseek.load_model(tmp_path)
    # JSON, but not an object of settings: said in one line (it was an AttributeError)
    from typer.testing import CliRunner

    from nanoseek.cli import app

    for value in ([1, 2], "a string"):
        (tmp_path / "config.json").write_text(json.dumps(value))
        r = CliRunner().invoke(app, ["info", str(tmp_path)])
        assert r.exit_code == 2 and "a JSON object of the model's settings expected" in " ".join(r.output.split()), r.output


def test_unreadable_tokenizer_files_are_named(tmp_path):
    """A corrupt tokenizer.json (it was the tokenizers library's bare Exception) or a tokenizer_config.json
    that is not an object: one line naming the file."""
    from nanoseek.tokenizer import DeepSeekTokenizer

    (tmp_path / "tokenizer.json").write_text("garbage")
    with pytest.raises(ValueError, match="tokenizer.json: not a tokenizer"):
        DeepSeekTokenizer.load(tmp_path)
    DeepSeekTokenizer.train(["some text to learn from, some text"], vocab_size=300).save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[]")
    with pytest.raises(ValueError, match="tokenizer_config.json: a JSON object expected, not a list"):
        DeepSeekTokenizer.load(tmp_path)


def test_a_layout_transformers_misreads_is_saved_with_a_warning_and_swish_is_silu(tmp_path):
    """transformers' DeepSeek models ignore moe_layer_freq: a folder of such a model loads there with random experts in
    its dense layers, so saving one warns (nanoseek reads it back as it is). "swish" is transformers' other name for
    SiLU."""
    model = build_model(get_preset("tiny", moe_layer_freq=2, first_k_dense_replace=0, hidden_act="swish"))
    with pytest.warns(UserWarning, match="transformers ignores moe_layer_freq"):
        nanoseek.save_model(model, tmp_path / "m")
    again = nanoseek.load_model(tmp_path / "m")
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(again(ids).logits, model(ids).logits)
