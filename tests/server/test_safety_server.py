"""Issue 8 against a real ComfyUI server, sent as a real client would: names that leave the model folders,
FIFOs, devices, NaN and out-of-range numbers for every numeric input of every node, /free, and the
messages users see. Every attack is answered by a node error within seconds and the server keeps serving.
"""

import copy
import json
import math
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from support import server_support
from support.server_support import ANY_VALUE_NODE, SINK_NODE
from test_server import shipped, small_api_prompt

ANY = "9001"
SINK = "9002"
FAST = 30.0  # seconds: "within a few seconds" on a loaded 2-core CI machine; a blocked worker never answers


@pytest.fixture(scope="module")
def full_prompt(object_info):
    return small_api_prompt(shipped("plora_sdxl.json"), object_info)


@pytest.fixture(scope="module")
def places(base_directory):
    """Files outside the model folders that would change the image if read (a valid, strong LoRA, a CLIP
    checkpoint, a DINO folder), FIFOs inside and outside them, and a corrupt LoRA inside."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    models = base_directory / "models"
    outside = base_directory / "outside"
    outside.mkdir(exist_ok=True)
    strong = {k: v * 50 if k.endswith("up.weight") else v
              for k, v in load_file(str(models / "loras" / server_support.SUBJECT_LORA)).items()}
    save_file(strong, str(outside / "strong.safetensors"))
    shutil.copy(models / "open_clip" / server_support.CLIP_FILE, outside / "clip.safetensors")
    shutil.copytree(models / "dino" / server_support.DINO_FOLDER, outside / "dino", dirs_exist_ok=True)
    fifos = [outside / "blocking.safetensors", models / "loras" / "blocking_fifo.safetensors",
             models / "open_clip" / "blocking_fifo.safetensors"]
    for fifo in fifos:
        if not fifo.exists():
            os.mkfifo(fifo)
    corrupt = models / "loras" / "corrupt_lora.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + bytes(64))
    teonly = models / "loras" / "text_encoder_only.safetensors"
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3072, 4)}, str(teonly))
    yield {"base": base_directory, "models": models, "outside": outside, "fifos": fifos}
    for path in (*fifos, corrupt, teonly):
        unblock(path)
        os.remove(path)


def unblock(path) -> None:
    """Open a FIFO's write end once, non-blocking, so a reader stuck on it (a regression) returns."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # no reader: nothing blocked on it


def node_error(server, prompt, timeout=FAST, what="") -> tuple[str, str, str]:
    """(node id, exception type, message) of the error a prompt ends with; fails unless it ends in time
    (server.wait raises TimeoutError) with an error. A refusal by ComfyUI's validation counts, with type
    'validation'."""
    status, answer = server.post("/prompt", {"prompt": prompt})
    if answer.get("node_errors"):  # refused by validation (400), or only the outputs without errors run (200)
        node_id, errors = next(iter(answer["node_errors"].items()))
        if status == 200:
            server.wait(answer["prompt_id"], timeout)
        return node_id, "validation", json.dumps(errors)
    assert status == 200, (what, answer)
    history = server.wait(answer["prompt_id"], timeout)
    assert history["status"]["status_str"] == "error", (what, history["status"], history.get("outputs"))
    error = next(data for event, data in history["status"]["messages"] if event == "execution_error")
    return error["node_id"], error["exception_type"], error["exception_message"]


def still_serving(server):
    assert server.get("/system_stats", timeout=5)["system"]
    assert server.get("/queue", timeout=5)["queue_running"] == []


def attack(node_type: str, input_name: str, value, other_inputs: dict) -> dict:
    """The any-type node feeding `value` into one input of `node_type`, and an output node after it."""
    inputs = {**other_inputs, input_name: [ANY, 0]}
    return {ANY: {"class_type": ANY_VALUE_NODE, "inputs": {"value_json": json.dumps(value)}},
            "1": {"class_type": node_type, "inputs": inputs},
            SINK: {"class_type": SINK_NODE, "inputs": {"value": ["1", 0]}}}


