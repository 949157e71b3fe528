"""The P-LoRA algorithm in plain torch: no ComfyUI imports here.

Posterior feature knowledge (paper section 4.1, Eq. 9-13):
- `divergence`, `gate`: the feature divergences and the gate itself;
- `deltas`: applying a LoRA to one layer's input; `gate` (`LayerGate`) gates the two per layer;
- `recorder`, `selection_map`: the decisions per (step, layer, sample) and their picture;
- `fusion_rules`: the paper's rivals as selection rules for the same gate (K-LoRA, B-LoRA).

Posterior metric knowledge (section 4.2, Eq. 14-20):
- `image_preprocess`, `encoders`: differentiable CLIP and DINO image encoders;
- `scores`: the score R of Eq. 16-19; `guidance`: the guided step of Eq. 20 in sampler space.

Files: `lora_file` reads LoRA files, `lora_info` tells what a file was made for; `files` holds the
checks and names shared with the encoder loaders, `sized_cache` the byte-bounded cache both use.
"""
