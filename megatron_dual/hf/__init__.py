"""transformers interop: export to a ``trust_remote_code`` directory, import from it, from a hub layout following
transformers' Llama names, and from the reference training code's checkpoints (names in :mod:`.names`)."""

from megatron_dual.hf.export import export_checkpoint, export_model
from megatron_dual.hf.importing import import_hf, import_ltg, read_hf_dir, read_ltg_checkpoint
from megatron_dual.hf.names import ConversionError

__all__ = [
    "ConversionError",
    "export_checkpoint",
    "export_model",
    "import_hf",
    "import_ltg",
    "read_hf_dir",
    "read_ltg_checkpoint",
]