LOADER = {"subject_strength": 1.0, "style_lora": server_support.STYLE_LORA, "style_strength": 1.0,
          "subject_lora": server_support.SUBJECT_LORA}


def test_lora_names_outside_the_folder_get_the_core_loaders_error(server, places):
    outside = places["outside"]
    names = [str(outside / "strong.safetensors"), str(outside / "missing.safetensors"), "/etc/passwd",
             "/etc/shadow", "/dev/zero", str(outside), "../outside/strong.safetensors",
             f"../../{outside.name}/strong.safetensors", str(places["fifos"][0]), "loras/../../etc/passwd"]
    before = server.get("/plora/cache_info")["loras"]
    messages = set()
    for name in names:
        node_id, kind, message = node_error(server, attack("LoadSubjectStyleLoRA", "subject_lora", name, LOADER))
        assert (node_id, kind) == ("1", "FileNotFoundError"), message
        messages.add(message.replace(name, "<name>").strip())
    assert messages == {"Model in folder 'loras' with filename '<name>' not found."}, messages
    assert server.get("/plora/cache_info")["loras"] == before, "no file outside the folder was read"
    still_serving(server)


def test_a_fifo_inside_the_model_folder_is_refused_without_blocking_the_worker(server, places):
    """The FIFO is listed in models/loras, so ComfyUI's own list validation lets its name through."""
    lora_fifo, clip_fifo = places["fifos"][1], places["fifos"][2]
    prompts = [
        {"1": {"class_type": "LoadSubjectStyleLoRA", "inputs": {**LOADER, "subject_lora": lora_fifo.name}},
         SINK: {"class_type": SINK_NODE, "inputs": {"value": ["1", 0]}}},
        {"1": {"class_type": "LoadPLoRACLIPEncoder",
               "inputs": {"checkpoint": clip_fifo.name, "architecture": "PLoRA-Tiny-ViT", "precision": "fp32"}},
         SINK: {"class_type": SINK_NODE, "inputs": {"value": ["1", 0]}}},
    ]
    watchdog = threading.Timer(2 * FAST, lambda: [unblock(f) for f in places["fifos"]])
    watchdog.start()
    try:
        for prompt in prompts:
            node_id, kind, message = node_error(server, prompt)
            assert kind == "FileNotFoundError" and "blocking_fifo.safetensors' not found" in message
        assert lora_info(server, lora_fifo.name)[0] == 404  # the route runs on the server's event loop
    finally:
        watchdog.cancel()
    still_serving(server)


def test_encoder_names_outside_their_folders_are_refused(server, places):
    outside = places["outside"]
    clip_inputs = {"architecture": "PLoRA-Tiny-ViT", "precision": "fp32"}
    for name in (str(outside / "clip.safetensors"), "../../outside/clip.safetensors", "/etc/passwd"):
        _, kind, message = node_error(server, attack("LoadPLoRACLIPEncoder", "checkpoint", name, clip_inputs))
        assert kind == "FileNotFoundError" and "Model in folder 'open_clip'" in message, message
    for name in (str(outside / "dino"), "../../outside/dino", ".", "/", f"{server_support.DINO_FOLDER}/config.json"):
        _, kind, message = node_error(server, attack("LoadPLoRADINOEncoder", "model_folder", name,
                                                     {"precision": "fp32"}))
        assert kind == "FileNotFoundError" and "Model in folder 'dino'" in message, message
    clip_inputs = {"checkpoint": server_support.CLIP_FILE, "precision": "fp32"}
    _, kind, message = node_error(server, attack("LoadPLoRACLIPEncoder", "architecture", "hf-hub:timm/ViT-B-32",
                                                 clip_inputs))
    assert kind == "ValueError" and message.startswith(
        "LoadPLoRACLIPEncoder: input 'architecture' is 'hf-hub:timm/ViT-B-32', which is not one of its choices")
    _, kind, message = node_error(server, attack("LoadPLoRACLIPEncoder", "architecture", ["ViT-B-32"], clip_inputs))
    assert kind == "ValueError" and "input 'architecture' must be one of its list's names, not list" in message
    _, kind, message = node_error(server, attack("LoadPLoRADINOEncoder", "model_folder", [server_support.DINO_FOLDER],
                                                 {"precision": "fp32"}))
    assert kind == "ValueError" and "input 'model_folder' must be one of its list's names, not list" in message
    still_serving(server)


