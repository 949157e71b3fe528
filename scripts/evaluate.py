"""The paper's Table 1 on your LoRAs: render, score and tabulate fusion methods on running ComfyUI servers.

    python scripts/evaluate.py pairs.json --server http://127.0.0.1:8188 --server http://gpu2:8188 \\
        --out eval_results

`pairs.json` names the checkpoint, the encoders and the subject/style LoRA pairs with their
prompts (see docs/evaluation.md); an entry may also list N LoRAs (`"loras": [...]`: its first
subject and first style are the pair, the rest are added with Add LoRA to Set nodes). For every
pair and seed the script renders the references (each LoRA alone with its own prompt,
Eq. 14-15; a set's further LoRAs reach the guidance through P-LoRA Reference nodes) and one
image per method (k-lora and b-lora take only a pair: skipped for larger sets, noted), scores
every image with the P-LoRA Score node (Style Sim, CLIP Score, DINO Score) and writes, in --out:

    table1.md, table1.csv   mean and standard deviation per method and metric (the paper's Table 1)
    scores.csv              the scores of every image
    sheets/<pair>.png       one contact sheet per pair: a row per seed, references and methods side by side
    images/, references/, scores/   every image and score, each with a record of how it was made

Methods: direct, k-lora, b-lora (PLoRAModelPatcher's `method`), pfk (KL gate + KSampler),
pmk (direct merge + metric guidance sampler), p-lora (KL gate + metric guidance).

Several servers share the work, one job each at a time. A server that stops answering (connection
refused or reset) has its job moved to the others. A job a server refuses (node_errors) or fails
(execution_error) is reported with the node's error; a failed one is retried at most --retries
times, then the run goes on and exits with status 1 at the end. Finished images and scores stay in
--out: the same command again skips them (resume). Standard library only.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import os
import re
import shutil
import statistics
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_client import Comfy, PromptFailed, PromptRefused, PromptTimeout, ServerError, ServerGone  # noqa: E402
from run_workflow import describe_failure, describe_refusal  # noqa: E402
from workflow_api import Graph, check_prompt, combo_options, fill_defaults  # noqa: E402

logger = logging.getLogger("plora.evaluate")


@dataclass(frozen=True)
class Method:
    label: str             # its row in the table
    patcher_method: str    # PLoRAModelPatcher's `method`
    guided: bool           # PosteriorMetricGuidanceSampler instead of KSampler


METHODS = {
    "direct": Method("Direct", "direct", False),
    "k-lora": Method("K-LoRA", "k-lora", False),
    "b-lora": Method("B-LoRA", "b-lora", False),
    "pfk": Method("PFK only (KL gate)", "p-lora", False),
    "pmk": Method("PMK only (direct + guidance)", "direct", True),
    "p-lora": Method("P-LoRA (PFK + PMK)", "p-lora", True),
}
METRICS = {"style_sim": "Style Sim", "clip_score": "CLIP Score", "dino_score": "DINO Score"}
SCORE_UI_KEY = "plora_scores"  # nodes/score_node.py
SAMPLER_DEFAULTS = {"width": 1024, "height": 1024, "steps": 30, "cfg": 7.0, "sampler_name": "euler",
                    "scheduler": "normal", "negative": ""}
UPLOAD_FOLDER = "plora_eval"
HEARTBEAT = 5.0  # seconds without an event before the server is asked over HTTP
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


ROLES = ("subject", "style")
MAX_LORAS = 8      # glue/lora_pair.py MAX_LORAS: the LoRAs one gate chooses among
PAIR_ONLY = ("k-lora", "b-lora")  # the patcher refuses them for sets larger than the pair


class SpecError(ValueError):
    """The pairs file cannot be used; the message names the entry and what to write."""


# ---------------------------------------------------------------------------- the pairs file


@dataclass(frozen=True)
class AddedLora:
    """A LoRA of a set beyond its subject/style pair (an Add LoRA to Set node), with its reference prompt."""

    file: str
    role: str
    strength: float
    bias: float
    prompt: str
    reference_weight: float   # P-LoRA Reference's weight of its reference in the guidance score

    def key(self, position: int) -> str:
        """Its reference's name in jobs and files: lora3, lora4, ... (its place in the set, from 1)."""
        return f"lora{position + 3}"


@dataclass(frozen=True)
class Pair:
    name: str
    subject_lora: str
    style_lora: str
    subject_strength: float
    style_strength: float
    prompt: str
    subject_prompt: str
    style_prompt: str
    subject_image: Path | None   # score against these (the paper's protocol) instead of the renders
    style_image: Path | None
    sampler: dict
    patcher: dict
    guidance: dict
    added: tuple[AddedLora, ...] = ()   # the set's LoRAs past the pair, in set order

    @property
    def size(self) -> int:
        return 2 + len(self.added)

    def files(self) -> list[str]:
        return [self.subject_lora, self.style_lora, *(lora.file for lora in self.added)]

    def reference_roles(self) -> list[str]:
        """The references of one seed: subject, style, then lora3, lora4, ... for the added LoRAs."""
        return ["subject", "style", *(lora.key(i) for i, lora in enumerate(self.added))]

    def render_fields(self) -> dict:
        fields = {k: getattr(self, k) for k in ("subject_lora", "style_lora", "subject_strength", "style_strength",
                                                "prompt", "subject_prompt", "style_prompt")}
        if self.added:  # a pair's key stays as it was, so its earlier results are still reused
            fields["added"] = [vars(lora) for lora in self.added]
        return fields


@dataclass(frozen=True)
class Spec:
    checkpoint: str
    clip_checkpoint: str
    clip_architecture: str
    dino: str
    seeds: tuple[int, ...]
    methods: tuple[str, ...]
    pairs: tuple[Pair, ...]
    sheet_size: int


