"""HF peft interop: export our LoRA/DoRA adapters in HF peft's format, import HF peft's.

The format facts (key names, magnitude shape [out], config keys) were read off adapters that
HF peft 0.21.2 saved; ``HF_0_21_2_DORA_CONFIG`` is such a config verbatim. The subprocess tests
run the installed HF peft on the same tiny base model: it loads our exports and reproduces our
logits, and we load adapters it saved and reproduce its logits.
"""
import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from peft import DoraConfig, LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.peft_model import adapter_state_tensors
from peft.utils.save_and_load import read_adapter
from peft.utils.hf_format import (
    HfFormatError,
    config_from_hf,
    from_hf,
    is_hf_config,
    tensors_from_hf,
    tensors_to_hf,
    to_hf,
)

from hf_peft_subprocess import hf_peft_available, run_hf_script
from tiny_llama import make_tiny_llama, randomize_adapter

QKVUD = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
LLAMA_LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]

# adapter_config.json as HF peft 0.21.2 wrote it for LoraConfig(r=4, lora_alpha=8,
# target_modules=["q_proj", "v_proj"], use_dora=True, task_type="CAUSAL_LM").
HF_0_21_2_DORA_CONFIG = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
    "base_model_name_or_path": None, "bias": "none", "corda_config": None, "ensure_weight_tying": False,
    "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
    "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8, "lora_bias": False, "lora_dropout": 0.0,
    "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
    "monteclora_config": None, "peft_type": "LORA", "peft_version": "0.21.2", "qalora_group_size": 16, "r": 4,
    "rank_pattern": {}, "revision": None, "target_modules": ["q_proj", "v_proj"], "target_parameters": None,
    "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_bdlora": None, "use_dora": True,
    "use_qalora": False, "use_rslora": False, "velora_config": None,
}


def fresh_generator() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.seed() % 2**31))


def adapted_model(config, g=None):
    return randomize_adapter(get_peft_model(make_tiny_llama(0), config), g or fresh_generator())


def eval_logits(model, tokens):
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


def random_tokens(g):
    return torch.randint(0, 96, (2, 11), generator=g)


# ---- detection and pure conversions ------------------------------------------------------
def test_detects_hf_configs_and_not_ours():
    assert is_hf_config(HF_0_21_2_DORA_CONFIG)
    older_hf_lora = {k: v for k, v in HF_0_21_2_DORA_CONFIG.items() if k not in ("use_dora", "peft_version")}
    assert is_hf_config(older_hf_lora)  # HF peft before use_dora still wrote use_rslora / init_lora_weights
    assert not is_hf_config(DoraConfig(r=4, target_modules=QKVUD).to_dict())
    assert not is_hf_config(LoraConfig(r=4, target_modules=QKVUD).to_dict())
    assert not is_hf_config({**DoraConfig(r=4).to_dict(), "use_dora": True})  # HF peft never writes "DORA"


@pytest.mark.parametrize("kind", ["dora", "lora"])
def test_folder_round_trip_ours_hf_ours_is_exact(tmp_path, kind):
    config_cls = DoraConfig if kind == "dora" else LoraConfig
    config = config_cls(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=QKVUD, task_type="CAUSAL_LM")
    g = fresh_generator()
    model = adapted_model(config, g)
    model.save_pretrained(tmp_path / "hf", hf_format=True)

    saved_config = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert saved_config["peft_type"] == "LORA" and saved_config["use_dora"] is (kind == "dora")
    assert (saved_config["r"], saved_config["lora_alpha"], saved_config["lora_dropout"]) == (4, 8, 0.05)
    assert saved_config["target_modules"] == QKVUD
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    hf_tensors = load_file(tmp_path / "hf" / "adapter_model.safetensors")
    for name, layer in model.base_model.named_adapter_layers().items():
        prefix = f"base_model.model.{name}"
        assert hf_tensors[f"{prefix}.lora_A.weight"].shape == (4, layer.in_features)
        assert hf_tensors[f"{prefix}.lora_B.weight"].shape == (layer.out_features, 4)
        if kind == "dora":
            assert torch.equal(hf_tensors[f"{prefix}.lora_magnitude_vector"], layer.magnitude)
    assert len(hf_tensors) == len(model.base_model.adapter_layers()) * (3 if kind == "dora" else 2)

    loaded = PeftModel.from_pretrained(make_tiny_llama(0), str(tmp_path / "hf"))
    assert type(loaded.peft_config) is config_cls
    assert loaded.peft_config.target_modules == QKVUD and loaded.peft_config.lora_dropout == 0.05
    ours, back = adapter_state_tensors(model), adapter_state_tensors(loaded)
    assert ours.keys() == back.keys()
    assert all(torch.equal(ours[k], back[k]) for k in ours)
    tokens = random_tokens(g)
    assert torch.equal(eval_logits(model, tokens), eval_logits(loaded, tokens))