def test_the_packs_errors_name_files_not_install_paths(server, places):
    base = str(places["base"])
    prompt = {"1": {"class_type": "LoadSubjectStyleLoRA",
                    "inputs": {**LOADER, "subject_lora": "corrupt_lora.safetensors"}},
              SINK: {"class_type": SINK_NODE, "inputs": {"value": ["1", 0]}}}
    _, kind, message = node_error(server, prompt)
    assert kind == "plora.LoraFileError", kind  # not "<install path>.plora_core.lora_file.LoraFileError"
    assert "corrupt_lora.safetensors could not be read" in message and base not in message

    answer = lora_info(server, "corrupt_lora.safetensors")
    assert answer[0] == 422 and "corrupt_lora.safetensors" in answer[1]["error"] and base not in json.dumps(answer)
    for name in ("../../../../etc/passwd", str(places["outside"] / "strong.safetensors"), "blocking_fifo.safetensors"):
        assert lora_info(server, name)[0] == 404, name
    assert lora_info(server, server_support.SUBJECT_LORA)[1]["name"] == server_support.SUBJECT_LORA


def lora_info(server, name):
    url = f"{server.url}/plora/lora_info?name={urllib.parse.quote(name)}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def test_a_text_encoder_only_lora_is_refused_with_a_message(server, places):
    prompt = {"1": {"class_type": "LoadSubjectStyleLoRA",
                    "inputs": {**LOADER, "style_lora": "text_encoder_only.safetensors"}},
              SINK: {"class_type": SINK_NODE, "inputs": {"value": ["1", 0]}}}
    _, kind, message = node_error(server, prompt)
    assert kind == "plora.LoraFileError"
    assert "text_encoder_only.safetensors holds only text-encoder weights" in message


def numeric_inputs(object_info):
    for node_type, info in object_info.items():
        if info.get("category") != "P-LoRA":
            continue
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                if spec[0] in ("INT", "FLOAT"):
                    yield node_type, name, spec[0], spec[1] if len(spec) > 1 else {}


KSAMPLER_INPUTS = ("model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative", "latent_image",
                   "denoise")


def guided_model_prompt(prompt: dict) -> dict:
    """The SDXL workflow with its guided sampler split into P-LoRA Metric Guidance + KSampler: the Flux
    workflow's path (whose T5 encoder is too large to run here) on the tiny SD1.5 checkpoint."""
    prompt = copy.deepcopy(prompt)
    sampler = next(k for k, n in prompt.items() if n["class_type"] == "PosteriorMetricGuidanceSampler")
    inputs = prompt[sampler]["inputs"]
    prompt["plora_guided_model"] = {"class_type": "PLoRAMetricGuidance", "inputs": {
        k: v for k, v in inputs.items() if k == "model" or k not in KSAMPLER_INPUTS}}
    prompt[sampler] = {"class_type": "KSampler", "inputs": {
        **{k: inputs[k] for k in KSAMPLER_INPUTS}, "model": ["plora_guided_model", 0]}}
    for node in prompt.values():  # nothing reads the guidance_log output that KSampler lacks
        assert all(value != [sampler, 1] for value in node["inputs"].values())
    return prompt