def _text(entry: dict, key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{where}: '{key}' must be a non-empty string.")
    return value


def _number(entry: dict, key: str, where: str, default: float) -> float:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpecError(f"{where}: '{key}' must be a number, not {value!r}.")
    return float(value)


def _table(entry: dict, key: str, where: str) -> dict:
    value = entry.get(key, {})
    if not isinstance(value, dict):
        raise SpecError(f"{where}: '{key}' must be an object of input names and values.")
    return value


def _image(entry: dict, key: str, where: str, folder: Path) -> Path | None:
    if entry.get(key) is None:
        return None
    path = (folder / _text(entry, key, where)).resolve()
    if not path.is_file():
        raise SpecError(f"{where}: '{key}' {path} is not a file.")
    return path


def _sampler(settings: dict, where: str) -> dict:
    """The sampler settings, checked: whole sizes and steps, a number for cfg, text for the rest."""
    for key in ("width", "height", "steps"):
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecError(f"{where}: sampler '{key}' must be a whole number of at least 1, not {value!r}.")
    _number(settings, "cfg", where + " sampler", 0.0)
    for key in ("sampler_name", "scheduler", "negative"):
        if not isinstance(settings[key], str):
            raise SpecError(f"{where}: sampler '{key}' must be a string, not {settings[key]!r}.")
    return settings


def _seeds(value, where: str) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return tuple(range(value))
    if isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        return tuple(dict.fromkeys(value))
    raise SpecError(f"{where}: 'seeds' must be a count (e.g. 10) or a list of whole numbers, not {value!r}.")


def _methods(value, where: str) -> tuple[str, ...]:
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise SpecError(f"{where}: 'methods' must be a list of {', '.join(METHODS)}.")
    unknown = [n for n in names if n.strip() not in METHODS]
    if unknown:
        raise SpecError(f"{where}: unknown method(s) {unknown}; use {', '.join(METHODS)}.")
    return tuple(dict.fromkeys(n.strip() for n in names))


LIST_FORM = ('"loras": [{"file": "dog.safetensors", "role": "subject", "prompt": "a photo of sks dog"}, '
             '{"file": "watercolour.safetensors", "role": "style", "prompt": "a garden, wtrclr style"}, '
             '{"file": "cat.safetensors", "role": "subject", "strength": 1.0, "bias": 1.0, "prompt": "a photo of '
             'a cat"}]')


def _lora_list(entry: dict, at: str) -> tuple[dict, tuple[AddedLora, ...]]:
    """A `loras` list: (the pair's fields as the subject/style form names them, the LoRAs added to it)."""
    loras = entry["loras"]
    mixed = [k for k in ("subject_lora", "style_lora", "subject_strength", "style_strength", "subject_prompt",
                         "style_prompt") if k in entry]
    if mixed:
        raise SpecError(f"{at}: give the LoRAs either as 'loras' or as subject_lora/style_lora, not both "
                        f"(remove {', '.join(mixed)}; each LoRA of the list has its own strength and prompt).")
    if not isinstance(loras, list) or len(loras) < 2:
        count = len(loras) if isinstance(loras, list) else "no"
        raise SpecError(f"{at}: 'loras' lists {count} LoRA(s); a set needs at least a subject and a style, e.g. "
                        f"{LIST_FORM}.")
    if len(loras) > MAX_LORAS:
        raise SpecError(f"{at}: 'loras' lists {len(loras)} LoRAs; the gate chooses among at most {MAX_LORAS}. "
                        "Leave some out.")
    parsed, seen = [], {}
    for index, lora in enumerate(loras):
        where = f"{at} loras[{index}]"
        if not isinstance(lora, dict):
            raise SpecError(f'{where}: each LoRA is an object, e.g. {{"file": "dog.safetensors", "role": "subject", '
                            '"prompt": "a photo of sks dog"}.')
        file, prompt = _text(lora, "file", where), _text(lora, "prompt", where)
        role = lora.get("role")
        if role not in ROLES:
            raise SpecError(f"{where}: 'role' must be \"subject\" (who or what you render) or \"style\" (how it "
                            f"looks: a medium, a look, lighting), not {role!r}.")
        if file in seen:
            raise SpecError(f"{where}: {file} is already loras[{seen[file]}]; each LoRA can be in a set once "
                            "(change that entry's strength instead).")
        seen[file] = index
        bias = _number(lora, "bias", where, 1.0)
        if bias < 0:
            raise SpecError(f"{where}: 'bias' must be 0 or more (1 = as the paper weighs its subject), not {bias}.")
        weight = _number(lora, "reference_weight", where, 1.0)
        if not 0 <= weight <= 10:
            raise SpecError(f"{where}: 'reference_weight' must be 0 to 10 (P-LoRA Reference's weight; 1 = as much as "
                            f"the pair's references), not {weight}.")
        parsed.append((file, role, _number(lora, "strength", where, 1.0), bias, prompt, weight, where))
    roles = [p[1] for p in parsed]
    if "subject" not in roles or "style" not in roles:
        missing = "subject" if "subject" not in roles else "style"
        raise SpecError(f"{at}: 'loras' has no {missing} LoRA; a set needs at least one subject and one style "
                        f"(the first of each is the subject/style pair). Give one LoRA \"role\": \"{missing}\".")
    subject = next(p for p in parsed if p[1] == "subject")
    style = next(p for p in parsed if p[1] == "style")
    for member in (subject, style):
        if member[3] != 1.0 or member[5] != 1.0:
            raise SpecError(f"{member[6]}: the first {member[1]} LoRA is the pair's {member[1]} (Load Subject + "
                            "Style LoRA), which takes no 'bias' or 'reference_weight'; remove them (the patcher's "
                            "style_bias weighs styles), or list another LoRA first.")
    pair = {"subject_lora": subject[0], "style_lora": style[0], "subject_strength": subject[2],
            "style_strength": style[2], "subject_prompt": subject[4], "style_prompt": style[4]}
    added = tuple(AddedLora(file, role, strength, bias, prompt, weight)
                  for file, role, strength, bias, prompt, weight, _ in parsed if file not in (subject[0], style[0]))
    return pair, added


def load_spec(path: Path, seeds=None, methods=None, sheet_size: int = 256) -> Spec:
    """The pairs file (JSON) with the command line's --seeds/--methods applied; SpecError on a bad entry."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SpecError(f"{path}: cannot read it as JSON ({error}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("pairs"), list) or not data["pairs"]:
        raise SpecError(f"{path}: expected an object with a non-empty 'pairs' list (see docs/evaluation.md).")
    where = str(path)
    defaults = {"sampler": {**SAMPLER_DEFAULTS, **_table(data, "sampler", where)},
                "patcher": _table(data, "patcher", where), "guidance": _table(data, "guidance", where)}
    pairs = []
    for index, entry in enumerate(data["pairs"]):
        at = f"{path} pairs[{index}]"
        if not isinstance(entry, dict):
            raise SpecError(f"{at}: each pair is an object.")
        name = entry.get("name", f"pair{index + 1:02d}")
        if not isinstance(name, str) or not NAME.match(name):
            raise SpecError(f"{at}: 'name' {name!r} must be letters, digits, '.', '_' or '-' (it names files).")
        added: tuple[AddedLora, ...] = ()
        if "loras" in entry:
            fields, added = _lora_list(entry, at)
            entry = {**entry, **fields}
        pairs.append(Pair(
            name, _text(entry, "subject_lora", at), _text(entry, "style_lora", at),
            _number(entry, "subject_strength", at, 1.0), _number(entry, "style_strength", at, 1.0),
            _text(entry, "prompt", at), _text(entry, "subject_prompt", at), _text(entry, "style_prompt", at),
            _image(entry, "subject_image", at, path.parent), _image(entry, "style_image", at, path.parent),
            _sampler({**defaults["sampler"], **_table(entry, "sampler", at)}, at),
            *({**defaults[part], **_table(entry, part, at)} for part in ("patcher", "guidance")), added))
    names = [p.name for p in pairs]
    if len(set(names)) != len(names):
        raise SpecError(f"{path}: pair names must be unique, got {names}.")
    architecture = _text({"clip_architecture": "ViT-B-32", **data}, "clip_architecture", where)
    return Spec(_text(data, "checkpoint", where), _text(data, "clip_checkpoint", where), architecture,
                _text(data, "dino", where),
                _seeds(seeds if seeds is not None else data.get("seeds", 10), where),
                _methods(methods if methods is not None else data.get("methods", list(METHODS)), where),
                tuple(pairs), sheet_size)


# ---------------------------------------------------------------------------- jobs and their records


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:20]


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(eq=False)
class Job:
    kind: str                       # refs | render | score | sheet
    pair: Pair
    seed: int | None
    method: str | None
    key: str                        # what the result depends on; a record with another key is redone
    record: Path                    # the JSON written when the job is finished
    outputs: dict[str, Path] = field(default_factory=dict)   # role -> image file written
    inputs: dict[str, Path] = field(default_factory=dict)    # role -> local image uploaded for the job
    extra: dict = field(default_factory=dict)
    attempts: int = 0
    tried_on: set = field(default_factory=set)

    @property
    def title(self) -> str:
        parts = [self.kind, self.method, self.pair.name, None if self.seed is None else f"seed {self.seed}"]
        return " ".join(p for p in parts if p)


def read_record(job: Job) -> dict | None:
    """The job's record if it is finished with the same key and its images are intact, else None."""
    try:
        record = json.loads(job.record.read_text())
    except (OSError, ValueError):
        return None
    if record.get("key") != job.key:
        return None
    for role, path in job.outputs.items():
        if not path.is_file() or file_sha(path) != record.get("sha256", {}).get(role):
            return None
    return record


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def finish(job: Job, images: dict[str, bytes], record: dict) -> None:
    """Write the job's images, then its record (last, so an interrupted write leaves the job unfinished)."""
    for role, data in images.items():
        write_atomic(job.outputs[role], data)
    record = {"key": job.key, "sha256": {role: hashlib.sha256(data).hexdigest() for role, data in images.items()},
              **record}
    write_atomic(job.record, json.dumps(record, indent=1).encode())


def reference_job(spec: Spec, pair: Pair, seed: int, out: Path) -> Job:
    folder = out / "references" / pair.name
    key = digest({"kind": "refs", "checkpoint": spec.checkpoint, "pair": pair.render_fields(),
                  "sampler": pair.sampler, "seed": seed})
    return Job("refs", pair, seed, None, key, folder / f"seed{seed}.json",
               outputs={role: folder / f"seed{seed}_{role}.png" for role in pair.reference_roles()})


def render_job(spec: Spec, pair: Pair, seed: int, method: str, refs: Job | None, out: Path) -> Job:
    folder = out / "images" / pair.name / method
    settings = {"kind": "render", "method": method, "checkpoint": spec.checkpoint, "pair": pair.render_fields(),
                "sampler": pair.sampler, "patcher": pair.patcher, "seed": seed}
    inputs = {}
    if METHODS[method].guided:
        inputs = dict(refs.outputs)
        settings.update(guidance=pair.guidance, encoders=[spec.clip_checkpoint, spec.clip_architecture, spec.dino],
                        references={role: file_sha(path) for role, path in inputs.items()})
    return Job("render", pair, seed, method, digest(settings), folder / f"seed{seed}.json",
               outputs={"image": folder / f"seed{seed}.png"}, inputs=inputs)


def score_references(pair: Pair, refs: Job | None) -> dict[str, Path] | None:
    """Subject and style images to score against: the pair's own files, else the seed's renders."""
    subject = pair.subject_image or (refs.outputs["subject"] if refs else None)
    style = pair.style_image or (refs.outputs["style"] if refs else None)
    return {"subject": subject, "style": style} if subject and style else None


def score_job(spec: Spec, render: Job, references: dict[str, Path], out: Path) -> Job:
    inputs = {"image": render.outputs["image"], **references}
    key = digest({"kind": "score", "encoders": [spec.clip_checkpoint, spec.clip_architecture, spec.dino],
                  "images": {role: file_sha(path) for role, path in inputs.items()}})
    return Job("score", render.pair, render.seed, render.method, key,
               out / "scores" / render.pair.name / render.method / f"seed{render.seed}.json", inputs=inputs)


# ---------------------------------------------------------------------------- API-format graphs


def _checkpoint(g: Graph, spec: Spec, pair: Pair) -> tuple[str, str]:
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=spec.checkpoint)
    latent = g.add("EmptyLatentImage", width=pair.sampler["width"], height=pair.sampler["height"], batch_size=1)
    return ckpt, latent


