"""scripts/evaluate.py against fake ComfyUI servers on loopback (the real routes and JSON shapes).

The fake validates prompts as ComfyUI does (node types, required inputs, link types, combo values,
uploaded LoadImage files), answers 400 with node_errors, streams executing/progress/executed events
on /ws, keeps /history entries, serves /view and /upload/image, and "renders" tiny PNGs. Its
PLoRAScore answer is a hash of the three images it was given (`fake_scores`), so the test can
recompute every score and the table from the files the runner wrote.
"""

from __future__ import annotations

import csv
import hashlib
import json
import statistics
import sys
from pathlib import Path

import pytest

from support.fake_comfy import CKPT, CLIP_FILE, DINO, LORAS, FakeComfy, fake_scores, object_info  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import evaluate  # noqa: E402



@pytest.fixture
def servers():
    started = []

    def start(**options):
        server = FakeComfy(**options)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# ---------------------------------------------------------------------------- helpers


def write_pairs(folder: Path, methods=None, seeds=2, pairs=2, **extra) -> Path:
    data = {"checkpoint": CKPT, "clip_checkpoint": CLIP_FILE, "clip_architecture": "ViT-B-32", "dino": DINO,
            "seeds": seeds, "sampler": {"width": 64, "height": 48, "steps": 3, "cfg": 5.0, "negative": "blurry"},
            "guidance": {"guidance_scale": 7.5, "guidance_decode_size": 256},
            "pairs": [{"name": f"{subject}-{style}", "subject_lora": f"{subject}.safetensors",
                       "style_lora": f"{style}.safetensors", "subject_strength": 0.9, "style_strength": 1.1,
                       "prompt": f"a {subject} in {style} style", "subject_prompt": f"a photo of a {subject}",
                       "style_prompt": f"a landscape in {style} style"}
                      for subject, style in [("dog", "watercolour"), ("cat", "oil")][:pairs]], **extra}
    if methods is not None:
        data["methods"] = methods
    path = folder / "pairs.json"
    path.write_text(json.dumps(data))
    return path


def run(pairs: Path, out: Path, urls, *extra) -> int:
    argv = [str(pairs), "--out", str(out), *[a for url in urls for a in ("--server", url)], *extra]
    return evaluate.main(argv)


def kinds(prompts):
    """A prompt's role: refs, score, sheet or the render's method."""
    roles = []
    for prompt in prompts:
        types = [node["class_type"] for node in prompt.values()]
        if "PLoRAScore" in types:
            roles.append("score")
        elif "PLoRAComparisonGrid" in types:
            roles.append("sheet")
        elif "LoadSubjectStyleLoRA" not in types and types.count("LoraLoader") == types.count("KSampler") >= 2:
            roles.append("refs")
        else:
            patcher = next((n for n in prompt.values() if n["class_type"] == "PLoRAModelPatcher"), None)
            method = patcher["inputs"].get("method", "p-lora") if patcher else "direct"
            guided = "PosteriorMetricGuidanceSampler" in types
            roles.append({("p-lora", False): "pfk", ("p-lora", True): "p-lora", ("direct", False): "direct",
                          ("direct", True): "pmk"}.get((method, guided), method))
    return roles


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- tests


