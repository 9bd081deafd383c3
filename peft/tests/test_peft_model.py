"""PeftModel on a tiny LLaMA: merge, unmerge, save/load, strict loading, the original file format."""
import json
import os

import pytest
import torch

from peft import (
    AdapterConfigError,
    AdapterWeightsError,
    DoraConfig,
    LoraConfig,
    PeftConfig,
    PeftModel,
    TargetModulesError,
    get_peft_model,
    get_peft_model_state_dict,
    prepare_model_for_int8_training,
)
from peft.tuners.dora import DoraLinear

from tiny_llama import LLAMA_LINEARS, make_tiny_llama

SEED_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
ORIGINAL_CONFIG_KEYS = {
    "Wdecompose_target_modules", "base_model_name_or_path", "bias", "dora_simple", "enable_lora",
    "fan_in_fan_out", "inference_mode", "lora_alpha", "lora_dropout", "merge_weights",
    "modules_to_save", "peft_type", "r", "target_modules", "task_type",
}


def dora_model(seed=0, **overrides):
    config = dict(r=4, lora_alpha=8, target_modules=SEED_TARGETS, lora_dropout=0.05, task_type="CAUSAL_LM")
    config.update(overrides)
    model = get_peft_model(make_tiny_llama(seed), DoraConfig(**config))
    randomize_adapter(model, seed)
    return model


def randomize_adapter(model, seed):
    """Give B and m non-trivial values so the adapter changes the logits."""
    g = torch.Generator().manual_seed(seed + 99)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def logits(model, tokens):
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


def test_only_adapter_parameters_train_and_gqa_shapes(token_batch):
    model = dora_model(Wdecompose_target_modules=["o_proj", "gate_proj"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or ("weight_m_wdecomp" in n) for n in trainable)
    sd = get_peft_model_state_dict(model)
    k = "base_model.model.model.layers.0.self_attn.k_proj"
    assert sd[f"{k}.lora_A.weight"].shape == (4, 32)
    assert sd[f"{k}.lora_B.weight"].shape == (16, 4)  # GQA: 2 kv heads x 8 dims
    assert sd[f"{k}.weight_m_wdecomp.weight"].shape == (16, 1)
    o = "base_model.model.model.layers.0.self_attn.o_proj"
    assert f"{o}.weight_m_wdecomp.weight" in sd and f"{o}.lora_A.weight" not in sd
    loss = model(input_ids=token_batch, labels=token_batch).loss
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("magnitude_only", [None, ["o_proj", "gate_proj"]])
def test_merge_matches_unmerged_eval_and_unmerge_restores(token_batch, magnitude_only):
    model = dora_model(Wdecompose_target_modules=magnitude_only)
    originals = {n: m.base_layer.weight.detach().clone() for n, m in model.base_model.named_adapter_layers().items()}
    before = logits(model, token_batch)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, token_batch), before, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        model.merge_adapter()
    model.unmerge_adapter()
    for name, layer in model.base_model.named_adapter_layers().items():
        torch.testing.assert_close(layer.base_layer.weight, originals[name], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits(model, token_batch), before, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_returns_plain_model(token_batch):
    model = dora_model()
    before = logits(model, token_batch)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, DoraLinear) for m in plain.modules())
    assert "model.layers.0.self_attn.q_proj.weight" in plain.state_dict()
    torch.testing.assert_close(logits(plain, token_batch), before, atol=1e-5, rtol=1e-5)


def test_disable_adapter_gives_base_logits(token_batch):
    base_logits = logits(make_tiny_llama(0), token_batch)
    model = dora_model()
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, token_batch), base_logits)
    assert (logits(model, token_batch) - base_logits).abs().max() > 1e-4


