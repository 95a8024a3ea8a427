"""LoRA adapters (peft) folded into an LM's own weights, for saving a fine-tuned LM in its original layout."""
from __future__ import annotations

import torch


@torch.no_grad()
def merged_state_dict(llm) -> dict[str, torch.Tensor]:
    """The state dict of ``llm`` under its own key names, each LoRA-adapted weight ``W + scale * B A`` (summed
    over the active adapters, computed in float32, stored in W's dtype); the adapters themselves left out.
    The model is not changed (peft's ``merge_and_unload`` would rewrite it in place). An LM without adapters
    gives its plain ``state_dict()``."""
    if not getattr(llm, 'peft_config', None):
        return llm.state_dict()
    from peft.tuners.lora import LoraLayer
    base = llm.get_base_model()
    deltas = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and not getattr(module, 'merged', False):
            adapters = [a for a in module.active_adapters if a in module.lora_A]
            if adapters:
                deltas[f'{name}.weight'] = sum(module.get_delta_weight(a).float() for a in adapters)
    out = {}
    for key, value in base.state_dict().items():
        if 'lora_' in key:
            continue
        key = key.replace('.base_layer.', '.')
        if key in deltas:
            value = (value.float() + deltas.pop(key)).to(value.dtype)
        out[key] = value
    if deltas:                      # a layout this function does not know: refuse rather than drop adapters
        raise RuntimeError(f'LoRA adapters of {sorted(deltas)[:3]} have no base weight to merge into')
    return out
