"""The PLORA_REFERENCES value: reference images of the LoRAs beyond the pair, each with its role and
weight (the extended Eq. 19 of plora_core/scores.py), chained by P-LoRA Reference nodes."""

from __future__ import annotations

from dataclasses import dataclass

from ..plora_core.scores import ROLES
from .input_checks import register_object_type

REFERENCES_TYPE = "PLORA_REFERENCES"


@dataclass(frozen=True)
class ReferenceImages:
    """(role, weight a_r, IMAGE [B, H, W, C]) per extra LoRA, in the order the nodes chained them."""

    entries: tuple[tuple[str, float, object], ...] = ()

    def with_reference(self, image, role: str, weight: float) -> "ReferenceImages":
        if role not in ROLES:
            raise ValueError(f"A reference's role must be {' or '.join(ROLES)}, not {role!r}: subject for a LoRA of "
                             "who or what you render, style for one of how it looks.")
        return ReferenceImages((*self.entries, (role, float(weight), image)))


register_object_type(REFERENCES_TYPE, ReferenceImages, "P-LoRA Reference")
