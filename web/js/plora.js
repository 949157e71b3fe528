// P-LoRA frontend extension: what each chosen LoRA was made for, on Load Subject + Style LoRA.
// Shows the base-model family, rank and trigger words of both files (read from their headers by
// the pack's /plora/lora_info route) and warns when a LoRA's family differs from the model's.
// The frontend's objects come from window.comfyAPI (no imports of its script paths), the setting
// through app.extensionManager.setting, the graph through its public members (graph.nodes,
// node.getInputNode).
import { chain } from "./plora_chain.js";

const { app } = window.comfyAPI.app;
const { api } = window.comfyAPI.api;

const NODE_TYPE = "LoadSubjectStyleLoRA";
const SETTING_ID = "PLoRA.LoraInfo.Enabled";
const LORA_WIDGETS = [
  ["Subject", "subject_lora"],
  ["Style", "style_lora"],
];
// Loader node type -> [model folder, widget holding the file name]
const MODEL_LOADERS = {
  CheckpointLoaderSimple: ["checkpoints", "ckpt_name"],
  CheckpointLoader: ["checkpoints", "ckpt_name"],
  UNETLoader: ["diffusion_models", "unet_name"],
};
const cache = new Map();

async function getJson(url) {
  if (!cache.has(url)) {
    cache.set(
      url,
      api
        .fetchApi(url)
        .then((r) => (r.ok ? r.json() : null))
        .catch(() => null),
    );
  }
  return cache.get(url);
}

function originOf(node, inputName) {
  if (!node.inputs?.length) return null;
  const slot = node.findInputSlot(inputName);
  return slot >= 0 ? node.getInputNode(slot) : null;
}

// Walk MODEL/CLIP inputs upstream (through LoraLoaders and other patches) to a model loader.
function findModelLoader(node, inputName, depth = 0) {
  const origin = originOf(node, inputName);
  if (!origin || depth > 32) return null;
  if (MODEL_LOADERS[origin.type]) return origin;
  for (const next of ["model", "clip"]) {
    const found = findModelLoader(origin, next, depth + 1);
    if (found) return found;
  }
  return null;
}

function modelLoaderFor(node) {
  const graph = node.graph ?? app.graph;
  const direct = findModelLoader(node, "clip");
  if (direct) return direct;
  for (const other of graph.nodes) {
    if (other.type === "PLoRAModelPatcher" && originOf(other, "lora_pair") === node) {
      const found = findModelLoader(other, "model");
      if (found) return found;
    }
  }
  return null;
}

function compatible(loraFamily, modelFamily) {
  if (!loraFamily || !modelFamily || [loraFamily, modelFamily].includes("unknown")) return true;
  return loraFamily.split(" or ").includes(modelFamily);
}

function describe(label, info) {
  if (!info) return `${label}: no details (file not found or not a .safetensors LoRA)`;
  const parts = [`${label}: ${info.family}`];
  if (info.rank) parts.push(`rank ${info.rank}`);
  if (info.trigger_words?.length) parts.push(`triggers: ${info.trigger_words.join(", ")}`);
  return parts.join(" · ");
}

async function refresh(node) {
  const box = node.ploraInfoElement;
  if (!box) return;
  if (app.extensionManager.setting.get(SETTING_ID) === false) {
    box.style.display = "none";
    return;
  }
  box.style.display = "";
  const loader = modelLoaderFor(node);
  let model = null;
  if (loader) {
    const [folder, widgetName] = MODEL_LOADERS[loader.type];
    const name = loader.widgets?.find((w) => w.name === widgetName)?.value;
    if (name) model = await getJson(`/plora/model_info?folder=${folder}&name=${encodeURIComponent(name)}`);
  }
  const lines = [];
  const warnings = [];
  for (const [label, widgetName] of LORA_WIDGETS) {
    const name = node.widgets?.find((w) => w.name === widgetName)?.value;
    const info = name ? await getJson(`/plora/lora_info?name=${encodeURIComponent(name)}`) : null;
    lines.push(describe(label, info));
    if (info && model && !compatible(info.family, model.family)) {
      warnings.push(`⚠ ${label} LoRA is for ${info.family}, the model is ${model.family}: pick a LoRA for ${model.family}.`);
    }
  }
  box.replaceChildren(
    ...lines.map((text) => Object.assign(document.createElement("div"), { textContent: text })),
    ...warnings.map((text) =>
      Object.assign(document.createElement("div"), { textContent: text, className: "plora-warning" }),
    ),
  );
  box.dataset.warnings = String(warnings.length);
}

app.registerExtension({
  name: "PLoRA.LoraInfo",
  settings: [
    {
      id: SETTING_ID,
      name: "P-LoRA: show LoRA details (family, rank, trigger words) on Load Subject + Style LoRA",
      type: "boolean",
      defaultValue: true,
    },
  ],
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;
    chain(nodeType.prototype, "onNodeCreated", function () {
      const box = document.createElement("div");
      box.className = "plora-lora-info";
      box.style.cssText = "font-size:11px;line-height:1.4;padding:4px 6px;overflow:hidden;color:var(--input-text,#ddd)";
      box.title = "P-LoRA: what each LoRA was made for (click to refresh)";
      box.addEventListener("click", () => refresh(this));
      this.ploraInfoElement = box;
      this.addDOMWidget("plora_info", "plora_info", box, { serialize: false, hideOnZoom: false });
      for (const [, widgetName] of LORA_WIDGETS) {
        const widget = this.widgets?.find((w) => w.name === widgetName);
        if (widget) chain(widget, "callback", () => refresh(this));
      }
      setTimeout(() => refresh(this), 0);
    });
    chain(nodeType.prototype, "onConfigure", function () {
      setTimeout(() => refresh(this), 0);
    });
    chain(nodeType.prototype, "onConnectionsChange", function () {
      setTimeout(() => refresh(this), 0);
    });
    chain(nodeType.prototype, "onRemoved", function () {
      this.ploraInfoElement?.remove();
      this.ploraInfoElement = null;
    });
  },
});

const style = document.createElement("style");
style.textContent = ".plora-lora-info .plora-warning{color:#f5a623;font-weight:600}";
document.head.appendChild(style);