def test_two_servers_render_score_and_tabulate(tmp_path, servers, capsys):
    a, b = servers(), servers()
    out = tmp_path / "results"
    assert run(write_pairs(tmp_path), out, [a.url, b.url]) == 0
    log = capsys.readouterr().err

    methods = list(evaluate.METHODS)
    roles = kinds(a.prompts + b.prompts)
    assert sorted(roles) == sorted(["refs"] * 4 + methods * 4 + ["score"] * 24 + ["sheet"] * 2)
    assert len(a.prompts) >= 10 and len(b.prompts) >= 10, "both servers take jobs"
    assert "renders" in log and "[renders 24/24]" in log, log  # progress, one line per job off a terminal

    # every render: its method, its seed and the pair's settings; guided ones use that seed's references
    refs = {}
    for pair in ("dog-watercolour", "cat-oil"):
        for seed in (0, 1):
            refs[(pair, seed)] = {role: sha(out / "references" / pair / f"seed{seed}_{role}.png")
                                  for role in ("subject", "style")}
            for method in methods:
                assert (out / "images" / pair / method / f"seed{seed}.png").is_file()
    uploads = {name: hashlib.sha256(data).hexdigest()
               for server in (a, b) for name, data in server.files["input"].items()}
    for prompt, role in zip(a.prompts + b.prompts, roles):
        nodes = {n["class_type"]: n["inputs"] for n in prompt.values()}
        if role in methods:
            sampler = nodes.get("PosteriorMetricGuidanceSampler") or nodes["KSampler"]
            pair = nodes["LoadSubjectStyleLoRA"]
            name = f"{pair['subject_lora'].split('.')[0]}-{pair['style_lora'].split('.')[0]}"
            assert nodes["PLoRAModelPatcher"]["method"] == evaluate.METHODS[role].patcher_method
            assert (pair["subject_strength"], pair["style_strength"]) == (0.9, 1.1)
            assert (sampler["steps"], sampler["cfg"], nodes["EmptyLatentImage"]["width"]) == (3, 5.0, 64)
            assert nodes["PLoRAModelPatcher"]["criterion"] == "kl"  # filled from the server's defaults
            if evaluate.METHODS[role].guided:
                assert sampler["guidance_scale"] == 7.5 and sampler["guidance_decode_size"] == 256
                loaded = [prompt[sampler[k][0]]["inputs"]["image"] for k in ("subject_reference", "style_reference")]
                assert [uploads[n] for n in loaded] == [refs[(name, sampler["seed"])]["subject"],
                                                        refs[(name, sampler["seed"])]["style"]]
            else:
                assert "LoadImage" not in nodes

    # every score is the node's answer for that image and that seed's references
    rows = read_csv(out / "scores.csv")
    assert len(rows) == 24
    for row in rows:
        image = (out / "images" / row["pair"] / row["method"] / f"seed{row['seed']}.png").read_bytes()
        ref = out / "references" / row["pair"]
        want = fake_scores(image, (ref / f"seed{row['seed']}_subject.png").read_bytes(),
                           (ref / f"seed{row['seed']}_style.png").read_bytes())
        for metric, value in want.items():
            assert float(row[metric]) == pytest.approx(value, abs=1e-6)

    # Table 1: mean and sample standard deviation per method, in percent
    table = {row["method"]: row for row in read_csv(out / "table1.csv")}
    assert list(table) == methods
    for method in methods:
        assert int(table[method]["images"]) == 4
        for metric in ("style_sim", "clip_score", "dino_score"):
            values = [float(r[metric]) * 100 for r in rows if r["method"] == method]
            assert float(table[method][f"{metric}_mean"]) == pytest.approx(statistics.mean(values), abs=2e-3)
            assert float(table[method][f"{metric}_std"]) == pytest.approx(statistics.stdev(values), abs=2e-3)
    markdown = (out / "table1.md").read_text()
    assert "| Method | Style Sim ↑ | CLIP Score ↑ | DINO Score ↑ | images |" in markdown
    values = [float(r["clip_score"]) * 100 for r in rows if r["method"] == "p-lora"]
    row = next(line for line in markdown.splitlines() if line.startswith("| P-LoRA (PFK + PMK) | "))
    assert row.split(" | ")[2] == f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"

    # one contact sheet per pair: per seed, both references and every method, labelled with its scores
    sheet = next(p for p in a.prompts + b.prompts if kinds([p]) == ["sheet"])
    grid = next(n["inputs"] for n in sheet.values() if n["class_type"] == "PLoRAComparisonGrid")
    labels = grid["labels"].splitlines()
    assert grid["columns"] == 8 and len(labels) == 16
    assert labels[0].startswith("subject ref, seed 0") and labels[2].startswith("direct: S")
    assert sum(n["class_type"] == "LoadImage" for n in sheet.values()) == 16
    assert all(n["inputs"]["width"] == 256 and n["inputs"]["height"] == 192
               for n in sheet.values() if n["class_type"] == "ImageScale")
    for pair in ("dog-watercolour", "cat-oil"):
        assert (out / "sheets" / f"{pair}.png").read_bytes().startswith(b"\x89PNG")


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path, servers, capsys):
    pairs, out = write_pairs(tmp_path, methods=["direct", "pfk", "p-lora"]), tmp_path / "results"
    first = servers(die_at=7)  # the only server dies in the middle of its 7th prompt
    assert run(pairs, out, [first.url]) == 1
    log = capsys.readouterr().err
    assert "stopped answering" in log and "No server is left" in log, log
    finished = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert len(finished) == 4 * 2 + 2  # 4 reference jobs (2 images each), 2 renders; the 7th prompt died

    second = servers()
    assert run(pairs, out, [second.url]) == 0
    roles = kinds(second.prompts)
    # only what was missing: no reference again, the 12 - 2 renders left, then every score and sheet
    assert roles.count("refs") == 0 and len([r for r in roles if r in ("direct", "pfk", "p-lora")]) == 12 - 2
    assert roles.count("score") == 12 and roles.count("sheet") == 2
    for path in finished:
        assert (out / path).is_file()

    third = servers()
    assert run(pairs, out, [third.url]) == 0
    assert third.prompts == []  # everything is done: nothing is queued again
    assert "already done" in capsys.readouterr().err


