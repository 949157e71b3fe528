// P-LoRA frontend extension: shows the table of P-LoRA Score (its "text" output) on the node.
// The frontend draws a node's "text" output only for its own Preview Any node, so the score
// node gets a read-only text box, filled after each run and not saved with the workflow.
import { chain } from "./plora_chain.js";

const { app } = window.comfyAPI.app;
const ComfyWidgets = window.comfyAPI.widgets?.ComfyWidgets;

const NODE_TYPE = "PLoRAScore";
const WIDGET_NAME = "scores";
const PLACEHOLDER = "Style Sim, CLIP Score and DINO Score appear here after a run.";

function addScoresWidget(node) {
  let widget;
  if (ComfyWidgets?.STRING) {
    widget = ComfyWidgets.STRING(node, WIDGET_NAME, ["STRING", { multiline: true }], app).widget;
  } else {
    widget = node.addDOMWidget(WIDGET_NAME, "customtext", document.createElement("textarea"), {
      getValue: () => widget.element.value,
      setValue: (value) => (widget.element.value = value),
    });
  }
  widget.element.readOnly = true;
  widget.element.placeholder = PLACEHOLDER;
  widget.element.style.fontFamily = "monospace";
  widget.serialize = false; // display only: not part of the saved workflow or the prompt
  widget.options ??= {};
  widget.options.serialize = false;
  widget.options.read_only = true;
  widget.value = "";
  return widget;
}

function showScores(node, output) {
  const widget = node.widgets?.find((w) => w.name === WIDGET_NAME);
  if (!widget) return;
  const text = output?.text;
  widget.value = Array.isArray(text) ? text.join("\n\n") : (text ?? "");
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "PLoRA.Score",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;
    chain(nodeType.prototype, "onNodeCreated", function () {
      addScoresWidget(this);
    });
    chain(nodeType.prototype, "onExecuted", function (output) {
      showScores(this, output);
    });
  },
});