def _sampler_inputs(pair: Pair, seed: int, model, positive, negative, latent) -> dict:
    s = pair.sampler
    return dict(model=model, seed=seed, steps=s["steps"], cfg=s["cfg"], sampler_name=s["sampler_name"],
                scheduler=s["scheduler"], positive=positive, negative=negative, latent_image=latent, denoise=1.0)


def _encoders(g: Graph, spec: Spec) -> tuple[str, str]:
    clip = g.add("LoadPLoRACLIPEncoder", checkpoint=spec.clip_checkpoint, architecture=spec.clip_architecture,
                 precision="auto")
    return clip, g.add("LoadPLoRADINOEncoder", model_folder=spec.dino, precision="auto")


def references_graph(spec: Spec, job: Job, uploads: dict, caps: dict) -> tuple[Graph, dict]:
    """Eq. 14-15: each LoRA alone (LoraLoader) with its own prompt, same seed and sampler as the methods."""
    g, pair, outputs = Graph(), job.pair, {}
    ckpt, latent = _checkpoint(g, spec, pair)
    alone = [("subject", pair.subject_lora, pair.subject_strength, pair.subject_prompt),
             ("style", pair.style_lora, pair.style_strength, pair.style_prompt),
             *((lora.key(i), lora.file, lora.strength, lora.prompt) for i, lora in enumerate(pair.added))]
    for role, lora, strength, text in alone:
        loaded = g.add("LoraLoader", model=g.link(ckpt, 0), clip=g.link(ckpt, 1), lora_name=lora,
                       strength_model=strength, strength_clip=strength)
        positive = g.add("CLIPTextEncode", text=text, clip=g.link(loaded, 1))
        negative = g.add("CLIPTextEncode", text=pair.sampler["negative"], clip=g.link(loaded, 1))
        sampled = g.add("KSampler", **_sampler_inputs(pair, job.seed, g.link(loaded), g.link(positive),
                                                      g.link(negative), g.link(latent)))
        decoded = g.add("VAEDecode", samples=g.link(sampled), vae=g.link(ckpt, 2))
        outputs[role] = g.add("PreviewImage", images=g.link(decoded))
    return g, outputs