def test_a_server_that_dies_mid_run_hands_its_job_to_the_other(tmp_path, servers, capsys):
    dying, healthy = servers(die_at=3), servers()
    out = tmp_path / "results"
    assert run(write_pairs(tmp_path, methods=["direct", "pmk"], pairs=1), out, [dying.url, healthy.url]) == 0
    log = capsys.readouterr().err
    lost = dying.prompts[2]  # it died while running this one
    assert lost in healthy.prompts, "the same graph ran on the other server"
    assert f"{dying.url} stopped answering" in log and "goes to the other servers" in log, log
    assert len(dying.prompts) == 3
    assert len(read_csv(out / "scores.csv")) == 4 and (out / "sheets" / "dog-watercolour.png").is_file()
    assert f"{dying.url}: " in log and "(lost)" in log


def test_node_errors_are_reported_and_retried_a_bounded_number_of_times(tmp_path, servers, capsys):
    def refuse(prompt):  # a validation error on one node, as ComfyUI answers it
        for node_id, node in prompt.items():
            if node["inputs"].get("method") == "k-lora":
                return {node_id: {"errors": [{"type": "value_not_in_list", "message": "Value not in list",
                                              "details": "method: 'k-lora' not in ['p-lora', 'direct']",
                                              "extra_info": {}}],
                                  "dependent_outputs": [], "class_type": node["class_type"]}}
        return None

    def fail(prompt):
        if any(node["inputs"].get("method") == "b-lora" for node in prompt.values()):
            return "B-LoRA routes SDXL blocks; this checkpoint is SD1.5. Use an SDXL checkpoint."
        return None

    server = servers(refuse=refuse, fail=fail)
    out = tmp_path / "results"
    code = run(write_pairs(tmp_path, methods=["direct", "k-lora", "b-lora"], seeds=1, pairs=1), out,
               [server.url], "--retries", "2")
    log = capsys.readouterr().err
    assert code == 1
    assert len(server.refused) == 1  # a refused graph is not sent again
    assert kinds(server.prompts).count("b-lora") == 3  # a failing one: once plus --retries 2
    assert "node 4 PLoRAModelPatcher: Value not in list: method: 'k-lora' not in ['p-lora', 'direct']" in log, log
    assert "The workflow failed at node 7 KSampler:" in log, log
    assert "ValueError: B-LoRA routes SDXL blocks; this checkpoint is SD1.5. Use an SDXL checkpoint." in log
    assert "2 job(s) failed" in log and "Traceback" not in log
    table = {row["method"]: row for row in read_csv(out / "table1.csv")}
    assert table["direct"]["images"] == "1" and table["k-lora"]["images"] == "0" and table["b-lora"]["images"] == "0"


