// Shows what UniFusion nodes report after they run: Verifi's rewritten prompt and a one-line
// summary of each encoding (tokens, images, tiles). Text goes into read-only textareas through
// `.value` only; nothing is parsed as HTML or evaluated.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NODES = new Set(["UniFusionEncode", "UniFusionVerifiRewrite", "UniFusionTextEncode"]);
const SHOWN = [
  // [ui key, widget name]
  ["unifusion_text", "rewritten_prompt"],
  ["unifusion_summary", "summary"],
];

function showText(node, name, text) {
  let widget = node.widgets?.find((w) => w.name === name);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, name, ["STRING", { multiline: true }], app).widget;
    widget.serialize = false; // not saved in the workflow
    widget.options = { ...(widget.options ?? {}), serialize: false }; // not sent with the prompt
    if (widget.inputEl) {
      widget.inputEl.readOnly = true;
      widget.inputEl.style.opacity = "0.75";
    }
  }
  widget.value = String(text);
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "UniFusion.NodeText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      for (const [key, name] of SHOWN) {
        const value = message?.[key]?.[0];
        if (typeof value === "string") showText(this, name, value);
      }
    };
  },
});
