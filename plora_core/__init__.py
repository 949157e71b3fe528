"""The P-LoRA algorithm in plain torch: no ComfyUI imports here.

- `divergence`, `gate`: posterior feature knowledge, Eq. 9-13.
- `deltas`, `gated_layer`, `recorder`: applying two LoRAs to a layer and gating them.
- `lora_file`, `lora_info`: reading LoRA files and what they were trained for.
"""