def test_timeout_cancels_the_prompt_and_gives_up_after_the_retries(tmp_path, servers, capsys):
    server = servers(hang=lambda prompt: any(n["class_type"] == "PosteriorMetricGuidanceSampler"
                                             for n in prompt.values()))
    out = tmp_path / "results"
    code = run(write_pairs(tmp_path, methods=["pfk", "pmk"], seeds=1, pairs=1), out, [server.url],
               "--timeout", "1.5", "--retries", "1", "--no-sheets")
    log = capsys.readouterr().err
    assert code == 1
    assert kinds(server.prompts).count("pmk") == 2 and kinds(server.prompts).count("pfk") == 1
    assert len(server.interrupts) == 2 and all(server.interrupts)  # the hung prompt was interrupted each time
    assert "no result after 1.5 s; prompt" in log and "was cancelled there (--timeout)" in log
    assert (out / "images" / "dog-watercolour" / "pfk" / "seed0.png").is_file()


def test_a_patcher_without_method_input_merges_directly_and_refuses_k_lora(tmp_path, servers, capsys):
    server = servers(info=object_info(patcher_method=False))
    out = tmp_path / "results"
    code = run(write_pairs(tmp_path, methods=["direct", "k-lora", "pfk"], seeds=1, pairs=1), out, [server.url],
               "--no-sheets")
    log = capsys.readouterr().err
    assert code == 1
    assert "no method input" in log and "update the P-LoRA pack" in log
    renders = [p for p, role in zip(server.prompts, kinds(server.prompts)) if role in ("direct", "pfk", "k-lora")]
    assert len(renders) == 2  # k-lora is never sent
    direct = next(p for p in renders if "PLoRAModelPatcher" not in {n["class_type"] for n in p.values()})
    loras = [n["inputs"] for n in direct.values() if n["class_type"] == "LoraLoader"]
    assert [(x["lora_name"], x["strength_model"], x["strength_clip"]) for x in loras] == [
        ("dog.safetensors", 0.9, 0.9), ("watercolour.safetensors", 1.1, 1.1)]


def test_bad_pairs_file_and_missing_files_are_named(tmp_path, servers, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"checkpoint": CKPT, "pairs": [{"name": "a b"}]}))
    assert run(bad, tmp_path / "out", ["http://127.0.0.1:9"]) == 2
    assert "pairs[0]: 'name' 'a b'" in capsys.readouterr().err
    steps = write_pairs(tmp_path, seeds=1, pairs=1, sampler={"steps": "many"})
    assert run(steps, tmp_path / "out", ["http://127.0.0.1:9"]) == 2
    assert "pairs[0]: sampler 'steps' must be a whole number of at least 1, not 'many'" in capsys.readouterr().err

    server = servers()
    pairs = write_pairs(tmp_path, seeds=1, pairs=1)
    data = json.loads(pairs.read_text())
    data["pairs"][0]["style_lora"] = "missing.safetensors"
    pairs.write_text(json.dumps(data))
    assert run(pairs, tmp_path / "out", [server.url]) == 1
    log = capsys.readouterr().err
    assert "lora_name 'missing.safetensors' (LoraLoader)" in log and "No usable ComfyUI server" in log
    assert server.prompts == []


# ---------------------------------------------------------------------------- sets of N LoRAs


THREE = [{"file": "watercolour.safetensors", "role": "style", "strength": 1.1, "prompt": "a garden, watercolour"},
         {"file": "dog.safetensors", "role": "subject", "strength": 0.9, "prompt": "a photo of a dog"},
         {"file": "cat.safetensors", "role": "subject", "strength": 0.8, "bias": 1.5, "reference_weight": 0.5,
          "prompt": "a photo of a cat"}]


