"""Weight-only int8 / int4 quantization: the fast kernels against the plain dequantize path, quantized
logits against the float model's (KL, greedy agreement) on random models and the shipped model, and
quantized folders that load without re-quantizing."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import nanoseek
from conftest import operator_calls, randomize_, tiny_gqa_config
from nanoseek.cli import SHIPPED, app
from nanoseek.inference import Engine, SamplingParams
from nanoseek.model import build_model, get_preset
from nanoseek.model.moe import MoE
from nanoseek import kernels, quant
from nanoseek.quant import KERNEL_ROWS, NARROW_KERNEL_ROWS, NARROW_ROWS, NarrowLinear, QuantLinear
from nanoseek.tokenizer import DeepSeekTokenizer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int8_codes_fit_the_scales_as_stored(dtype):
    """Every weight within half a step of its code at the scale the layer holds (in a bf16 layer the codes had been
    fitted to the fp32 scale, then the scale rounded: rows up to 0.2% off, a folder not the model quantized on load)."""
    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.rand(64, 1) * 3
    layer = QuantLinear(96, 64, 8, dtype=dtype)
    layer.quantize_(w)
    step = layer.scales.float()[:, None]
    assert ((layer.codes().float() * step - w).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 3, KERNEL_ROWS[4] + 5])
def test_kernels_equal_the_dequantized_reference(bits, rows):
    layer = QuantLinear(256, 128, bits, bias=True)
    w = torch.randn(128, 256) * 0.05
    layer.quantize_(w)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, rows, 256)
    ref = x @ layer.dequantize().t() + layer.bias.float()
    out = layer(x)
    assert out.shape == (2, rows, 128) and out.dtype == x.dtype
    torch.testing.assert_close(out, ref, atol=0.03, rtol=0.02)  # bf16 activations in the kernels
    err = (layer.dequantize() - w).abs()
    step = w.abs().amax(1, keepdim=True) / 127 if bits == 8 else (w.amax() - w.amin()) / 15
    # rounding to the nearest code is at most half a step off; the bf16 scales and zeros add a little
    assert (err <= 0.75 * step + w.abs().amax() / 256).all()
    assert err.mean() < 0.3 * step.mean()


@pytest.mark.parametrize("bits, out_features, packed", [(8, 200, False), (4, 200, False), (4, 192, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_rows_convert_the_weight_block_by_block(monkeypatch, bits, out_features, packed, dtype):
    """Prompts (more rows than the kernels take) multiply by the weight converted 64 output channels at a
    time here (a last, partial block too; int4 also read out of the kernel's layout): the same as the
    whole dequantized weight. (int8 as where fbgemm and nanoseek's int8 kernel are missing: with either, an fp32
    prompt's every row takes the kernel.)"""
    monkeypatch.setattr(quant, "CONVERT_WEIGHTS", 64 * 256)
    monkeypatch.setattr(quant, "fbgemm_int8", lambda: False)
    monkeypatch.setattr(quant, "int8_available", lambda *args: False)
    monkeypatch.setattr(quant, "int4_available", lambda *args: False)  # torch's int4 kernel and its layout
    layer = QuantLinear(256, out_features, bits, dtype=dtype)
    layer.quantize_(torch.randn(out_features, 256) * 0.05)
    if packed:
        layer(torch.randn(1, 256, dtype=dtype))  # a kernel call puts the codes in the kernel's layout
        assert layer._kernel_layout
    x = torch.randn(3, 70, 256, dtype=dtype)
    out = layer(x)
    assert out.shape == (3, 70, out_features) and out.dtype == dtype and out.is_contiguous()
    ref = x.float() @ layer.dequantize().t()
    torch.testing.assert_close(out.float(), ref, **({} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}))


@pytest.mark.parametrize("rows", [1, NARROW_ROWS, NARROW_ROWS + 1, NARROW_KERNEL_ROWS // 2, 70])
@pytest.mark.parametrize("kernel", [True, False])
def test_narrow_linear_keeps_bf16_weights_under_fp32_activations(monkeypatch, rows, kernel):
    """A few rows go through nanoseek's kernel (fp32 products of the widened weight: the fp32 product) or, where it does
    not run, multiply in bf16; more convert the bf16 weight to fp32 block by block: exactly the fp32 product."""
    if kernel and not kernels.float_linear_available():
        pytest.skip("nanoseek's float kernel does not run here")
    monkeypatch.setattr(quant, "CONVERT_WEIGHTS", 64 * 256)
    monkeypatch.setattr(quant, "float_linear_available", lambda: kernel)
    layer = NarrowLinear(256, 200, bias=True, dtype=torch.bfloat16)
    x = torch.randn(2, rows, 256)
    with torch.no_grad():  # (a gradient wanted: autograd's product of the widened weight)
        calls = operator_calls(lambda: layer(x))
        out = layer(x)
    ref = x @ layer.weight.float().t() + layer.bias.float()
    assert out.dtype == torch.float32 and out.shape == (2, rows, 200) and layer.weight.dtype == torch.bfloat16
    assert calls == ({"nanoseek::float_linear": 1} if kernel and 2 * rows <= NARROW_KERNEL_ROWS else {})
    if not kernel and 2 * rows <= NARROW_ROWS:
        torch.testing.assert_close(out, ref, atol=0.05, rtol=0.02)
    else:
        torch.testing.assert_close(out, ref)
    torch.testing.assert_close(layer(x.bfloat16()), x.bfloat16() @ layer.weight.t() + layer.bias, atol=0.02, rtol=0.02)
    layer.requires_grad_(False)  # frozen weights, a gradient wanted to the activations: autograd's product, with one
    x.requires_grad_(True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.weight.float().sum(0).expand_as(x))


def test_the_compiled_moe_path_takes_narrow_weights(tmp_path):
    """The compiled decode step's MoE (every expert as one wide MLP over stacked weights, or each token's
    chosen experts picked from them) on a model whose linear weights stay bf16 under fp32 activations:
    the same as the routed experts."""
    model = build_model(get_preset("tiny")).eval()
    randomize_(model)
    nanoseek.save_model(model.to(torch.bfloat16), tmp_path)
    narrow = nanoseek.load_model(tmp_path, dtype=torch.float32, weight_dtype=torch.bfloat16)
    moe = next(m for m in narrow.modules() if isinstance(m, MoE))
    moe.prepare_compiled_decode()
    x = torch.randn(16, narrow.config.hidden_size)
    with torch.no_grad():
        weights, indices, _ = moe.gate(x)
        routed = moe.routed(x, weights, indices) + moe.shared_experts(x)
        for run in (moe.all_experts, moe.selected_experts):
            out = run(x, weights, indices)
            assert out.dtype == torch.float32
            torch.testing.assert_close(out, routed, atol=0.02, rtol=0.02)  # the routed experts see few rows: bf16


def test_int4_codes_round_trip_through_the_packed_bytes():
    layer = QuantLinear(64, 64, 4)
    layer.quantize_(torch.randn(64, 64))
    codes = layer.codes()
    assert codes.min() >= 0 and codes.max() <= 15
    assert torch.equal(layer.qweight, (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8))


def kl_and_agreement(float_model, quant_model, x):
    with torch.no_grad():
        p = float_model(x).logits.float().log_softmax(-1)
        q = quant_model(x).logits.float().log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    agree = (p.argmax(-1) == q.argmax(-1)).float().mean().item()
    return kl, agree


def family_config(family: str):
    """The tiny DeepSeek-V3 (MLA), a tiny Qwen2 (GQA) or a tiny Qwen3 (GQA, per-head q/k norms, which stay float)."""
    return {"mla": lambda: get_preset("tiny"), "gqa": tiny_gqa_config,
            "qwen3": lambda: tiny_gqa_config(model_type="qwen3", head_dim=24)}[family]()


@pytest.mark.parametrize("family", ["mla", "gqa", "qwen3"])
def test_quantized_random_models_stay_close_to_float(tmp_path, family):
    config = family_config(family)
    model = build_model(config).eval()
    randomize_(model, std=0.1)
    nanoseek.save_model(model, tmp_path)
    x = torch.randint(0, config.vocab_size, (4, 48))
    # measured over 3 seeds: int8 KL 1e-4..4e-3, agreement 0.94-0.99; int4 KL 0.02..0.05 (a random model's
    # next-token distribution is nearly flat, so int4's greedy agreement says little here: see the shipped model)
    for bits, max_kl, min_agree in ((8, 0.01, 0.9), (4, 0.1, 0.0)):
        quant = nanoseek.load_model(tmp_path, quantize=f"int{bits}")
        layers = [m for m in quant.modules() if isinstance(m, QuantLinear)]
        assert layers and quant.lm_head in layers and all(m.bits == bits for m in layers)
        kl, agree = kl_and_agreement(model, quant, x)
        assert kl < max_kl and agree >= min_agree, (bits, kl, agree)
        # called as `nanoseek.load_model(...)(ids)` is, outside no_grad (a long prompt takes the converted path)
        with torch.no_grad():
            want = quant(x).logits
        assert torch.equal(quant(x).logits.detach(), want)


def test_the_shipped_model_quantized_keeps_its_predictions():
    """On trained weights (the shipped chat model, on held-out task conversations): measured int8 KL
    4.7e-4 with 98% of greedy tokens the same where its activations are quantized too (fbgemm, VNNI;
    1.5e-5 and all the same with weight-only int8), int4 KL 0.0023 with 97% the same."""
    from nanoseek.data.tasks import get_task

    tok = DeepSeekTokenizer.load(SHIPPED)
    chats = [get_task(f).conversation(p) for f in ("add", "sub", "mul", "countdown") for p in get_task(f).heldout(4)]
    ids = [tok.render_conversation(c)[0] for c in chats]
    x = torch.tensor([i[: min(map(len, ids))] for i in ids])
    model = nanoseek.load_model(SHIPPED, dtype=torch.float32)
    for bits, max_kl, min_agree in ((8, 2e-3, 0.96), (4, 0.02, 0.9)):
        kl, agree = kl_and_agreement(model, nanoseek.load_model(SHIPPED, dtype=torch.float32, quantize=bits), x)
        assert kl < max_kl and agree >= min_agree, (bits, kl, agree)


def test_quantized_folders_load_without_requantizing(tmp_path, monkeypatch):
    model = build_model(get_preset("tiny")).eval()
    randomize_(model)
    nanoseek.save_model(model, tmp_path / "float")
    for bits in (8, 4):
        quant = nanoseek.load_model(tmp_path / "float", quantize=bits)
        nanoseek.save_model(quant, tmp_path / f"int{bits}")
        config = json.loads((tmp_path / f"int{bits}" / "config.json").read_text())
        assert config["quantization_config"] == {"quant_method": "nanoseek", "bits": bits, "group_size": 32,
                                                 **({"int4_format": 2} if bits == 4 else {})}
        with monkeypatch.context() as m:
            m.setattr(QuantLinear, "quantize_", lambda *a: pytest.fail("re-quantized a quantized folder"))
            again = nanoseek.load_model(tmp_path / f"int{bits}")
        x = torch.randint(0, 512, (2, 12))
        with torch.no_grad():
            assert torch.equal(again(x).logits, quant(x).logits)
        with pytest.raises(nanoseek.CheckpointError, match=f"holds int{bits}"):
            nanoseek.load_model(tmp_path / f"int{bits}", quantize=12 - bits)
    with pytest.raises(ValueError, match="int8 or int4"):
        nanoseek.load_model(tmp_path / "float", quantize="int3")
    # a folder an earlier nanoseek wrote (bf16 scales and zeros, no int4_format): refused with what to do
    config = json.loads((tmp_path / "int4" / "config.json").read_text())
    del config["quantization_config"]["int4_format"]
    (tmp_path / "int4" / "config.json").write_text(json.dumps(config))
    with pytest.raises(nanoseek.CheckpointError, match="earlier nanoseek format.*nanoseek quantize"):
        nanoseek.load_model(tmp_path / "int4")


def test_int4_folders_holding_kv_b_in_float_load_with_it_quantized(tmp_path):
    """An int4 folder written before MLA's kv_b_proj was quantized (its weight stored in float beside the other
    layers' codes) loads with kv_b_proj quantized as it is read: the codes quantizing that weight gives, and the
    logits of the folder written now. A latent width the operator does not take (not a multiple of 64) keeps it
    float in the folder and in memory."""
    from safetensors.torch import load_file, save_file

    model = build_model(get_preset("tiny", kv_lora_rank=64)).eval()
    randomize_(model)
    nanoseek.save_model(model, tmp_path / "float")
    quant = nanoseek.load_model(tmp_path / "float", quantize=4)
    nanoseek.save_model(quant, tmp_path / "int4")
    state = load_file(tmp_path / "int4" / "model.safetensors")
    floats = {k: v for k, v in load_file(tmp_path / "float" / "model.safetensors").items() if "kv_b_proj" in k}
    assert floats and all(k.removesuffix(".weight") + ".qweight" in state for k in floats)
    for k, w in floats.items():  # the earlier folder: kv_b_proj's weight as the float model held it
        for suffix in ("qweight", "scales", "zeros", "units"):
            del state[k.removesuffix("weight") + suffix]
        state[k] = w
    save_file(state, tmp_path / "int4" / "model.safetensors", metadata={"format": "pt"})
    earlier = nanoseek.load_model(tmp_path / "int4")
    for name, w in floats.items():
        layer = earlier.get_submodule(name.removesuffix(".weight"))
        want = QuantLinear(w.shape[1], w.shape[0], 4)
        want.quantize_(w)
        assert isinstance(layer, QuantLinear) and torch.equal(layer.qweight, want.qweight)
    x = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        assert torch.equal(earlier(x).logits, quant(x).logits)
    narrow = build_model(get_preset("tiny", kv_lora_rank=96)).eval()
    nanoseek.save_model(narrow, tmp_path / "float96")
    quant96 = nanoseek.load_model(tmp_path / "float96", quantize=4)
    assert not any(isinstance(m.self_attn.kv_b_proj, QuantLinear) for m in quant96.model.layers)


def test_fp8_checkpoint_goes_straight_to_int8(tmp_path):
    """An FP8 (128x128 block-scaled) weight is dequantized tensor by tensor and quantized to int8: the
    result equals int8 of the dequantized weight."""
    from safetensors.torch import load_file, save_file

    from nanoseek.checkpoint import dequantize_fp8

    model = build_model(get_preset("tiny")).eval()
    randomize_(model)
    nanoseek.save_model(model, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    w = state[name]
    scale = w.abs().amax().reshape(1, 1) / 448
    state[name] = (w / scale).to(torch.float8_e4m3fn)
    state[name + "_scale_inv"] = scale
    save_file(state, tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    quant = nanoseek.load_model(tmp_path, quantize="int8")
    got = quant.model.layers[1].mlp.experts[3].up_proj
    expected = QuantLinear(w.shape[1], w.shape[0], 8, dtype=got.scales.dtype)
    expected.quantize_(dequantize_fp8(state[name], scale))
    assert torch.equal(got.codes(), expected.codes()) and torch.equal(got.scales, expected.scales)


@pytest.mark.parametrize("family", ["mla", "gqa", "qwen3"])
def test_the_engine_decodes_quantized_models(tmp_path, family):
    """Cached decoding of a quantized model (kernels at 1 row, dequantized weights for the prefill)
    gives the tokens of full forwards of the same quantized model."""
    config = family_config(family)
    model = build_model(config).eval()
    randomize_(model, std=0.15)
    nanoseek.save_model(model, tmp_path)
    quant = nanoseek.load_model(tmp_path, quantize="int8", dtype=torch.float32)
    prompt = torch.randint(0, config.vocab_size, (12,)).tolist()
    req = Engine(quant, max_batch=2, eos_token_id=-1).generate([prompt], SamplingParams(max_new_tokens=8, temperature=0))[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(quant(torch.tensor([ids])).logits[0, -1].argmax()))
    agree = sum(a == b for a, b in zip(req.tokens, ids[len(prompt):]))
    assert agree >= 7  # kernel (bf16 activations) and dequantized fp32 paths may part at a near tie


@pytest.mark.parametrize("arch,bits", [("dense", 8), ("dense", 4), ("dense", 16), ("moe", 8), ("moe", 4)])
def test_compiled_decoding_of_a_quantized_model_equals_eager(tmp_path, arch, bits):
    """A quantized (or bf16) model decodes through one compiled graph (fbgemm's packed int8 product
    reached through the `nanoseek::int8_linear` operator, torch's int4 kernel directly, bf16 one-row
    products through `nanoseek::mv`, an MoE's quantized routed experts through `nanoseek::routed_experts`, or
    int4 ones through `nanoseek::int4_experts`)
    with eager's tokens and log-probabilities, at one row and at several."""
    config = (tiny_gqa_config(hidden_size=128, intermediate_size=256) if arch == "dense" else
              get_preset("tiny", hidden_size=128, moe_intermediate_size=64))
    model = build_model(config).eval()
    randomize_(model, std=0.15)
    nanoseek.save_model(model, tmp_path)
    quantized = (nanoseek.load_model(tmp_path, dtype=torch.bfloat16) if bits == 16 else
                 nanoseek.load_model(tmp_path, quantize=f"int{bits}", dtype=torch.float32))
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (9, 5)]
    params = SamplingParams(max_new_tokens=6, temperature=0, logprobs=True)
    results, routed = {}, []
    for moe in (m for m in quantized.modules() if isinstance(m, MoE)):
        moe.routed = lambda *a, moe=moe, run=moe.routed: routed.append(moe) or run(*a)
    for compile in (False, True):  # (an fp32 cache: an fp16 one turns the graphs' last-bit differences into its rounding's)
        engine = Engine(quantized, max_batch=2, eos_token_id=-1, compile=compile, kv_cache_dtype="fp32")
        routed.clear()
        results[compile] = [engine.generate(p, params) for p in (prompts[:1], prompts)]
        assert engine.compiled == compile  # (a failed compile falls back to eager with a warning)
    # the graphs called the routed experts as they are: int4 ones with the shared ones in one C++ operator
    one_operator = arch == "moe" and bits == 4 and kernels.int4_experts_available()
    assert (len(routed) > 0) == (arch == "moe" and not one_operator)
    if one_operator:
        assert operator_calls(lambda: engine.generate(prompts, params)).get("nanoseek::int4_experts")
    if bits == 8 and quant.fbgemm_int8():
        assert all(m._packed is not None for m in quantized.modules() if isinstance(m, QuantLinear))
    elif bits == 8 and kernels.int8_available(128):  # AVX2 without VNNI: nanoseek's int8 kernel, from the graph too
        assert operator_calls(lambda: engine.generate(prompts, params)).get("nanoseek::int8_avx2_linear")
    for eager, compiled in zip(results[False], results[True]):
        for a, b in zip(eager, compiled):
            assert a.tokens == b.tokens
            torch.testing.assert_close(torch.tensor([x["logprob"] for x in a.logprobs]),
                                       torch.tensor([x["logprob"] for x in b.logprobs]),
                                       atol=2e-3 if bits < 16 else 0.15, rtol=0)  # bf16: 2-3% apart


@pytest.mark.slow
def test_the_shipped_model_answers_the_same_quantized_to_int8():
    """The shipped chat model, greedy, on held-out task questions: int8 gives the float model's answers."""
    from nanoseek.data.tasks import get_task
    from nanoseek.reasoning import split_reasoning

    tok = DeepSeekTokenizer.load(SHIPPED)
    questions = [p.question for family in ("add", "sub", "mul") for p in get_task(family).heldout(8)]
    prompts = [tok.render_prompt([{"role": "user", "content": q}]) for q in questions]
    params = SamplingParams(max_new_tokens=160, temperature=0)
    answers = {}
    for quantize in (None, "int8"):
        model = nanoseek.load_model(SHIPPED, dtype=torch.float32, quantize=quantize)
        reqs = Engine(model, decode=tok.decode, max_batch=24, eos_token_id=tok.eos_id).generate(prompts, params)
        answers[quantize] = [split_reasoning(r.text)[1] for r in reqs]
    same = sum(a == b for a, b in zip(answers[None], answers["int8"]))
    assert same >= 0.9 * len(questions), (same, len(questions))


def test_quantize_command_writes_a_loadable_folder(tmp_path):
    model = build_model(get_preset("tiny")).eval()
    randomize_(model)
    nanoseek.save_model(model, tmp_path / "in")
    DeepSeekTokenizer.load(SHIPPED).save(tmp_path / "in")
    shutil.copy(SHIPPED / "examples.json", tmp_path / "in")
    result = CliRunner().invoke(app, ["quantize", str(tmp_path / "in"), str(tmp_path / "out"), "--bits", "4"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert (tmp_path / "out" / "examples.json").read_text() == (SHIPPED / "examples.json").read_text()  # the web app's
    out = Path(tmp_path / "out" / "model.safetensors").stat().st_size
    assert out < 0.6 * (tmp_path / "in" / "model.safetensors").stat().st_size
    assert isinstance(nanoseek.load_model(tmp_path / "out").lm_head, QuantLinear)
    bad = CliRunner().invoke(app, ["quantize", str(tmp_path / "in"), str(tmp_path / "x"), "--bits", "3"])
    assert bad.exit_code == 2 and "'--bits'" in bad.output and "'8', '4'" in bad.output
    again = CliRunner().invoke(app, ["quantize", str(tmp_path / "in"), str(tmp_path / "out"), "--bits", "8"])
    assert again.exit_code == 2 and "already holds a model" in again.output and "--force" in again.output
    assert nanoseek.load_model(tmp_path / "out").lm_head.bits == 4  # untouched
    forced = CliRunner().invoke(app, ["quantize", str(tmp_path / "in"), str(tmp_path / "out"), "--bits", "8", "--force"])
    assert forced.exit_code == 0 and nanoseek.load_model(tmp_path / "out").lm_head.bits == 8, forced.output
    (tmp_path / "in" / "tokenizer.json").unlink()
    bare = CliRunner().invoke(app, ["quantize", str(tmp_path / "in"), str(tmp_path / "bare")])
    assert bare.exit_code == 0 and "has no tokenizer.json" in " ".join(bare.output.split()), bare.output
    forced = CliRunner().invoke(app, ["quantize", str(tmp_path / "in"), str(tmp_path / "out"), "--force"])
    assert forced.exit_code == 0 and not (tmp_path / "out" / "tokenizer.json").exists()  # not the replaced model's


def test_a_quantize_that_fails_midway_leaves_no_folder_that_loads(tmp_path, monkeypatch):
    """A full disk while the tokenizer files were copied (after the weights) had left a folder that loaded as a model
    without them, or with --force the replaced model's chat template beside the new weights."""
    model = build_model(get_preset("tiny")).eval()
    nanoseek.save_model(model, tmp_path / "in")
    DeepSeekTokenizer.load(SHIPPED).save(tmp_path / "in")
    assert CliRunner().invoke(app, ["quantize", str(tmp_path / "in"), str(tmp_path / "old"), "--bits", "4"]).exit_code == 0
    (tmp_path / "old" / "notes.txt").write_text("mine")
    before = {f.name: f.read_bytes() for f in (tmp_path / "old").iterdir()}
    copy = shutil.copy

    def full_disk(src, dst, *a, **k):
        if Path(src).name == "tokenizer_config.json":
            raise OSError(28, "No space left on device")
        return copy(src, dst, *a, **k)

    monkeypatch.setattr(shutil, "copy", full_disk)
    for out, extra in (("new", []), ("old", ["--force"])):
        r = CliRunner().invoke(app, ["quantize", str(tmp_path / "in"), str(tmp_path / out), "--bits", "8", *extra])
        assert r.exit_code == 2 and "No space left" in r.output and "nothing was written" in r.output, r.output
    assert not (tmp_path / "new").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in", "old"]
    assert {f.name: f.read_bytes() for f in (tmp_path / "old").iterdir()} == before  # the model it held, as it was
    monkeypatch.setattr(shutil, "copy", copy)
    r = CliRunner().invoke(app, ["quantize", str(tmp_path / "in"), str(tmp_path / "old"), "--bits", "8", "--force"])
    assert r.exit_code == 0 and nanoseek.load_model(tmp_path / "old").lm_head.bits == 8, r.output
    assert (tmp_path / "old" / "notes.txt").read_text() == "mine" and (tmp_path / "old" / "tokenizer_config.json").is_file()


def test_int4_is_held_once_in_the_kernel_layout_and_saved_in_the_documented_one(monkeypatch):
    monkeypatch.setattr(quant, "int4_available", lambda *args: False)  # torch's int4 kernel, as without nanoseek's
    layer = QuantLinear(96, 192, 4)
    layer.quantize_(torch.randn(192, 96))
    documented, reference = layer.qweight.clone(), layer.dequantize()
    layer(torch.randn(1, 96))  # the first kernel call rewrites qweight in the kernel's layout
    assert layer._kernel_layout and not torch.equal(layer.qweight, documented)
    assert torch.equal(layer.standard_qweight(), documented) and torch.equal(layer.dequantize(), reference)
    assert torch.equal(layer.state_dict()["qweight"], documented)
    torch.testing.assert_close(layer(torch.eye(96)[:2].unsqueeze(0)), reference.t()[:2].unsqueeze(0), atol=0.02, rtol=0.02)
    again = QuantLinear(96, 192, 4)
    again.load_state_dict(layer.state_dict())
    assert torch.equal(again.dequantize(), reference)


needs_fbgemm = pytest.mark.skipif(not quant.fbgemm_int8(), reason="no fbgemm int8 x int8 kernels here (not x86, or no VNNI)")


@needs_fbgemm
@pytest.mark.parametrize("rows", [1, 2, 9, 300])
def test_int8_products_quantize_each_row_on_its_own(rows):
    """fbgemm's int8 x int8 products with activations quantized per row: close to the dequantized weight's
    product for every row count (the kernel takes them all), and a row with massive activations (like a
    first token's) neither coarsens the other rows nor changes their results."""
    layer = QuantLinear(512, 320, 8, bias=True)
    layer.quantize_(torch.randn(320, 512) * 0.05)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(rows, 512)
    ref = x @ layer.dequantize().t() + layer.bias.float()
    out = layer(x)
    assert layer._packed is not None and layer.qweight.numel() == 0  # held once, packed
    err = (out - ref).norm(dim=1) / ref.norm(dim=1)
    assert err.max() < 0.02, err.max()  # 8-bit activations: about 0.4-0.9% per row
    if rows > 1:
        loud = x.clone()
        loud[0, :8] = 300.0
        out_loud = layer(loud)
        assert torch.equal(out_loud[1:], out[1:])
        assert ((out_loud[0] - (loud[0] @ layer.dequantize().t() + layer.bias)).norm() / out_loud[0].norm()) < 0.05


@needs_fbgemm
def test_int8_is_held_once_packed_and_saved_moved_and_reloaded_in_the_documented_layout():
    layer = QuantLinear(96, 130, 8)
    layer.quantize_(torch.randn(130, 96))
    documented, reference = layer.qweight.clone(), layer.dequantize()
    quant.prepare_kernels(layer)
    assert layer._packed is not None and layer.qweight.numel() == 0
    assert torch.equal(layer.codes(), documented) and torch.equal(layer.dequantize(), reference)
    assert torch.equal(layer.state_dict()["qweight"], documented)
    again = QuantLinear(96, 130, 8)
    quant.prepare_kernels(again)  # packed (empty) codes, then a checkpoint loads into it
    again.load_state_dict(layer.state_dict())
    assert again._packed is None and torch.equal(again.dequantize(), reference)
    layer.to(torch.float32)  # moved or cast: the codes come back out of the packed weight
    assert layer._packed is None and torch.equal(layer.qweight, documented)
    layer.quantize_(torch.randn(130, 96))  # re-quantizing a packed layer starts from its documented codes
    quant.prepare_kernels(layer)
    layer.quantize_(reference)
    assert layer._packed is None and torch.equal(layer.qweight, documented)


@needs_fbgemm
def test_int8_layers_all_pack_for_fbgemm_routed_experts_too(tmp_path):
    """Loaded int8 and prepared as serve does, every layer (attention, routed and shared experts, the head)
    is packed for fbgemm, and the MoE's routed experts then give what their dequantized weights give."""
    model = build_model(get_preset("tiny")).eval()
    randomize_(model)
    nanoseek.save_model(model, tmp_path)
    quantized = nanoseek.load_model(tmp_path, quantize="int8", dtype=torch.float32)
    moe = next(m for m in quantized.modules() if isinstance(m, MoE))
    x = torch.randn(5, quantized.config.hidden_size)
    with torch.no_grad():
        weights, indices, _ = moe.gate(x)
        reference = torch.zeros_like(x)
        for n, (w, e) in enumerate(zip(weights, indices)):
            for g, k in zip(w.tolist(), e.tolist()):
                expert = moe.experts[k]
                h = F.silu(x[n] @ expert.gate_proj.dequantize().t()) * (x[n] @ expert.up_proj.dequantize().t())
                reference[n] += g * (h @ expert.down_proj.dequantize().t())
        quant.prepare_kernels(quantized)
        layers = {name: m for name, m in quantized.named_modules() if isinstance(m, QuantLinear)}
        assert any(".experts." in name for name in layers) and any(".shared_experts." in name for name in layers)
        assert all(m._packed is not None and m.qweight.numel() == 0 for m in layers.values())
        # (outputs up to ~1.2; fbgemm quantizes the activations too: ~1% apart)
        torch.testing.assert_close(moe.routed(x, weights, indices), reference, atol=0.03, rtol=0)
        # one token (its experts in turn, each product one fbgemm call) agrees with the same reference
        torch.testing.assert_close(moe.routed(x[:1], weights[:1], indices[:1]), reference[:1], atol=0.03, rtol=0)
        layer = moe.experts[0].gate_proj
        for shape in [(layer.in_features,), (1, layer.in_features), (1, 1, layer.in_features)]:
            row = x[0].view(shape)
            assert layer(row).shape == (*shape[:-1], layer.out_features)
            torch.testing.assert_close(layer(row).view(-1), (x[0] @ layer.dequantize().t()), atol=0.03, rtol=0)
