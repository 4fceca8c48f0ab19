"""Model catalog: tensor inventories from HF configs or safetensors headers, and reuse units.

Pure Python (no torch): the simulator, the policies and the real executor all see models as
`ModelSpec`s, i.e. ordered tensors with sizes and content fingerprints.
"""

from tangram_sim.models.architectures import build_model_spec, inventory_from_config, supported_model_types
from tangram_sim.models.catalog import get_model, list_models
from tangram_sim.models.derived import derive_model, share_patterns_first_layers
from tangram_sim.models.safetensors_header import read_header, spec_from_safetensors, tensor_locations
from tangram_sim.models.spec import DTYPE_BYTES, ArchInfo, ModelSpec, TensorSpec, tensor_fingerprint
from tangram_sim.models.units import GRANULARITIES, ReuseUnit, build_units

__all__ = [
    "DTYPE_BYTES",
    "GRANULARITIES",
    "ArchInfo",
    "ModelSpec",
    "ReuseUnit",
    "TensorSpec",
    "build_model_spec",
    "build_units",
    "derive_model",
    "get_model",
    "inventory_from_config",
    "list_models",
    "read_header",
    "share_patterns_first_layers",
    "spec_from_safetensors",
    "supported_model_types",
    "tensor_fingerprint",
    "tensor_locations",
]
