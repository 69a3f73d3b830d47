// LoRA Train tab (AUTOMATIC1111 / Forge): "send to txt2img" puts the tested `<lora:name:w>` tag into the
// txt2img prompt and switches to that tab. The WebUI loads every file in an extension's javascript/ folder.
// Used from the tab as a gradio button's client-side function: _js= (gradio 3) / js= (gradio 4+), e.g.
//   button.click(None, inputs=[tag_textbox], outputs=[], _js="lora_train_send_to_txt2img")

function lora_train_app() {
    // gradioApp() is the WebUI's own helper; fall back to the document in the standalone app
    return (typeof gradioApp === "function") ? gradioApp() : document;
}

function lora_train_add_tag(prompt, tag) {
    prompt = prompt || "";
    tag = (tag || "").trim();
    if (!tag) return prompt;
    // same LoRA at another strength: replace its tag instead of adding a second one
    var m = /^<lora:([^:>]+)(?::[^>]*)?>$/.exec(tag);
    if (m) {
        var name = m[1].replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
        var re = new RegExp("<lora:" + name + "(?::[^>]*)?>", "g");
        if (re.test(prompt)) return prompt.replace(re, tag);
    }
    return prompt.trim() ? prompt.replace(/\s+$/, "") + " " + tag : tag;
}

function lora_train_send_to_txt2img(tag) {
    var app = lora_train_app();
    var textarea = app.querySelector("#txt2img_prompt textarea");
    if (!textarea) {
        alert("LoRA Train: the txt2img prompt box was not found (standalone app, or a WebUI layout change). Copy this into your prompt: " + tag);
        return Array.from(arguments);
    }
    textarea.value = lora_train_add_tag(textarea.value, tag);
    if (typeof updateInput === "function") {
        updateInput(textarea);  // the WebUI's helper: tells gradio the value changed
    } else {
        textarea.dispatchEvent(new Event("input", {bubbles: true}));
    }
    if (typeof switch_to_txt2img === "function") {
        switch_to_txt2img();
    } else {
        var tabs = app.querySelector("#tabs");
        var first = tabs && tabs.querySelector("button");
        if (first) first.click();
    }
    return Array.from(arguments);
}

// The name the tab's "Send to txt2img" button calls (lora_train/webui/tab.py SEND_TO_TXT2IMG_JS).
function loraTrainSendToTxt2img(tag) {
    return lora_train_send_to_txt2img.apply(null, arguments);
}

if (typeof module !== "undefined") {
    module.exports = {lora_train_add_tag: lora_train_add_tag};
}