def test_every_numeric_input_of_every_node_refuses_nan_and_out_of_range(server, object_info, full_prompt):
    inputs = list(numeric_inputs(object_info))
    assert len(inputs) >= 15
    workflows = [full_prompt, small_api_prompt(shipped("plora_comparison.json"), object_info),
                 guided_model_prompt(full_prompt), small_api_prompt(shipped("plora_three_loras.json"), object_info)]
    homes = {}  # node type -> (prompt, node id) of a shipped workflow that uses it
    for prompt in reversed(workflows):
        homes.update({node["class_type"]: (prompt, node_id) for node_id, node in prompt.items()})
    missing = {node_type for node_type, *_ in inputs} - set(homes)
    assert not missing, f"every node with numbers is in a shipped workflow: {missing}"
    # the selection map first: the sampler's valid output stays cached for it
    inputs.sort(key=lambda item: item[0] != "PLoRASelectionMap")
    for node_type, name, _, options in inputs:
        base, node_id = homes[node_type]
        for value in (math.nan, options["max"] + 1 if "max" in options else options["min"] - 1):
            prompt = copy.deepcopy(base)
            if isinstance(value, float) and math.isnan(value):
                prompt[node_id]["inputs"][name] = value  # a widget value: JSON NaN, accepted by /prompt
            else:  # out of range through a link, where ComfyUI checks no range
                prompt[ANY] = {"class_type": ANY_VALUE_NODE, "inputs": {"value_json": json.dumps(value)}}
                prompt[node_id]["inputs"][name] = [ANY, 0]
            failed_node, error_type, message = node_error(server, prompt, 300, f"{node_type}.{name} = {value}")
            assert failed_node == node_id, (node_type, name, value, message)
            assert name in message, (node_type, name, value, message)
            if error_type != "validation":  # INT NaN is refused by ComfyUI itself at /prompt
                assert error_type == "ValueError" and message.startswith(f"{node_type}: input '{name}'"), message
    still_serving(server)


def test_an_empty_gate_window_is_a_note_not_a_failure(server, full_prompt):
    prompt = copy.deepcopy(full_prompt)
    patcher = next(k for k, n in prompt.items() if n["class_type"] == "PLoRAModelPatcher")
    selection = next(k for k, n in prompt.items() if n["class_type"] == "PLoRASelectionMap")
    prompt[patcher]["inputs"].update(start_percent=0.9, end_percent=0.95)  # sigma 0.34..0.18: no step of 2
    history = server.run_prompt(prompt)
    assert history["status"]["status_str"] == "success", history["status"]
    (note,) = history["outputs"][selection]["text"]
    assert "held none of the last run's" in note and "sampler" not in note

    prompt[patcher]["inputs"].update(start_percent=0.0, end_percent=1.0)
    prompt[selection]["inputs"]["image_index"] = 3
    node_id, kind, message = node_error(server, prompt, timeout=300)
    assert (node_id, kind) == (selection, "ValueError") and "image_index 3 is past the batch" in message


def free_and_wait(server) -> dict:
    """POST /free {"unload_models": true}; the pack's caches once ComfyUI's worker has handled it.

    The worker handles /free's flags when it wakes from waiting for the queue. A /free that arrives while
    it is still finishing a prompt (ComfyUI v0.3.x sets the flag and notifies no one then) waits for the
    next prompt: a prompt of the test node alone makes that happen, without touching the pack.
    """
    time.sleep(1.0)  # let the worker finish the last prompt and wait for the queue
    status, _ = server.post("/free", {"unload_models": True})
    assert status == 200
    deadline, wake_at = time.time() + FAST, time.time() + 5
    woken = False
    while time.time() < deadline:
        caches = server.get("/plora/cache_info")
        if caches["loras"]["entries"] == 0 and caches["encoders"]["entries"] == 0:
            return caches
        if not woken and time.time() > wake_at:
            noop = {ANY: {"class_type": ANY_VALUE_NODE, "inputs": {"value_json": "1"}},
                    SINK: {"class_type": SINK_NODE, "inputs": {"value": [ANY, 0]}}}
            server.post("/prompt", {"prompt": noop})
            woken = True
        time.sleep(0.2)
    return caches