def test_pure_round_trip_keeps_tensors_and_settings():
    model = adapted_model(DoraConfig(r=4, lora_alpha=16, target_modules=r".*\.(q_proj|down_proj)"))
    config, tensors = model.peft_config.to_dict(), adapter_state_tensors(model)
    back_config, back_tensors = from_hf(*to_hf(config, tensors))
    assert back_tensors.keys() == tensors.keys() and all(torch.equal(back_tensors[k], tensors[k]) for k in tensors)
    for key in ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "dora_simple"):
        assert back_config[key] == config[key], key


def test_export_of_default_targets_names_the_adapted_modules(tmp_path):
    model = adapted_model(DoraConfig(r=2, target_modules=None))  # the llama default, q_proj and v_proj
    hf_config, _ = to_hf(model.peft_config.to_dict(), adapter_state_tensors(model))
    assert hf_config["target_modules"] == ["q_proj", "v_proj"]


def test_export_of_dora_simple_false_warns_and_imports_as_dora_simple(tmp_path):
    model = adapted_model(DoraConfig(r=4, target_modules=QKVUD, dora_simple=False))
    with pytest.warns(UserWarning, match="dora_simple=False"):
        model.save_pretrained(tmp_path / "hf", hf_format=True)
    loaded = PeftModel.from_pretrained(make_tiny_llama(0), str(tmp_path / "hf"))
    assert loaded.peft_config.dora_simple is True
    tokens = random_tokens(fresh_generator())
    torch.testing.assert_close(eval_logits(loaded, tokens), eval_logits(model, tokens), atol=0, rtol=0)


def test_export_refuses_magnitude_only_modules_and_writes_nothing(tmp_path):
    model = adapted_model(DoraConfig(r=4, target_modules=["q_proj"], Wdecompose_target_modules=["o_proj"]))
    with pytest.raises(HfFormatError, match=r"magnitude-only.*o_proj"):
        model.save_pretrained(tmp_path / "hf", hf_format=True)
    assert not (tmp_path / "hf").exists()
    # Tensors alone show it too: a magnitude without lora_A / lora_B.
    tensors = {"base_model.model.model.layers.0.mlp.up_proj.weight_m_wdecomp.weight": torch.ones(48, 1)}
    with pytest.raises(HfFormatError, match=r"model\.layers\.0\.mlp\.up_proj is a magnitude-only"):
        tensors_to_hf(tensors)


@pytest.mark.parametrize(
    "option, value",
    [
        ("use_rslora", True),
        ("rank_pattern", {"q_proj": 8}),
        ("alpha_pattern", {"q_proj": 32}),
        ("fan_in_fan_out", True),
        ("layers_to_transform", [0]),
        ("lora_bias", True),
        ("modules_to_save", ["lm_head"]),
        ("bias", "all"),
        ("init_lora_weights", "pissa"),
        ("exclude_modules", ["o_proj"]),
        ("use_some_future_option", True),  # a key this code has never seen is refused too
    ],
)
def test_import_refuses_unsupported_hf_option_naming_it(option, value):
    with pytest.raises(HfFormatError, match=f"not supported by this fork: {option}="):
        config_from_hf({**HF_0_21_2_DORA_CONFIG, option: value}, [])