def render_graph(spec: Spec, job: Job, uploads: dict, caps: dict) -> tuple[Graph, dict]:
    """One method: the fused model (PLoRAModelPatcher on the set: Load Subject + Style LoRA, then an Add LoRA
    to Set per further LoRA; or chained LoraLoaders for a direct merge on a server whose patcher has no
    `method` input), then KSampler or the metric guidance sampler (a set's further references through
    P-LoRA Reference nodes into `more_references`)."""
    g, pair, method = Graph(), job.pair, METHODS[job.method]
    ckpt, latent = _checkpoint(g, spec, pair)
    if caps["patcher_methods"] is None and method.patcher_method == "direct":
        fused = ckpt
        for lora, strength in ((pair.subject_lora, pair.subject_strength), (pair.style_lora, pair.style_strength),
                               *((lora.file, lora.strength) for lora in pair.added)):
            fused = g.add("LoraLoader", model=g.link(fused, 0), clip=g.link(fused, 1), lora_name=lora,
                          strength_model=strength, strength_clip=strength)
        model, clip = g.link(fused, 0), g.link(fused, 1)
    else:
        loras = g.add("LoadSubjectStyleLoRA", subject_lora=pair.subject_lora, subject_strength=pair.subject_strength,
                      style_lora=pair.style_lora, style_strength=pair.style_strength, clip=g.link(ckpt, 1))
        for lora in pair.added:
            loras = g.add("AddLoRAToSet", lora_set=g.link(loras), lora=lora.file, role=lora.role,
                          strength=lora.strength, bias=lora.bias, clip=g.link(loras, 1))
        options = dict(pair.patcher)
        if caps["patcher_methods"] is not None:
            options["method"] = method.patcher_method
        model = g.link(g.add("PLoRAModelPatcher", model=g.link(ckpt, 0), lora_pair=g.link(loras), **options))
        clip = g.link(loras, 1)
    positive = g.add("CLIPTextEncode", text=pair.prompt, clip=clip)
    negative = g.add("CLIPTextEncode", text=pair.sampler["negative"], clip=clip)
    inputs = _sampler_inputs(pair, job.seed, model, g.link(positive), g.link(negative), g.link(latent))
    if method.guided:
        subject = g.add("LoadImage", image=uploads["subject"])
        style = g.add("LoadImage", image=uploads["style"])
        clip_encoder, dino_encoder = _encoders(g, spec)
        more = {}
        for position, lora in enumerate(pair.added):
            image = g.add("LoadImage", image=uploads[lora.key(position)])
            more = {"references": g.link(g.add("PLoRAReference", image=g.link(image), role=lora.role,
                                               weight=lora.reference_weight, **more))}
        sampled = g.add("PosteriorMetricGuidanceSampler", **inputs, vae=g.link(ckpt, 2),
                        subject_reference=g.link(subject), style_reference=g.link(style),
                        clip_encoder=g.link(clip_encoder), dino_encoder=g.link(dino_encoder), **pair.guidance,
                        **({"more_references": more["references"]} if more else {}))
    else:
        sampled = g.add("KSampler", **inputs)
    decoded = g.add("VAEDecode", samples=g.link(sampled), vae=g.link(ckpt, 2))
    return g, {"image": g.add("PreviewImage", images=g.link(decoded))}


def score_graph(spec: Spec, job: Job, uploads: dict, caps: dict) -> tuple[Graph, dict]:
    """P-LoRA Score on the downloaded image: the metric code is the node's."""
    g = Graph()
    images = {role: g.add("LoadImage", image=uploads[role]) for role in ("image", "subject", "style")}
    clip_encoder, dino_encoder = _encoders(g, spec)
    score = g.add("PLoRAScore", images=g.link(images["image"]), subject_reference=g.link(images["subject"]),
                  style_reference=g.link(images["style"]), clip_encoder=g.link(clip_encoder),
                  dino_encoder=g.link(dino_encoder))
    return g, {"scores": score}


