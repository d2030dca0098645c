"""De-quantize a GGUF file into a normal Hugging Face model folder (weights, tokenizer, configs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from routertune.loading.progress import hf_progress, say


def convert_gguf_folder(
    source: Path, dest: Path, display_name: str | None = None, progress: bool = True
) -> dict[str, int]:
    """De-quantizes a GGUF file into a normal Hugging Face folder (weights, tokenizer, configs).

    transformers 5.x refuses to ``save_pretrained`` a model loaded from GGUF ("quantized
    with gguf and is not serializable"), so the weights are moved into a fresh model built
    from the same config without its quantization entry, and that one is saved.

    Args:
        source: the ``.gguf`` file.
        dest: an existing, empty folder to fill.
        display_name: recorded as the config's ``_name_or_path``.
        progress: show progress on stderr.

    Returns:
        ``{file name: size in bytes}`` of the files written.
    """
    with hf_progress(progress):
        return _convert_gguf_folder(source, dest, display_name, progress)


def _convert_gguf_folder(source: Path, dest: Path, display_name: str | None, progress: bool) -> dict[str, int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    config = gguf_model.config
    # GGUF carries no tokenizer length limit; use the model's context (as the hub tokenizer does).
    if tokenizer.model_max_length > 10**12 and getattr(config, "max_position_embeddings", None):
        tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(str(dest))
    # The config still says "quantized with gguf"; a plain model must not inherit that.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if display_name is not None:
        config._name_or_path = display_name
    state = gguf_model.state_dict()
    # Build on the meta device: no random init of weights that are overwritten anyway.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = set(_tied_parameter_names(model))
    missing = [key for key in missing if key not in tied]
    if missing or unexpected:
        raise RuntimeError(
            f"converting {source}: weights do not match the model built from its config "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    model.tie_weights()
    left_on_meta = [name for name, p in model.named_parameters() if p.is_meta]
    if left_on_meta:
        raise RuntimeError(f"converting {source}: no weights for {left_on_meta[:5]}")
    model.generation_config = gguf_model.generation_config
    del gguf_model, state
    say(progress, f"routertune: saving the converted weights ({display_name or source.name})")
    model.save_pretrained(str(dest))
    return {p.name: p.stat().st_size for p in sorted(dest.iterdir()) if p.is_file()}


def _tied_parameter_names(model: Any) -> list[str]:
    """Parameter names that tie_weights() fills (e.g. ``lm_head.weight`` with tied embeddings)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return []
    output = model.get_output_embeddings()
    if output is None:
        return []
    return [f"{name}.weight" for name, module in model.named_modules() if module is output]
