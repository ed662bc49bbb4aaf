"""transformers is the oracle for DeepseekV3/V2 and the R1-Distill architectures (Qwen2, Qwen3, Llama): same
weights, same logits (fp32, 1e-4), both ways."""

import json

import pytest
import torch
import transformers

import nanoseek
from conftest import randomize_

YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8, "rope_theta": 10000.0}

BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=12, n_shared_experts=1, max_position_embeddings=256)

V3_CASES = {
    "qlora-groups-dense1": dict(q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                                first_k_dense_replace=1),
    "noqlora-group1-dense0": dict(q_lora_rank=None, n_routed_experts=6, num_experts_per_tok=3, n_group=1,
                                  topk_group=1, first_k_dense_replace=0, norm_topk_prob=False),
    "qlora-yarn-dense2": dict(q_lora_rank=16, n_routed_experts=8, num_experts_per_tok=3, n_group=2, topk_group=1,
                              first_k_dense_replace=2, rope_parameters=YARN, routed_scaling_factor=1.5),
    "noqlora-yarn-groups": dict(q_lora_rank=None, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                                topk_group=2, first_k_dense_replace=1, rope_parameters=dict(YARN, mscale=0.9)),
    "no-shared-experts": dict(q_lora_rank=None, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                              first_k_dense_replace=1, n_shared_experts=0),
    "tied-embeddings-halfsplit-rope": dict(q_lora_rank=24, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
                                           topk_group=2, first_k_dense_replace=1, tie_word_embeddings=True,
                                           rope_interleave=False),
}
V2_CASES = {
    "greedy-noqlora": dict(q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2, topk_method="greedy",
                           first_k_dense_replace=1, routed_scaling_factor=1.0, n_shared_experts=2),
    "group-limited-qlora-yarn": dict(q_lora_rank=24, n_routed_experts=12, num_experts_per_tok=3, n_group=4,
                                     topk_group=2, topk_method="group_limited_greedy", first_k_dense_replace=1,
                                     routed_scaling_factor=16.0, rope_parameters=dict(YARN, mscale_all_dim=0.707,
                                                                                     mscale=0.707)),
}

GQA_BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32, "rope_theta": 500000.0}
QWEN2_CASES = {
    "gqa2": dict(),
    "mha-tied-theta": dict(num_key_value_heads=4, tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                                            "rope_theta": 1e6}),
    "mqa-yarn": dict(num_key_value_heads=1, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                             "original_max_position_embeddings": 32}),
}
QWEN3_CASES = {  # DeepSeek-R1-0528-Qwen3-8B's architecture: q/k norms, head_dim apart from hidden / heads
    "gqa-headdim": dict(head_dim=24),
    # R1-0528-Qwen3-8B's YaRN carries vLLM's `attn_factor`, which transformers does not read
    "bias-tied-yarn": dict(attention_bias=True, tie_word_embeddings=True, num_key_value_heads=1,
                           rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                            "original_max_position_embeddings": 32, "attn_factor": 0.8782}),
}
LLAMA_CASES = {
    "llama3-rope": dict(rope_parameters=LLAMA3),
    "bias-headdim-tied": dict(attention_bias=True, mlp_bias=True, head_dim=24, tie_word_embeddings=True),
    "linear-rope-mqa": dict(num_key_value_heads=1, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                    "rope_theta": 1e4}),
}
FAMILIES = {  # kind -> (config class, model class, base fields)
    "v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, BASE),
    "v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM, BASE),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, GQA_BASE),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, GQA_BASE),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, GQA_BASE),
}


def hf_model(kind: str, overrides: dict):
    cls_cfg, cls, base = FAMILIES[kind]
    model = cls(cls_cfg(**{**base, **overrides})).eval()
    randomize_(model)
    return model


def inputs():
    return torch.randint(0, BASE["vocab_size"], (2, 40))  # 40 > original context 32: YaRN's ramp is exercised


CASES = ([("v3", n, c) for n, c in V3_CASES.items()] + [("v2", n, c) for n, c in V2_CASES.items()]
         + [("qwen2", n, c) for n, c in QWEN2_CASES.items()] + [("qwen3", n, c) for n, c in QWEN3_CASES.items()]
         + [("llama", n, c) for n, c in LLAMA_CASES.items()])


@pytest.mark.parametrize("kind,name,overrides", CASES, ids=[f"{k}-{n}" for k, n, _ in CASES])
def test_transformers_to_nanoseek(tmp_path, kind, name, overrides):
    hf = hf_model(kind, overrides)
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no MTP weights") if kind == "v3" else _nullcontext():
        ours = nanoseek.load_model(tmp_path)
    x = inputs()
    with torch.no_grad():
        expected, got = hf(x).logits, ours(x).logits
    assert got.shape == (2, 40, BASE["vocab_size"])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind,name,overrides", CASES, ids=[f"{k}-{n}" for k, n, _ in CASES])
