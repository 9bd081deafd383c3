"""Our DoRA layer vs HF peft's ``use_dora=True`` layer with the same A, B and m (eval mode).

HF peft and this fork share the import name ``peft``, so HF peft runs in a subprocess that
never sees ``peft/src``. Skipped where HF peft is not installed.
"""
import json
import textwrap

import pytest
import torch

from peft import DoraConfig, get_peft_model

from hf_peft_subprocess import hf_peft_available, run_hf_script
from tiny_llama import make_tiny_llama

HF_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    import peft
    from peft import LoraConfig, get_peft_model
    assert "peft/src" not in peft.__file__, peft.__file__
    work = sys.argv[1]
    spec = json.load(open(f"{work}/spec.json"))
    model = AutoModelForCausalLM.from_pretrained(f"{work}/base")
    config = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], target_modules=spec["targets"], lora_dropout=0.0, use_dora=True)
    model = get_peft_model(model, config)
    tensors = torch.load(f"{work}/adapter.pt", weights_only=True)
    with torch.no_grad():
        for name, module in model.base_model.model.named_modules():
            if name in spec["layers"]:
                module.lora_A["default"].weight.copy_(tensors[name + ".A"])
                module.lora_B["default"].weight.copy_(tensors[name + ".B"])
                module.lora_magnitude_vector["default"].weight.copy_(tensors[name + ".m"])
    model.eval()
    tokens = torch.tensor(spec["tokens"])
    with torch.no_grad():
        torch.save(model(input_ids=tokens).logits, f"{work}/hf_logits.pt")
    """
)


@pytest.mark.skipif(not hf_peft_available(), reason="HF peft is not installed")
def test_eval_output_equals_hf_peft_dora(tmp_path, token_batch):
    targets = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    base = make_tiny_llama(0)
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(make_tiny_llama(0), DoraConfig(r=4, lora_alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(int(torch.seed() % 2**31))
    tensors, layers = {}, []
    with torch.no_grad():
        for name, layer in model.base_model.named_adapter_layers().items():
            layer.lora_B.weight.normal_(0, 0.2, generator=g)
            layer.weight_m_wdecomp.weight.mul_(1 + 0.1 * torch.randn(layer.weight_m_wdecomp.weight.shape, generator=g))
            tensors[name + ".A"] = layer.lora_A.weight.clone()
            tensors[name + ".B"] = layer.lora_B.weight.clone()
            tensors[name + ".m"] = layer.magnitude.clone()
            layers.append(name)
    torch.save(tensors, tmp_path / "adapter.pt")
    spec = {"r": 4, "alpha": 8, "targets": targets, "layers": layers, "tokens": token_batch.tolist()}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run = run_hf_script(HF_SCRIPT, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=token_batch).logits
    theirs = torch.load(tmp_path / "hf_logits.pt", weights_only=True)
    with torch.no_grad():
        assert (ours - base(input_ids=token_batch).logits).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=2e-5)