def sheet_graph(spec: Spec, job: Job, uploads: dict, caps: dict) -> tuple[Graph, dict]:
    """The pair's images as thumbnails in a labelled grid (PLoRAComparisonGrid), a row per seed."""
    g, width, height = Graph(), job.extra["width"], job.extra["height"]
    batch = None
    for role in job.extra["cells"]:
        if role in uploads:
            cell = g.add("ImageScale", image=g.link(g.add("LoadImage", image=uploads[role])),
                         upscale_method="area", width=width, height=height, crop="center")
        else:
            cell = g.add("EmptyImage", width=width, height=height, batch_size=1, color=0x808080)
        batch = cell if batch is None else g.add("ImageBatch", image1=g.link(batch), image2=g.link(cell))
    grid = g.add("PLoRAComparisonGrid", images=g.link(batch), labels="\n".join(job.extra["labels"]),
                 columns=job.extra["columns"])
    return g, {"sheet": g.add("PreviewImage", images=g.link(grid))}


GRAPHS = {"refs": references_graph, "render": render_graph, "score": score_graph, "sheet": sheet_graph}
NODES_ALWAYS = ("CheckpointLoaderSimple", "EmptyLatentImage", "CLIPTextEncode", "KSampler", "VAEDecode",
                "PreviewImage", "LoadImage", "LoraLoader", "LoadSubjectStyleLoRA", "PLoRAModelPatcher",
                "LoadPLoRACLIPEncoder", "LoadPLoRADINOEncoder", "PLoRAScore")
NODES_FOR = {"render": ("PosteriorMetricGuidanceSampler",),
             "sheet": ("ImageScale", "ImageBatch", "EmptyImage", "PLoRAComparisonGrid")}



# ---------------------------------------------------------------------------- one server


class JobFailed(Exception):
    """The server refused or failed the job; `retry` when another try may succeed."""

    def __init__(self, message: str, retry: bool):
        super().__init__(message)
        self.retry = retry


class Server:
    """One ComfyUI taking part: what it offers (nodes, files, patcher methods) and a job run on it."""

    def __init__(self, url: str, spec: Spec, timeout: float | None):
        self.comfy = Comfy(url, heartbeat=HEARTBEAT)
        self.url = self.comfy.url
        self.spec = spec
        self.timeout = timeout
        self.alive = True
        self.object_info: dict = {}
        self.caps: dict = {"patcher_methods": None}
        self.unfit: dict[tuple, str | None] = {}  # (kind, method, pair, sheet) -> why its graph does not fit
        self.status = ""                          # what it is doing, for the progress line
        self.jobs_done = 0

    def connect(self) -> str | None:
        """Read /object_info; the reason this server cannot take part, or None."""
        try:
            self.object_info = self.comfy.get("/object_info", timeout=120)
        except (ServerError, OSError, ValueError) as error:
            return f"no ComfyUI answered at {self.url} ({error})"
        missing = [n for n in NODES_ALWAYS if n not in self.object_info]
        if missing:
            return f"{self.url} lacks the node(s) {', '.join(missing)}: install or update the P-LoRA pack there"
        patcher = self.object_info["PLoRAModelPatcher"]["input"]
        method_spec = {**patcher.get("required", {}), **patcher.get("optional", {})}.get("method")
        self.caps = {"patcher_methods": combo_options(method_spec) if method_spec else None}
        wanted = [("CheckpointLoaderSimple", "ckpt_name", [self.spec.checkpoint]),
                  ("LoraLoader", "lora_name", sorted({lora for p in self.spec.pairs for lora in p.files()})),
                  ("LoadPLoRACLIPEncoder", "checkpoint", [self.spec.clip_checkpoint]),
                  ("LoadPLoRACLIPEncoder", "architecture", [self.spec.clip_architecture]),
                  ("LoadPLoRADINOEncoder", "model_folder", [self.spec.dino])]
        problems = []
        for node, name, values in wanted:
            choices = combo_options(self.object_info[node]["input"]["required"][name]) or []
            problems += [f"{name} {value!r} ({node})" for value in values if value not in choices]
        if problems:
            return f"{self.url} does not have {'; '.join(problems)}: put the files in its model folders"
        if self.caps["patcher_methods"] is None:
            logger.warning("%s: PLoRAModelPatcher has no 'method' input (an older pack): direct merges use two "
                           "LoraLoaders there, and k-lora / b-lora cannot run there.", self.url)
        return None

    def cannot_run(self, job: Job) -> str | None:
        """Why this server cannot run the job (missing nodes, patcher method, inputs), or None."""
        plain_render = job.kind == "render" and not METHODS[job.method].guided
        needed = [] if plain_render else [n for n in NODES_FOR.get(job.kind, ()) if n not in self.object_info]
        if needed:
            return f"{self.url} lacks {', '.join(needed)}"
        if job.kind == "render" and job.pair.added:
            method = METHODS[job.method]
            merged = self.caps["patcher_methods"] is None and method.patcher_method == "direct"  # LoraLoaders
            wanted = ([] if merged else ["AddLoRAToSet"]) + (["PLoRAReference"] if method.guided else [])
            needed = [n for n in wanted if n not in self.object_info]
            if needed:
                return (f"{self.url} lacks {', '.join(needed)}, needed for a set of {job.pair.size} LoRAs; "
                        "update the P-LoRA pack there")
        if job.kind == "render" and job.method in ("k-lora", "b-lora"):
            methods = self.caps["patcher_methods"]
            if methods is None or job.method not in methods:
                return (f"{self.url}'s PLoRAModelPatcher has no method {job.method!r} "
                        f"({'no method input' if methods is None else 'it offers ' + ', '.join(methods)}); "
                        "update the P-LoRA pack on the server")
        shape = (job.kind, job.method, job.pair.name, job.kind == "sheet" and job.key)
        if shape not in self.unfit:
            try:
                self.graph(job, {role: f"{UPLOAD_FOLDER}/check.png" for role in job.inputs})
                self.unfit[shape] = None
            except JobFailed as error:
                self.unfit[shape] = str(error)
        return self.unfit[shape]

    def graph(self, job: Job, uploads: dict) -> tuple[Graph, dict]:
        """The job's API-format graph with the server's defaults filled in; JobFailed if it does not fit."""
        graph, outputs = GRAPHS[job.kind](self.spec, job, uploads, self.caps)
        try:
            fill_defaults(graph.nodes, self.object_info)
        except ValueError as error:
            raise JobFailed(f"{job.title}: the graph does not fit {self.url}: {error}", retry=False) from None
        problems = check_prompt(graph.nodes, self.object_info)
        if problems:
            raise JobFailed(f"{job.title}: the graph does not fit {self.url}: " + "; ".join(problems), retry=False)
        return graph, outputs

    def run(self, job: Job) -> tuple[dict[str, bytes], dict]:
        """Queue the job's graph, wait for it; (images by role, record fields). ServerGone or JobFailed."""
        started = time.monotonic()
        uploads = {role: self.comfy.upload(path.read_bytes(), UPLOAD_FOLDER) for role, path in job.inputs.items()}
        graph, outputs = self.graph(job, uploads)
        labels = graph.labels()
        where = f"{job.title} on {self.url}"
        try:
            entry = self.comfy.run(graph.nodes, self.timeout, lambda event: self._show(job, event, labels))
        except PromptRefused as error:  # 400: the graph was refused, not retried; 5xx: the server failed
            raise JobFailed(f"{where}: {describe_refusal(error.body, labels)}", retry=error.status >= 500) from None
        except PromptFailed as error:
            raise JobFailed(f"{where}: {describe_failure(error.data, labels)}", retry=True) from None
        except PromptTimeout as error:
            raise JobFailed(f"{where}: {error} (--timeout)", retry=True) from None
        except ServerError as error:
            raise JobFailed(f"{where}: the server answered {error.status} ({error.url})", retry=True) from None
        images, record = {}, {"server": self.url, "prompt_id": entry["prompt"][1] if entry.get("prompt") else None}
        for role, node_id in outputs.items():
            output = entry.get("outputs", {}).get(node_id, {})
            if job.kind == "score":
                rows = output.get(SCORE_UI_KEY) or []
                if not rows or not all(isinstance(rows[0].get(m), (int, float)) for m in METRICS):
                    raise JobFailed(f"{where}: PLoRAScore returned no scores", retry=True)
                record["scores"] = {m: float(rows[0][m]) for m in METRICS}
            elif output.get("images"):
                try:
                    images[role] = self.comfy.download(output["images"][0])
                except ServerError as error:
                    raise JobFailed(f"{where}: /view answered {error.status}", retry=True) from None
            else:
                raise JobFailed(f"{where}: {labels[node_id]} returned no image", retry=True)
        record["seconds"] = round(time.monotonic() - started, 2)
        return images, record

    def _show(self, job: Job, event: dict, labels: dict) -> None:
        data = event.get("data") or {}
        if event.get("type") == "executing" and data.get("node") is not None:
            self.status = f"{job.title}: {labels.get(str(data['node']), data['node'])}"
        elif event.get("type") == "progress":
            self.status = f"{job.title}: step {data.get('value')}/{data.get('max')}"


