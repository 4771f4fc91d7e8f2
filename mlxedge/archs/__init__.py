"""One module per Hugging Face `model_type`; `arch_for` picks the right one from a config.

An architecture module owns everything about its architecture: the config read into a validated
`ModelSpec`, the tensor table (Hugging Face name, shape, llama.cpp's class, GGUF name, how values
move to and from GGUF), the GGUF hyperparameters both ways, and the decoder forward written once
against `archs.ops.Ops`. Nothing outside this package branches on a model type.
"""

from __future__ import annotations

from ..errors import MlxedgeError
from . import gemma3
from .gemma2 import Gemma2
from .gemma3 import Gemma3Text
from .granite import Granite
from .llama import Llama
from .mistral import Mistral
from .olmo2 import Olmo2
from .ops import Ops
from .phi3 import Phi3
from .qwen2 import Qwen2
from .qwen3 import Qwen3
from .spec import Kind, ModelSpec, Role, TensorEntry

Architecture = Llama  # every architecture module's class refines the llama decoder

ARCHITECTURES: dict[str, type[Architecture]] = {
    cls.model_type: cls
    for cls in (Llama, Mistral, Qwen2, Qwen3, Granite, Olmo2, Gemma2, Gemma3Text, Phi3)
}
# model types that wrap one of the above (a multimodal checkpoint's language model): how to read
# one as the model it holds, (config, weights, where) -> (config, weights)
WRAPPERS = {"gemma3": gemma3.unwrap}
# A GGUF file's `general.architecture` -> the class it imports as (a Mistral file says "llama").
GGUF_ARCHITECTURES: dict[str, type[Architecture]] = {
    cls.gguf_arch_name_of(): cls
    for cls in (Llama, Qwen2, Qwen3, Granite, Olmo2, Gemma2, Gemma3Text, Phi3)
}


def arch_for(config: dict, where: str = "config.json") -> Architecture:
    """The architecture of a config, with the config read into its spec.

    Args:
        config: a Hugging Face config.json's contents.
        where: the file the config came from, named in errors.

    Raises:
        MlxedgeError: missing or unsupported model_type, or a config the type cannot use.
    """
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise MlxedgeError(
            f"model_type {model_type!r} is not supported",
            path=where,
            fix=f"supported model types: {', '.join(sorted([*ARCHITECTURES, *WRAPPERS]))}",
        )
    return ARCHITECTURES[model_type](config, where)


def unwrap(config: dict, weights, where: str = "config.json"):
    """A wrapper checkpoint (`WRAPPERS`) as the model it holds; any other as it is.

    Returns:
        (config, weights): the config and the tensors of the model to read.
    """
    wrapper = WRAPPERS.get(config.get("model_type")) if isinstance(config, dict) else None
    return (config, weights) if wrapper is None else wrapper(config, weights, where)


def arch_for_gguf(name: str, path) -> type[Architecture]:
    """The class a GGUF file of `general.architecture` `name` imports as.

    Raises:
        MlxedgeError: an architecture this project does not import.
    """
    cls = GGUF_ARCHITECTURES.get(name)
    if cls is None:
        raise MlxedgeError(
            f"architecture {name!r} is not supported; supported: "
            + ", ".join(sorted(GGUF_ARCHITECTURES)),
            path=path,
        )
    return cls


__all__ = [
    "ARCHITECTURES",
    "GGUF_ARCHITECTURES",
    "Architecture",
    "Kind",
    "ModelSpec",
    "Ops",
    "Role",
    "TensorEntry",
    "arch_for",
    "arch_for_gguf",
    "unwrap",
]