def write_set(folder: Path, loras=None, **entry) -> Path:
    """A pairs file with one pair entry and one entry listing `loras` (default: THREE)."""
    path = write_pairs(folder, seeds=1, pairs=1)
    data = json.loads(path.read_text())
    data["pairs"].append({"name": "dog-cat-watercolour", "prompt": "a dog and a cat in watercolour",
                          "loras": THREE if loras is None else loras, **entry})
    path.write_text(json.dumps(data))
    return path


def test_a_lora_list_makes_the_pair_and_the_added_loras(tmp_path):
    spec = evaluate.load_spec(write_set(tmp_path))
    pair, three = spec.pairs
    assert pair.added == () and pair.size == 2 and pair.reference_roles() == ["subject", "style"]
    assert "added" not in pair.render_fields()  # a pair's resume keys are unchanged by the list form
    # the first subject and the first style are the pair, whatever their order in the list; the rest are added
    assert (three.subject_lora, three.subject_strength, three.subject_prompt) == ("dog.safetensors", 0.9,
                                                                                   "a photo of a dog")
    assert (three.style_lora, three.style_strength, three.style_prompt) == ("watercolour.safetensors", 1.1,
                                                                             "a garden, watercolour")
    assert three.added == (evaluate.AddedLora("cat.safetensors", "subject", 0.8, 1.5, "a photo of a cat", 0.5),)
    assert three.size == 3 and three.reference_roles() == ["subject", "style", "lora3"]
    assert three.files() == ["dog.safetensors", "watercolour.safetensors", "cat.safetensors"]
    assert three.render_fields()["added"][0]["file"] == "cat.safetensors"
    # two LoRAs as a list: the same pair as the subject/style form
    two = evaluate.load_spec(write_set(tmp_path, THREE[:2])).pairs[1]
    assert two.added == () and two.render_fields() == {**pair.render_fields(), **{
        k: getattr(two, k) for k in two.render_fields()}}


@pytest.mark.parametrize("loras, entry, message", [
    (THREE[:1], {}, "'loras' lists 1 LoRA(s); a set needs at least a subject and a style, e.g. \"loras\": [{"),
    ("dog.safetensors", {}, "'loras' lists no LoRA(s)"),
    ([THREE[0], {**THREE[1], "role": "character"}], {},
     "loras[1]: 'role' must be \"subject\" (who or what you render) or \"style\""),
    ([THREE[0], THREE[1], {**THREE[2], "file": "dog.safetensors"}], {},
     "loras[2]: dog.safetensors is already loras[1]; each LoRA can be in a set once"),
    ([THREE[1], THREE[2]], {}, "'loras' has no style LoRA; a set needs at least one subject and one style"),
    ([THREE[0], {**THREE[1], "prompt": ""}], {}, "loras[1]: 'prompt' must be a non-empty string"),
    ([THREE[0], {**THREE[1], "bias": 2.0}, THREE[2]], {},
     "loras[1]: the first subject LoRA is the pair's subject (Load Subject + Style LoRA), which takes no 'bias'"),
    ([THREE[0], THREE[1], {**THREE[2], "bias": -1}], {}, "loras[2]: 'bias' must be 0 or more"),
    (THREE, {"subject_lora": "dog.safetensors"}, "give the LoRAs either as 'loras' or as subject_lora/style_lora"),
    (THREE * 3, {}, "'loras' lists 9 LoRAs; the gate chooses among at most 8"),
])
def test_a_bad_lora_list_names_the_entry_and_what_to_write(tmp_path, loras, entry, message):
    with pytest.raises(evaluate.SpecError) as error:
        evaluate.load_spec(write_set(tmp_path, loras, **entry))
    assert "pairs[1]" in str(error.value) and message in str(error.value), str(error.value)