# ---------------------------------------------------------------------------- progress and the work pool


class Progress:
    """One line on stderr (redrawn in place on a terminal, a line per finished job otherwise)."""

    def __init__(self, servers: list[Server], stream=None):
        self.servers = servers
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()
        self.lock = threading.RLock()
        self.phase, self.total, self.done, self.failed, self.started = "", 0, 0, 0, time.monotonic()
        self.drawn = False

    def begin(self, phase: str, total: int, skipped: int) -> None:
        with self.lock:
            self.phase, self.total, self.done, self.failed, self.started = phase, total, 0, 0, time.monotonic()
            logger.info("%s: %d to do%s", phase, total, f" ({skipped} already done, skipped)" if skipped else "")

    def finished(self, job: Job, where: str, ok: bool) -> None:
        with self.lock:
            self.done += 1
            self.failed += 0 if ok else 1
            if not self.interactive:
                logger.info("[%s %d/%d] %s: %s%s", self.phase, self.done, self.total, job.title,
                            "done" if ok else "FAILED", f" on {where}" if where else "")
            self.draw()

    def line(self) -> str:
        done, total = self.done, max(self.total, 1)
        filled = int(24 * done / total)
        eta = ""
        if 0 < done < total:
            left = int((time.monotonic() - self.started) / done * (total - done))
            eta = f" ETA {left // 60}m{left % 60:02d}s"
        failed = f" {self.failed} failed" if self.failed else ""
        busy = " | ".join(s.status for s in self.servers if s.alive and s.status)
        text = f"{self.phase} {done}/{self.total} [{'#' * filled}{'.' * (24 - filled)}]{failed}{eta}  {busy}"
        return text[:shutil.get_terminal_size((120, 20)).columns - 1]

    def draw(self) -> None:
        if self.interactive and self.total:
            with self.lock:
                self.stream.write("\r\033[K" + self.line())
                self.stream.flush()
                self.drawn = True

    def end(self) -> None:
        with self.lock:
            self.clear()
            self.total = 0  # nothing to draw until the next phase begins

    def clear(self) -> None:
        if self.interactive and self.drawn:
            self.stream.write("\r\033[K")
            self.drawn = False


class ProgressHandler(logging.StreamHandler):
    """Log lines above the progress line."""

    def __init__(self, progress: Progress):
        super().__init__(progress.stream)
        self.progress = progress

    def emit(self, record):
        with self.progress.lock:
            self.progress.clear()
            super().emit(record)
            self.progress.draw()