@pytest.mark.parametrize("safe", [False, True])
@pytest.mark.parametrize("config_cls", [DoraConfig, LoraConfig])
def test_save_then_load_reproduces_logits(tmp_path, token_batch, safe, config_cls):
    kwargs = dict(r=4, lora_alpha=8, target_modules=SEED_TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(make_tiny_llama(0), config_cls(**kwargs))
    randomize_adapter(model, 0)
    expected = logits(model, token_batch)
    model.save_pretrained(tmp_path, safe_serialization=safe)
    files = set(os.listdir(tmp_path))
    assert ("adapter_model.safetensors" if safe else "adapter_model.bin") in files
    assert not any(f.endswith(".tmp") for f in files)
    loaded = PeftModel.from_pretrained(make_tiny_llama(0), str(tmp_path))
    torch.testing.assert_close(logits(loaded, token_batch), expected)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_saved_files_follow_the_original_format(tmp_path):
    model = dora_model(Wdecompose_target_modules=["o_proj"])
    model.save_pretrained(tmp_path)
    text = (tmp_path / "adapter_config.json").read_text()
    config = json.loads(text)
    assert set(config) == ORIGINAL_CONFIG_KEYS
    assert text == json.dumps(config, indent=2, sort_keys=True)
    assert config["inference_mode"] is True and config["peft_type"] == "DORA"
    weights = torch.load(tmp_path / "adapter_model.bin", weights_only=True)
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert all(k.startswith("base_model.model.model.layers.") for k in weights)
    assert {k.rsplit(".", 2)[-2] for k in weights} == {"lora_A", "lora_B", "weight_m_wdecomp"}
    assert not any("base_layer" in k for k in weights)


def test_handwritten_checkpoint_from_the_key_spec_loads(tmp_path, token_batch):
    """Write a checkpoint by hand from the documented keys (as the released adapters are)."""
    base = make_tiny_llama(0)
    g = torch.Generator().manual_seed(7)
    r, alpha = 2, 4
    tensors = {}
    for i in range(2):
        for name, module in base.model.layers[i].named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in ("q_proj", "v_proj", "o_proj"):
                continue
            key = f"base_model.model.model.layers.{i}.{name}"
            out_f, in_f = module.weight.shape
            tensors[f"{key}.weight_m_wdecomp.weight"] = module.weight.norm(dim=1, keepdim=True) * 1.1
            if leaf != "o_proj":
                tensors[f"{key}.lora_A.weight"] = torch.randn(r, in_f, generator=g)
                tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.1
    torch.save(tensors, tmp_path / "adapter_model.bin")
    config = {
        "Wdecompose_target_modules": ["o_proj"], "base_model_name_or_path": "yahma/llama-7b-hf", "bias": "none",
        "dora_simple": True, "enable_lora": None, "fan_in_fan_out": False, "inference_mode": True,
        "lora_alpha": alpha, "lora_dropout": 0.05, "merge_weights": False, "modules_to_save": None,
        "peft_type": "DORA", "r": r, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM",
    }
    (tmp_path / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    model = PeftModel.from_pretrained(make_tiny_llama(0), str(tmp_path))

    # Reference: build W' = m / ||V|| * V by hand for every adapted layer of a fresh base model.
    reference = make_tiny_llama(0)
    with torch.no_grad():
        for i in range(2):
            for name, module in reference.model.layers[i].named_modules():
                key = f"base_model.model.model.layers.{i}.{name}"
                if f"{key}.weight_m_wdecomp.weight" not in tensors:
                    continue
                W = module.weight.double()
                if f"{key}.lora_A.weight" in tensors:
                    W = W + (alpha / r) * tensors[f"{key}.lora_B.weight"].double() @ tensors[f"{key}.lora_A.weight"].double()
                m = tensors[f"{key}.weight_m_wdecomp.weight"].double()
                module.weight.copy_((m / W.norm(dim=1, keepdim=True) * W).float())
    torch.testing.assert_close(logits(model, token_batch), logits(reference, token_batch), atol=1e-5, rtol=1e-5)


def test_strict_loading_names_missing_unexpected_and_shape(tmp_path):
    dora_model().save_pretrained(tmp_path)
    weights = torch.load(tmp_path / "adapter_model.bin", weights_only=True)
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"

    broken = dict(weights)
    del broken[key]
    torch.save(broken, tmp_path / "adapter_model.bin")
    with pytest.raises(AdapterWeightsError, match=r"missing key.*down_proj\.lora_A"):
        PeftModel.from_pretrained(make_tiny_llama(0), str(tmp_path))

    broken = dict(weights)
    broken["base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight"] = torch.zeros(4, 32)
    torch.save(broken, tmp_path / "adapter_model.bin")
    with pytest.raises(AdapterWeightsError, match=r"unexpected key.*gate_proj"):
        PeftModel.from_pretrained(make_tiny_llama(0), str(tmp_path))

    broken = dict(weights)
    broken[key] = torch.zeros(8, 48)  # wrong r
    torch.save(broken, tmp_path / "adapter_model.bin")
    with pytest.raises(AdapterWeightsError, match=r"down_proj\.lora_A\.weight is \(8, 48\) in the file but \(4, 48\)"):
        PeftModel.from_pretrained(make_tiny_llama(0), str(tmp_path))


def test_loading_errors_for_missing_or_bad_files(tmp_path):
    with pytest.raises(AdapterConfigError, match="adapter folder not found"):
        PeftModel.from_pretrained(make_tiny_llama(0), str(tmp_path / "nope"))
    with pytest.raises(AdapterConfigError, match="no adapter_config.json"):
        PeftModel.from_pretrained(make_tiny_llama(0), str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterConfigError, match="not valid JSON"):
        PeftModel.from_pretrained(make_tiny_llama(0), str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX", "r": 4}))
    with pytest.raises(AdapterConfigError, match="unknown peft_type 'PREFIX'"):
        PeftModel.from_pretrained(make_tiny_llama(0), str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "DORA", "r": 4, "target_modules": ["q_proj"]}))
    with pytest.raises(AdapterWeightsError, match="no adapter_model"):
        PeftModel.from_pretrained(make_tiny_llama(0), str(tmp_path))
    (tmp_path / "adapter_model.bin").write_bytes(b"garbage")
    with pytest.raises(AdapterWeightsError, match="cannot read adapter weights"):
        PeftModel.from_pretrained(make_tiny_llama(0), str(tmp_path))


def test_safetensors_preferred_and_stale_format_removed(tmp_path, token_batch):
    model = dora_model()
    model.save_pretrained(tmp_path)  # .bin
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert not (tmp_path / "adapter_model.bin").exists()
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(r=-2), "r must be a positive integer"),
        (dict(lora_alpha=0), "lora_alpha must be a positive"),
        (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
        (dict(lora_dropout=-0.1), r"lora_dropout must be in \[0, 1\)"),
        (dict(bias="some"), "bias must be"),
        (dict(peft_type="PREFIX_TUNING"), "unknown peft_type"),
    ],
)
def test_invalid_config_values_are_clear_errors(kwargs, match):
    with pytest.raises(AdapterConfigError, match=match):
        DoraConfig(**{"target_modules": ["q_proj"], **kwargs})