def test_import_accepts_neutral_hf_values_and_lists_every_unsupported_option():
    for init in (True, False, "gaussian"):
        assert config_from_hf({**HF_0_21_2_DORA_CONFIG, "init_lora_weights": init}, [])["peft_type"] == "DORA"
    with pytest.raises(HfFormatError) as err:
        config_from_hf({**HF_0_21_2_DORA_CONFIG, "use_rslora": True, "layers_to_transform": [1]}, [])
    assert "layers_to_transform=[1]" in str(err.value) and "use_rslora=True" in str(err.value)


def test_import_refusal_through_from_pretrained(tmp_path):
    adapted_model(DoraConfig(r=4, target_modules=QKVUD)).save_pretrained(tmp_path / "hf", hf_format=True)
    config_path = tmp_path / "hf" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "use_rslora": True}))
    with pytest.raises(HfFormatError, match="use_rslora=True"):
        PeftModel.from_pretrained(make_tiny_llama(0), str(tmp_path / "hf"))


def test_all_linear_resolves_from_the_weights_through_every_reader(tmp_path):
    """HF's target_modules "all-linear" names no modules; the weights do. PeftConfig.from_pretrained,
    read_adapter and PeftModel.from_pretrained read such a folder alike (they share one reader)."""
    model = adapted_model(DoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    model.save_pretrained(tmp_path, hf_format=True)
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "target_modules": "all-linear"}))
    from_config = PeftConfig.from_pretrained(str(tmp_path))
    from_reader, tensors = read_adapter(str(tmp_path))
    loaded = PeftModel.from_pretrained(make_tiny_llama(0), str(tmp_path))
    assert from_config == from_reader == loaded.peft_config
    assert type(from_config) is DoraConfig and from_config.target_modules == ["down_proj", "q_proj"]
    tokens = random_tokens(fresh_generator())
    torch.testing.assert_close(eval_logits(loaded, tokens), eval_logits(model, tokens))


def test_import_refuses_weights_that_do_not_fit_the_config():
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    good = {f"{prefix}.lora_A.weight": torch.randn(4, 32), f"{prefix}.lora_B.weight": torch.randn(32, 4),
            f"{prefix}.lora_magnitude_vector": torch.rand(32)}
    assert tensors_from_hf(good)[f"{prefix}.weight_m_wdecomp.weight"].shape == (32, 1)
    with pytest.raises(HfFormatError, match="lora_embedding_A"):
        tensors_from_hf({**good, "base_model.model.model.embed_tokens.lora_embedding_A": torch.randn(4, 96)})
    with pytest.raises(HfFormatError, match=r"lora_magnitude_vector \(32, 2\) is not a DoRA magnitude"):
        tensors_from_hf({**good, f"{prefix}.lora_magnitude_vector": torch.rand(32, 2)})
    with pytest.raises(HfFormatError, match="rank r=8"):
        from_hf({**HF_0_21_2_DORA_CONFIG, "r": 8}, good)
    with pytest.raises(HfFormatError, match="use_dora=False but its weights have lora_magnitude_vector"):
        from_hf({**HF_0_21_2_DORA_CONFIG, "use_dora": False}, good)