class Pool:
    """Runs jobs on the servers, one at a time each; moves a lost server's job to the others."""

    def __init__(self, servers: list[Server], retries: int, progress: Progress):
        self.servers, self.retries, self.progress = servers, retries, progress
        self.cond = threading.Condition()

    def run(self, phase: str, jobs: list[Job], skipped: int) -> dict[Job, str]:
        """Run `jobs`; returns {job: why it failed} for those that did not finish."""
        self.queue, self.in_flight, self.failures = deque(jobs), 0, {}
        self.progress.begin(phase, len(jobs), skipped)
        for job in jobs:
            reasons = [s.cannot_run(job) for s in self.servers if s.alive]
            if reasons and all(reasons):
                self.queue.remove(job)
                self._fail(job, None, f"{job.title}: no server can run it: {'; '.join(reasons)}")
        workers = [threading.Thread(target=self._work, args=(s,), daemon=True) for s in self.servers if s.alive]
        for worker in workers:
            worker.start()
        while any(worker.is_alive() for worker in workers):
            for worker in workers:
                worker.join(timeout=0.2)
            self.progress.draw()
        for job in self.queue:
            self._fail(job, None, f"{job.title}: not run, no server left that can run it")
        self.progress.end()
        return self.failures

    def _take(self, server: Server) -> Job | None:
        with self.cond:
            while server.alive:
                runnable = [job for job in self.queue if server.cannot_run(job) is None]
                if runnable:
                    job = next((j for j in runnable if server.url not in j.tried_on), runnable[0])
                    self.queue.remove(job)
                    self.in_flight += 1
                    return job
                if self.in_flight == 0:
                    return None
                self.cond.wait(timeout=1.0)
            return None

    def _fail(self, job: Job, server: Server | None, message: str) -> None:
        self.failures[job] = message
        logger.error(message)
        self.progress.finished(job, server.url if server else "", ok=False)

    def _work(self, server: Server) -> None:
        while (job := self._take(server)) is not None:
            requeue = False
            try:
                images, record = server.run(job)
                finish(job, images, record)
                server.jobs_done += 1
                self.progress.finished(job, server.url, ok=True)
            except ServerGone as error:
                server.alive = False
                logger.warning("%s; its job (%s) goes to the other servers.", error, job.title)
                requeue = True
            except JobFailed as error:
                job.attempts += 1
                job.tried_on.add(server.url)
                if error.retry and job.attempts <= self.retries:
                    logger.warning("%s\n(try %d of %d; trying again)", error, job.attempts, self.retries + 1)
                    requeue = True
                else:
                    self._fail(job, server, str(error))
            except OSError as error:  # a slow answer or a bad download: counts as a failed try
                job.attempts += 1
                if job.attempts <= self.retries:
                    logger.warning("%s on %s: %s (trying again)", job.title, server.url, error)
                    requeue = True
                else:
                    self._fail(job, server, f"{job.title} on {server.url}: {error}")
            except Exception as error:  # an answer of an unexpected shape: reported, not retried
                self._fail(job, server, f"{job.title} on {server.url}: unexpected {type(error).__name__}: {error}")
            finally:
                server.status = ""
                with self.cond:
                    if requeue:
                        self.queue.append(job)
                    self.in_flight -= 1
                    self.cond.notify_all()


# ---------------------------------------------------------------------------- the run


def plan_sheet(spec: Spec, pair: Pair, refs: dict, renders: dict, scores: dict, out: Path) -> Job:
    """A contact sheet job: per seed, the references then each method, labelled with the image's scores."""
    cells, labels, inputs = [], [], {}
    given = {"subject": pair.subject_image, "style": pair.style_image}
    skipped = {m for m, names in skipped_methods(spec).items() if pair.name in names}
    for seed in spec.seeds:
        ref = refs.get(seed)
        row = [(role if given.get(role) else f"{role}.{seed}",
                f"{role} image" if given.get(role) else f"{role} ref, seed {seed}",
                given.get(role) or (ref.outputs[role] if ref else None)) for role in pair.reference_roles()]
        for method in spec.methods:
            render, score = renders.get((seed, method)), scores.get((seed, method))
            text = ("skipped (pair only)" if method in skipped else "failed") if render is None else (
                " ".join(f"{label[0]}{score[m] * 100:.0f}" for m, label in METRICS.items()) if score else "not scored")
            row.append((f"{method}.{seed}", f"{method}: {text}", render.outputs["image"] if render else None))
        for cell, label, path in row:
            cells.append(cell)
            labels.append(label)
            if path is not None and path.is_file():
                inputs[cell] = path
    width = spec.sheet_size
    height = max(8, round(width * pair.sampler["height"] / pair.sampler["width"]))
    extra = {"cells": cells, "labels": labels, "columns": pair.size + len(spec.methods), "width": width,
             "height": height}
    key = digest({"kind": "sheet", "extra": extra, "images": {k: file_sha(p) for k, p in inputs.items()}})
    return Job("sheet", pair, None, None, key, out / "sheets" / f"{pair.name}.json",
               outputs={"sheet": out / "sheets" / f"{pair.name}.png"}, inputs=inputs, extra=extra)


def skipped_methods(spec: Spec) -> dict[str, list[str]]:
    """method -> the entries it is not run for: k-lora and b-lora for sets of more than two LoRAs."""
    skipped = {m: [p.name for p in spec.pairs if p.added] for m in spec.methods if m in PAIR_ONLY}
    return {m: names for m, names in skipped.items() if names}


def run_phase(pool: Pool, phase: str, jobs: list[Job]) -> tuple[list[Job], dict[Job, str]]:
    """(finished jobs, {failed job: why}); finished ones from an earlier run are skipped."""
    todo = [job for job in jobs if read_record(job) is None]
    failures = pool.run(phase, todo, len(jobs) - len(todo)) if todo else {}
    if not todo:
        logger.info("%s: all %d already done", phase, len(jobs))
    return [job for job in jobs if job not in failures and read_record(job) is not None], failures