def test_a_set_of_three_renders_with_add_lora_to_set_and_more_references(tmp_path, servers, capsys):
    server = servers()
    out = tmp_path / "results"
    assert run(write_set(tmp_path), out, [server.url]) == 0  # k-lora and b-lora skipped: a note, not a failure
    log = capsys.readouterr().err
    assert ("Note: k-lora is skipped for dog-cat-watercolour: it takes only a subject/style pair, and this entry "
            "has more than two LoRAs (not an error).") in log, log
    assert "Note: b-lora is skipped for dog-cat-watercolour" in log
    sets = [p for p in server.prompts if any(n["class_type"] == "AddLoRAToSet" for n in p.values())]
    refs = [p for p in server.prompts if kinds([p]) == ["refs"]]
    assert sorted(len([n for n in p.values() if n["class_type"] == "LoraLoader"]) for p in refs) == [2, 3]
    three = next(p for p in refs if len(p) > 14)
    loaded = [(n["inputs"]["lora_name"], n["inputs"]["strength_model"]) for n in three.values()
              if n["class_type"] == "LoraLoader"]
    assert loaded == [("dog.safetensors", 0.9), ("watercolour.safetensors", 1.1), ("cat.safetensors", 0.8)]
    texts = {n["inputs"]["text"] for n in three.values() if n["class_type"] == "CLIPTextEncode"}
    assert {"a photo of a dog", "a garden, watercolour", "a photo of a cat"} <= texts
    assert sorted(kinds(sets)) == ["direct", "p-lora", "pfk", "pmk"]  # no k-lora, no b-lora for the set
    lora3 = (out / "references" / "dog-cat-watercolour" / "seed0_lora3.png").read_bytes()
    uploads = server.files["input"]
    for prompt, method in zip(sets, kinds(sets)):
        nodes = {n["class_type"]: (node_id, n["inputs"]) for node_id, n in prompt.items()}
        added_id, added = nodes["AddLoRAToSet"]
        loader_id, _ = nodes["LoadSubjectStyleLoRA"]
        assert added == {"lora_set": [loader_id, 0], "lora": "cat.safetensors", "role": "subject", "strength": 0.8,
                         "bias": 1.5, "clip": [loader_id, 1]}
        patcher = nodes["PLoRAModelPatcher"][1]
        assert patcher["lora_pair"] == [added_id, 0]
        assert all(n["inputs"]["clip"] == [added_id, 1] for n in prompt.values() if n["class_type"] == "CLIPTextEncode")
        if evaluate.METHODS[method].guided:
            reference_id, reference = nodes["PLoRAReference"]
            assert reference["role"] == "subject" and reference["weight"] == 0.5 and "references" not in reference
            assert uploads[prompt[reference["image"][0]]["inputs"]["image"]] == lora3
            assert nodes["PosteriorMetricGuidanceSampler"][1]["more_references"] == [reference_id, 0]
        else:
            assert "PLoRAReference" not in nodes
    table = {row["method"]: row for row in read_csv(out / "table1.csv")}
    assert table["k-lora"]["images"] == "1" and table["p-lora"]["images"] == "2"
    assert "K-LoRA: not run for dog-cat-watercolour (more than two LoRAs" in (out / "table1.md").read_text()
    grids = [n["inputs"] for p in server.prompts for n in p.values() if n["class_type"] == "PLoRAComparisonGrid"]
    grid = next(g for g in grids if g["columns"] != 8)
    labels = grid["labels"].splitlines()
    assert grid["columns"] == 3 + 6 and labels[2] == "lora3 ref, seed 0" and "k-lora: skipped (pair only)" in labels


def test_a_set_is_refused_by_a_server_without_the_set_nodes(tmp_path, servers, capsys):
    server = servers(info=object_info(lora_sets=False))
    out = tmp_path / "results"
    assert run(write_set(tmp_path), out, [server.url], "--methods", "pfk,pmk", "--no-sheets") == 1
    log = capsys.readouterr().err
    assert "lacks AddLoRAToSet, needed for a set of 3 LoRAs; update the P-LoRA pack there" in log, log
    assert "lacks AddLoRAToSet, PLoRAReference, needed for a set of 3 LoRAs" in log
    assert (out / "images" / "dog-watercolour" / "pmk" / "seed0.png").is_file()  # the pair still runs