def test_unknown_config_keys_warn_and_are_ignored(tmp_path):
    dora_model().save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["some_future_key"] = 1
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="some_future_key"):
        config = PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(config, DoraConfig) and config.r == 4


def test_target_modules_list_suffix_and_regex_full_match():
    model = get_peft_model(make_tiny_llama(0), DoraConfig(target_modules=r".*\.1\.self_attn\.(q|v)_proj"))
    assert sorted(model.base_model.named_adapter_layers()) == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    # A regex must match the whole name: "q_proj" alone matches nothing.
    with pytest.raises(TargetModulesError, match="matches no module"):
        get_peft_model(make_tiny_llama(0), DoraConfig(target_modules="q_proj"))


def test_target_modules_matching_nothing_lists_linear_names():
    with pytest.raises(TargetModulesError) as info:
        get_peft_model(make_tiny_llama(0), DoraConfig(target_modules=["query", "value"]))
    message = str(info.value)
    assert "matches no module" in message
    for name in LLAMA_LINEARS + ["lm_head"]:
        assert name in message


def test_module_in_both_target_lists_is_an_error():
    with pytest.raises(TargetModulesError, match="both"):
        get_peft_model(make_tiny_llama(0), DoraConfig(target_modules=["q_proj"], Wdecompose_target_modules=["q_proj"]))


def test_prepare_model_enables_gradient_checkpointing_for_fp32(token_batch):
    model = prepare_model_for_int8_training(make_tiny_llama(0), use_gradient_checkpointing=True)
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    peft_model = get_peft_model(model, DoraConfig(r=4, lora_alpha=8, target_modules=SEED_TARGETS, lora_dropout=0.1))
    peft_model.train()
    calls = []
    q_proj = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    q_proj.register_forward_hook(lambda *_: calls.append(1))
    loss = peft_model(input_ids=token_batch, labels=token_batch).loss
    loss.backward()
    assert len(calls) == 2  # the forward ran again in the backward: checkpointing is really on
    grads = [p.grad for p in peft_model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_gradient_checkpointing_gives_the_same_gradients(token_batch):
    def grads(checkpointing):
        model = make_tiny_llama(0)
        model = prepare_model_for_int8_training(model, use_gradient_checkpointing=checkpointing)
        peft_model = get_peft_model(model, DoraConfig(r=4, lora_alpha=8, target_modules=SEED_TARGETS, dora_simple=False))
        randomize_adapter(peft_model, 0)
        peft_model.train()
        peft_model(input_ids=token_batch, labels=token_batch).loss.backward()
        return {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)