def write_tables(spec: Spec, rows: list[dict], out: Path, skipped: dict[str, list[str]] | None = None) -> str:
    """scores.csv (every image), table1.csv and table1.md (mean and standard deviation per method, percent)."""
    with open(out / "scores.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["pair", "method", "seed", *METRICS])
        for row in rows:
            writer.writerow([row["pair"], row["method"], row["seed"], *(f"{row[m]:.6f}" for m in METRICS)])
    summary = []
    for method in spec.methods:
        values = {m: [r[m] * 100 for r in rows if r["method"] == method] for m in METRICS}
        count = len(values["style_sim"])
        stats = {m: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0) if v else None
                 for m, v in values.items()}
        summary.append((method, count, stats))
    with open(out / "table1.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "images", *(f"{m}_{s}" for m in METRICS for s in ("mean", "std"))])
        for method, count, stats in summary:
            writer.writerow([method, count, *(f"{v:.3f}" if stats[m] else "" for m in METRICS
                                              for v in (stats[m] or (0, 0)))])
    pairs = len({r["pair"] for r in rows})
    lines = ["| Method | " + " | ".join(f"{label} ↑" for label in METRICS.values()) + " | images |",
             "|---|" + "---|" * (len(METRICS) + 1)]
    for method, count, stats in summary:
        cells = [f"{stats[m][0]:.1f} ± {stats[m][1]:.1f}" if stats[m] else "–" for m in METRICS]
        lines.append(f"| {METHODS[method].label} | " + " | ".join(cells) + f" | {count} |")
    sampler = spec.pairs[0].sampler
    note = (f"Mean ± standard deviation over images, in percent (cosine similarity x 100); {pairs} pair(s) x "
            f"{len(spec.seeds)} seed(s); {spec.checkpoint}, {sampler['width']}x{sampler['height']}, "
            f"{sampler['steps']} steps {sampler['sampler_name']}/{sampler['scheduler']}, cfg {sampler['cfg']}; "
            f"CLIP {spec.clip_architecture} ({spec.clip_checkpoint}), DINO {spec.dino}.")
    for method, names in (skipped or {}).items():
        note += (f" {METHODS[method].label}: not run for {', '.join(names)} (more than two LoRAs; it takes only a "
                 "subject/style pair).")
    table = "\n".join(lines)
    (out / "table1.md").write_text(f"{table}\n\n{note}\n", encoding="utf-8")
    return table


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pairs", type=Path, help="the JSON file of subject/style LoRA pairs, prompts and settings")
    parser.add_argument("--server", action="append", required=True, metavar="URL",
                        help="a running ComfyUI with the P-LoRA pack (repeat for several servers)")
    parser.add_argument("--out", type=Path, default=Path("eval_results"), help="results folder (resumed if present)")
    parser.add_argument("--seeds", type=int, help="seeds 0..N-1 per pair (default: the file's 'seeds', else 10)")
    parser.add_argument("--methods", help=f"comma-separated, from {', '.join(METHODS)} (default: the file's, else all)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="give up on a job after this many seconds (default: wait as long as it takes)")
    parser.add_argument("--retries", type=int, default=1, help="extra tries for a job that failed (default 1)")
    parser.add_argument("--sheet-size", type=int, default=256, help="width of a contact-sheet cell in pixels")
    parser.add_argument("--no-sheets", action="store_true", help="skip the contact sheets")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    servers: list[Server] = []
    progress = Progress(servers)
    handler = ProgressHandler(progress)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        spec = load_spec(args.pairs, args.seeds, args.methods, args.sheet_size)
    except SpecError as error:
        logger.error("%s", error)
        return 2
    servers += [Server(url, spec, args.timeout) for url in dict.fromkeys(args.server)]
    for server in servers:
        problem = server.connect()
        if problem:
            logger.error("Not using %s: %s", server.url, problem)
            server.alive = False
    if not any(s.alive for s in servers):
        logger.error("No usable ComfyUI server; start one with the P-LoRA pack and the files above.")
        return 1
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "pairs.json").write_text(args.pairs.read_text(encoding="utf-8"), encoding="utf-8")
    pool = Pool(servers, args.retries, progress)
    started = time.monotonic()
    try:
        failures = run(spec, pool, out, not args.no_sheets)
    except KeyboardInterrupt:
        progress.clear()
        logger.error("Interrupted. Finished images and scores are kept in %s; the same command resumes.", out)
        return 130
    counts = ", ".join(f"{s.url}: {s.jobs_done} job(s)" + ("" if s.alive else " (lost)") for s in servers)
    logger.info("Finished in %.0f s (%s). Results in %s", time.monotonic() - started, counts, out)
    if failures:
        logger.error("%d job(s) failed:\n%s", len(failures), "\n".join(f"- {m}" for m in failures.values()))
        if not any(s.alive for s in servers):
            logger.error("No server is left; start one and run the same command to resume.")
        return 1
    return 0


def run(spec: Spec, pool: Pool, out: Path, sheets: bool) -> dict[Job, str]:
    """The four phases: references, renders, scores, contact sheets; then the tables. {failed job: why}."""
    guided = any(METHODS[m].guided for m in spec.methods)
    ref_jobs = {(p.name, seed): reference_job(spec, p, seed, out) for p in spec.pairs for seed in spec.seeds
                if guided or p.subject_image is None or p.style_image is None}
    done, failures = run_phase(pool, "references", list(ref_jobs.values()))
    refs = {(job.pair.name, job.seed): job for job in done}

    skipped = skipped_methods(spec)
    for method, names in skipped.items():
        logger.info("Note: %s is skipped for %s: it takes only a subject/style pair, and %s more than two LoRAs "
                    "(not an error).", method, ", ".join(names), "this entry has" if len(names) == 1 else
                    "these entries have")
    render_jobs = []
    for pair in spec.pairs:
        for seed in spec.seeds:
            for method in spec.methods:
                if pair.name in skipped.get(method, ()):
                    continue
                ref = refs.get((pair.name, seed))
                if METHODS[method].guided and ref is None:
                    continue  # its references failed (reported above)
                render_jobs.append(render_job(spec, pair, seed, method, ref, out))
    done, failed = run_phase(pool, "renders", render_jobs)
    failures.update(failed)
    renders = {(job.pair.name, job.seed, job.method): job for job in done}

    score_jobs = []
    for (name, seed, _method), render in renders.items():
        references = score_references(render.pair, refs.get((name, seed)))
        if references is not None:
            score_jobs.append(score_job(spec, render, references, out))
    done, failed = run_phase(pool, "scores", score_jobs)
    failures.update(failed)
    rows = [{"pair": job.pair.name, "method": job.method, "seed": job.seed, **read_record(job)["scores"]}
            for job in done]
    rows.sort(key=lambda r: (r["pair"], spec.methods.index(r["method"]), r["seed"]))
    table = write_tables(spec, rows, out, skipped)
    logger.info("Table 1 (%s):\n%s", out / "table1.md", table)

    if sheets:
        scores = {(r["pair"], r["seed"], r["method"]): r for r in rows}
        sheet_jobs = [plan_sheet(spec, p, {seed: refs.get((p.name, seed)) for seed in spec.seeds},
                                 {(seed, m): renders.get((p.name, seed, m)) for seed in spec.seeds for m in spec.methods
                                  if (p.name, seed, m) in renders},
                                 {(seed, m): scores[(p.name, seed, m)] for seed in spec.seeds for m in spec.methods
                                  if (p.name, seed, m) in scores}, out)
                      for p in spec.pairs]
        _, failed = run_phase(pool, "contact sheets", sheet_jobs)
        failures.update(failed)
    return failures


if __name__ == "__main__":
    sys.exit(main())