def test_nanoseek_to_transformers(tmp_path, kind, name, overrides):
    ref = hf_model(kind, overrides)  # only to get HF's config.json, then our own model from it
    ref.config.save_pretrained(tmp_path / "cfg")
    config = nanoseek.ModelConfig.from_dict(json.loads((tmp_path / "cfg" / "config.json").read_text()))
    ours = nanoseek.build_model(config).eval()
    randomize_(ours)
    nanoseek.save_model(ours, tmp_path / "ours")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(hf).__name__ == FAMILIES[kind][1].__name__
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x).logits, atol=1e-4, rtol=0)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_a_transformers_v3_folder_without_mtp_weights_is_described_and_noted_as_it_loads(tmp_path):
    """transformers saves no MTP weights for a config that declares them: `info` shows the model as it loads
    (no MTP layer, the KV cache without it), and the CLI says so in one line, not as a Python warning."""
    from typer.testing import CliRunner

    from nanoseek.cli import app

    hf_model("v3", {}).save_pretrained(tmp_path / "v3")
    runner = CliRunner()
    r = runner.invoke(app, ["info", str(tmp_path / "v3")])
    assert r.exit_code == 0 and "+ 0 MTP" in r.output, r.output
    r = runner.invoke(app, ["quantize", str(tmp_path / "v3"), str(tmp_path / "q"), "--bits", "8"])
    assert r.exit_code == 0, r.output
    assert "note: " in r.output and "no MTP weights" in r.output and "warnings.warn" not in r.output, r.output


# config.json edited by hand or carried over from older tools: read as transformers reads the same folder
EDITS = {
    "tied-but-both-stored": ("qwen2", {}, {"tie_word_embeddings": True}),
    "theta-in-both-places": ("llama", {}, {"rope_theta": 10000.0,
                                           "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}),
    "old-type-key": ("llama", {}, {"rope_parameters": {"type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
    "yarn-original-length-top-level": ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                                     "rope_theta": 1e4,
                                                                     "original_max_position_embeddings": 32}},
                                       {"original_max_position_embeddings": 64}),
    "v3-yarn-original-length-top-level": ("v3", dict(V3_CASES["qlora-yarn-dense2"]),
                                          {"original_max_position_embeddings": 16}),
}


@pytest.mark.parametrize("name", EDITS)
def test_an_edited_config_is_read_as_transformers_reads_it(tmp_path, name):
    kind, overrides, edit = EDITS[name]
    hf_model(kind, overrides).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **edit}))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with pytest.warns(UserWarning) if kind == "v3" or name.startswith("tied") else _nullcontext():
        ours = nanoseek.load_model(tmp_path, dtype=torch.float32)
    x = inputs()
    with torch.no_grad():
        expected, got = hf(x).logits, ours(x).logits
    assert (expected - got).abs().max() < 1e-4


def test_a_layout_the_config_does_not_describe_names_the_fields_that_decide_it(tmp_path):
    hf_model("v3", V3_CASES["noqlora-group1-dense0"]).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "moe_layer_freq": 2}))
    with pytest.raises(nanoseek.CheckpointError, match="moe_layer_freq = 2"):
        nanoseek.load_model(tmp_path)
    hf_model("v3", V3_CASES["noqlora-group1-dense0"]).save_pretrained(tmp_path / "bias")
    (tmp_path / "bias" / "config.json").write_text(json.dumps({**cfg, "scoring_func": "softmax", "topk_method": "greedy"}))
    with pytest.raises(nanoseek.CheckpointError, match="a routing bias: the config's topk_method is 'greedy'"):
        nanoseek.load_model(tmp_path / "bias")
    # a tied checkpoint (no lm_head.weight) whose config.json lost its tie_word_embeddings (false by default)
    hf_model("llama", {"tie_word_embeddings": True}).save_pretrained(tmp_path / "tied")
    tied = json.loads((tmp_path / "tied" / "config.json").read_text())
    (tmp_path / "tied" / "config.json").write_text(json.dumps({k: v for k, v in tied.items() if k != "tie_word_embeddings"}))
    with pytest.raises(nanoseek.CheckpointError, match=r"\['lm_head.weight'\] \(the output head shares the embedding's "
                       "weight in a checkpoint saved with tie_word_embeddings = true"):
        nanoseek.load_model(tmp_path / "tied")
