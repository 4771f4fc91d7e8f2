"""One module per Hugging Face `model_type`; `arch_for` picks the right one from a config."""

from __future__ import annotations

from ..errors import MlxedgeError
from .base import LlamaFamily, Role
from .llama import Llama
from .mistral import Mistral
from .qwen2 import Qwen2
from .qwen3 import Qwen3

ARCHITECTURES: dict[str, type[LlamaFamily]] = {
    cls.model_type: cls for cls in (Llama, Mistral, Qwen2, Qwen3)
}


def arch_for(config: dict, where: str = "config.json") -> LlamaFamily:
    """The architecture description for a config.

    Args:
        config: a Hugging Face config.json's contents.
        where: the file the config came from, named in errors.

    Returns:
        The architecture, with its config checked.

    Raises:
        MlxedgeError: missing or unsupported model_type, or a required key missing.
    """
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise MlxedgeError(
            f"model_type {model_type!r} is not supported",
            path=where,
            fix=f"supported model types: {', '.join(sorted(ARCHITECTURES))}",
        )
    arch = ARCHITECTURES[model_type](config)
    arch.check_config(where)
    return arch


__all__ = ["ARCHITECTURES", "LlamaFamily", "Role", "arch_for"]