# ---- against the installed HF peft, in one subprocess ----------------------------------------
HF_SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings, torch
    from transformers import AutoModelForCausalLM
    import peft
    from peft import LoraConfig, PeftModel, get_peft_model
    assert "peft/src" not in peft.__file__, peft.__file__
    work = sys.argv[1]
    spec = json.load(open(f"{work}/spec.json"))
    tokens = torch.tensor(spec["tokens"])

    def save_logits(model, name):
        model.eval()
        with torch.no_grad():
            torch.save(model(input_ids=tokens).logits, f"{work}/{name}.hf_logits.pt")

    caught_by_export = {}
    for name in spec["load"]:  # our exports
        base = AutoModelForCausalLM.from_pretrained(f"{work}/base")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = PeftModel.from_pretrained(base, f"{work}/{name}")
        caught_by_export[name] = [f"{w.filename}: {w.message}" for w in caught]
        save_logits(model, name)
    json.dump(caught_by_export, open(f"{work}/hf_warnings.json", "w"))

    for job in spec["create"]:  # adapters saved by HF peft
        torch.manual_seed(job["seed"])
        config = LoraConfig(r=4, lora_alpha=job["alpha"], lora_dropout=0.05, target_modules=job["targets"],
                            use_dora=job["use_dora"], task_type="CAUSAL_LM")
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(f"{work}/base"), config)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "lora_B" in pname:
                    param.normal_(0, 0.2)
                elif "lora_magnitude_vector" in pname:
                    param.mul_(1 + 0.2 * torch.randn_like(param))
        model.save_pretrained(f"{work}/{job['name']}")
        save_logits(model, job["name"])
    """
)

OUR_EXPORTS = {
    "ours_dora": DoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=QKVUD, task_type="CAUSAL_LM"),
    "ours_lora": LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj", "gate_proj"]),
    "ours_dora_regex": DoraConfig(r=4, lora_alpha=8, target_modules=r"model\.layers\.1\..*_proj"),
}
HF_ADAPTERS = {
    "hf_dora": dict(use_dora=True, targets=QKVUD, alpha=8),
    "hf_dora_all_linear": dict(use_dora=True, targets="all-linear", alpha=16),
    "hf_lora_all_linear": dict(use_dora=False, targets="all-linear", alpha=8),
}


@pytest.fixture(scope="module")
def hf_world(tmp_path_factory):
    """Our exports and HF-saved adapters on one saved base model, with both sides' logits."""
    if not hf_peft_available():
        pytest.skip("HF peft is not installed (it runs in a subprocess, apart from this fork)")
    work = tmp_path_factory.mktemp("hf_world")
    seed = int(torch.seed() % 2**31)
    g = torch.Generator().manual_seed(seed)
    make_tiny_llama(0).save_pretrained(work / "base")
    tokens = random_tokens(g)
    our_logits = {}
    for name, config in OUR_EXPORTS.items():
        model = adapted_model(config, g)
        model.save_pretrained(work / name, hf_format=True)
        our_logits[name] = eval_logits(model, tokens)
    jobs = [{"name": name, "seed": seed + i, **job} for i, (name, job) in enumerate(HF_ADAPTERS.items())]
    spec = {"tokens": tokens.tolist(), "load": list(OUR_EXPORTS), "create": jobs}
    (work / "spec.json").write_text(json.dumps(spec))
    run = run_hf_script(HF_SCRIPT, work)
    assert run.returncode == 0, run.stderr[-3000:]
    return {"work": work, "seed": seed, "tokens": tokens, "our_logits": our_logits,
            "base_logits": eval_logits(make_tiny_llama(0), tokens),
            "hf_warnings": json.loads((work / "hf_warnings.json").read_text())}


@pytest.mark.parametrize("name", list(OUR_EXPORTS))
def test_hf_peft_loads_our_export_and_reproduces_our_logits(hf_world, name):
    peft_warnings = [w for w in hf_world["hf_warnings"][name] if "/peft/" in w or "peft" in w.lower()]
    assert peft_warnings == [], peft_warnings
    ours = hf_world["our_logits"][name]
    theirs = torch.load(hf_world["work"] / f"{name}.hf_logits.pt", weights_only=True)
    assert (ours - hf_world["base_logits"]).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=2e-5, msg=lambda m: f"seed {hf_world['seed']}: {m}")


@pytest.mark.parametrize("name", list(HF_ADAPTERS))
def test_we_load_an_hf_peft_adapter_and_reproduce_its_logits(hf_world, name):
    folder = hf_world["work"] / name
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    model = PeftModel.from_pretrained(make_tiny_llama(0), str(folder))
    expected_type = DoraConfig if HF_ADAPTERS[name]["use_dora"] else LoraConfig
    assert type(model.peft_config) is expected_type
    if HF_ADAPTERS[name]["targets"] == "all-linear":  # HF peft 0.21.2 saves the resolved module paths
        adapted = {path.rsplit(".", 1)[-1] for path in model.base_model.named_adapter_layers()}
        assert sorted(adapted) == LLAMA_LINEARS and len(model.base_model.adapter_layers()) == 14
    ours = eval_logits(model, hf_world["tokens"])
    theirs = torch.load(hf_world["work"] / f"{name}.hf_logits.pt", weights_only=True)
    assert (theirs - hf_world["base_logits"]).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=2e-5, msg=lambda m: f"seed {hf_world['seed']}: {m}")
