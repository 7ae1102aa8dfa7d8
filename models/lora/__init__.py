"""Parameter-efficient adaptation of any family's students: LoRA and timestep-dependent LoRA (TD-LoRA).

`layers`: the adapted linear layer (base names kept, sliced with the base weights); `inject`: which
layers, freezing, merging; `files`: exported models that keep TD-LoRA as a runtime module;
`diffusers_format`: plain-LoRA adapters in the layout diffusers' `load_lora_weights` reads.
"""
from models.lora.inject import (
    LORA_METHODS, TARGET_GROUPS, LoraReport, LoraSpec, adapter_layout, adapter_state_dict, apply_lora, lora_layers,
    merge_lora, restore_adapters, select_targets, spec_dict,
)
from models.lora.layers import LoRALinear, TimestepSource

__all__ = ["LORA_METHODS", "TARGET_GROUPS", "LoRALinear", "LoraReport", "LoraSpec", "TimestepSource",
           "adapter_layout", "adapter_state_dict", "apply_lora", "lora_layers", "merge_lora", "restore_adapters",
           "select_targets", "spec_dict"]