def test_free_with_unload_models_empties_the_caches_and_the_next_run_works(server, full_prompt):
    history = server.run_prompt(full_prompt)
    assert history["status"]["status_str"] == "success", history["status"]
    prompt = copy.deepcopy(full_prompt)
    loader = next(k for k, n in prompt.items() if n["class_type"] == "LoadSubjectStyleLoRA")
    prompt[loader]["inputs"]["subject_strength"] = 0.9  # the loader runs again (not from ComfyUI's cache)
    assert server.run_prompt(prompt)["status"]["status_str"] == "success"
    caches = server.get("/plora/cache_info")
    assert caches["loras"]["entries"] >= 1 and caches["loras"]["bytes"] > 0
    assert caches["loras"]["bytes"] <= caches["loras"]["limit_bytes"] and caches["encoders"]["entries"] >= 1

    caches = free_and_wait(server)
    assert caches["loras"] == {"entries": 0, "bytes": 0, "limit_bytes": caches["loras"]["limit_bytes"]}
    assert caches["encoders"]["entries"] == 0

    prompt[loader]["inputs"]["subject_strength"] = 0.8
    history = server.run_prompt(prompt)
    assert history["status"]["status_str"] == "success", history["status"]
    assert server.get("/plora/cache_info")["loras"]["entries"] >= 1


# ---------------------------------------------------------------- issue 19: a shared server one bad prompt
# cannot stall or poison. Each attack is followed by a core txt2img prompt that must still run, and by a
# /history that must still be standard JSON (no NaN, no Infinity) for every browser.

CAFE = os.fsdecode(b"caf\xe9.safetensors")  # Latin-1 bytes from an unzipped archive: a lone surrogate in the str
BROKEN = os.fsdecode(b"cass\xe9.safetensors")
CAFE_SHOWN, BROKEN_SHOWN = "caf\\xe9.safetensors", "cass\\xe9.safetensors"


def not_json(constant):
    raise ValueError(f"/history holds {constant}, which is not standard JSON")


def history_is_standard_json(server) -> dict:
    with urllib.request.urlopen(f"{server.url}/history", timeout=30) as response:
        return json.loads(response.read(), parse_constant=not_json)


def core_txt2img(seed: int) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": server_support.CHECKPOINT}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a dog", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "seed": seed, "steps": 1, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "preview": {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}},
    }


def still_works(server, seed: int) -> None:
    """The worker survived: a core txt2img prompt runs to an image, and /history parses as standard JSON."""
    history = server.run_prompt(core_txt2img(seed))
    assert history["status"]["status_str"] == "success", history["status"]
    assert history["outputs"]["preview"]["images"]
    history_is_standard_json(server)
    still_serving(server)


@pytest.fixture(scope="module")
def non_utf8_files(places):
    import shutil

    models = places["models"]
    files = {"lora": models / "loras" / CAFE, "broken": models / "loras" / BROKEN,
             "clip": models / "open_clip" / CAFE}
    shutil.copy(models / "loras" / server_support.SUBJECT_LORA, files["lora"])
    files["broken"].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + bytes(64))
    shutil.copy(models / "open_clip" / server_support.CLIP_FILE, files["clip"])
    yield files
    for path in files.values():
        os.remove(path)


def test_loras_with_non_utf8_names_are_named_escaped_and_the_worker_survives(server, places, full_prompt,
                                                                             non_utf8_files):
    server.post("/history", {"clear": True})
    prompt = copy.deepcopy(full_prompt)
    loader = next(k for k, n in prompt.items() if n["class_type"] == "LoadSubjectStyleLoRA")
    prompt[loader]["inputs"]["subject_lora"] = CAFE
    history = server.run_prompt(prompt)
    assert history["status"]["status_str"] == "success", history["status"]

    broken = {"1": {"class_type": "LoadSubjectStyleLoRA", "inputs": {**LOADER, "style_lora": BROKEN}},
              SINK: {"class_type": SINK_NODE, "inputs": {"value": ["1", 0]}}}
    _, kind, message = node_error(server, broken)
    assert kind == "plora.LoraFileError" and f"{BROKEN_SHOWN} could not be read" in message, message
    assert str(places["base"]) not in message
    still_works(server, 1)


