// LoRA Train: show the text a node reports (dataset summary, captions, suggested settings, training report)
// in a read-only box on the node after it runs. Classic ComfyUI frontend extension API.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NODES = new Set([
  "LoraTrainDatasetFromFolder", "LoraTrainCaptionDataset", "LoraTrainSuggestSettings", "LoraTrainTrain",
]);
const WIDGET = "lora_train_report";

app.registerExtension({
  name: "lora_train.ReportText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (!text) return;
      let w = this.widgets?.find((x) => x.name === WIDGET);
      if (!w) {
        w = ComfyWidgets["STRING"](this, WIDGET, ["STRING", { multiline: true }], app).widget;
        w.serialize = false; // not a widget value: saved workflows keep their widgets_values layout
        if (w.inputEl) {
          w.inputEl.readOnly = true;
          w.inputEl.style.opacity = 0.75;
        }
      }
      w.value = Array.isArray(text) ? text.join("\n") : String(text);
      requestAnimationFrame(() => {
        const size = this.computeSize();
        this.setSize([Math.max(this.size[0], size[0]), Math.max(this.size[1], size[1])]);
        app.graph.setDirtyCanvas(true, true);
      });
    };
  },
});