def test_a_clip_checkpoint_with_a_non_utf8_name_loads_and_its_errors_are_escaped(server, places, non_utf8_files):
    server.post("/history", {"clear": True})
    load = {"1": {"class_type": "LoadPLoRACLIPEncoder",
                  "inputs": {"checkpoint": CAFE, "architecture": "PLoRA-Tiny-ViT", "precision": "fp32"}},
            SINK: {"class_type": SINK_NODE, "inputs": {"value": ["1", 0]}}}
    history = server.run_prompt(load, timeout=FAST)
    assert history["status"]["status_str"] == "success", history["status"]
    load["1"]["inputs"]["architecture"] = "ViT-bigG-14"  # 7 GB if built: refused from the shapes alone
    _, kind, message = node_error(server, load)
    assert kind == "plora.EncoderLoadError", message
    assert f"{CAFE_SHOWN} does not fit open_clip architecture 'ViT-bigG-14'" in message, message
    assert str(places["base"]) not in message
    still_works(server, 2)


def test_a_12000_character_label_draws_quickly(server):
    server.post("/history", {"clear": True})
    label = ("a very long label that goes on " * 400)[:12_000]
    prompt = {"image": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2,
                                                                "color": 0}},
              "grid": {"class_type": "PLoRAComparisonGrid", "inputs": {"images": ["image", 0], "labels": label,
                                                                       "columns": 0}},
              "preview": {"class_type": "PreviewImage", "inputs": {"images": ["grid", 0]}}}
    history = server.run_prompt(prompt, timeout=FAST)  # the quadratic cut held the worker for minutes
    assert history["status"]["status_str"] == "success", history["status"]
    assert history["outputs"]["preview"]["images"]
    still_works(server, 3)


def score_prompt(images: list) -> dict:
    return {
        "white": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                          "color": 0xFFFFFF}},
        "black": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "clip": {"class_type": "LoadPLoRACLIPEncoder", "inputs": {
            "checkpoint": server_support.CLIP_FILE, "architecture": "PLoRA-Tiny-ViT", "precision": "fp32"}},
        "dino": {"class_type": "LoadPLoRADINOEncoder", "inputs": {"model_folder": server_support.DINO_FOLDER,
                                                                  "precision": "fp32"}},
        "score": {"class_type": "PLoRAScore", "inputs": {
            "images": images, "subject_reference": ["white", 0], "style_reference": ["black", 0],
            "clip_encoder": ["clip", 0], "dino_encoder": ["dino", 0]}},
    }


def test_a_nan_image_is_refused_by_the_score_node_and_history_stays_standard_json(server):
    server.post("/history", {"clear": True})
    prompt = score_prompt(["nan", 0])
    prompt[ANY] = {"class_type": ANY_VALUE_NODE, "inputs": {"value_json": "NaN"}}  # a string in the prompt
    prompt["nan"] = {"class_type": "ImageBlend", "inputs": {"image1": ["white", 0], "image2": ["black", 0],
                                                             "blend_factor": [ANY, 0], "blend_mode": "normal"}}
    node_id, kind, message = node_error(server, prompt)
    assert (node_id, kind) == ("score", "ValueError"), message
    assert message.startswith("PLoRAScore: input 'images' holds NaN or infinite pixel values"), message
    history = server.run_prompt(score_prompt(["black", 0]))
    assert history["status"]["status_str"] == "success", history["status"]
    (scores,) = history["outputs"]["score"]["plora_scores"]
    assert set(scores) == {"style_sim", "clip_score", "dino_score"}
    still_works(server, 4)


def test_a_combo_value_through_a_link_is_refused_when_the_node_runs(server, full_prompt):
    prompt = copy.deepcopy(full_prompt)
    patcher = next(k for k, n in prompt.items() if n["class_type"] == "PLoRAModelPatcher")
    prompt[ANY] = {"class_type": ANY_VALUE_NODE, "inputs": {"value_json": json.dumps("kld")}}
    prompt[patcher]["inputs"]["criterion"] = [ANY, 0]
    node_id, kind, message = node_error(server, prompt, 300)
    assert (node_id, kind) == (patcher, "ValueError"), message
    assert message.startswith("PLoRAModelPatcher: input 'criterion' is 'kld', which is not one of its choices")
    still_serving(server)
