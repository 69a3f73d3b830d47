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

// The tab's job status: while the LoRA Train tab is shown, click its hidden poll button about once a second
// (the server has no timer of its own, so the WebUI's "Reload UI" never waits on one). Stops with the page.
// While another tab is shown (the user waits on txt2img), every LORA_TRAIN_HIDDEN_EVERY-th tick: the poll is
// what publishes a finished run to the page, so the Lora cards are refreshed without a visit to the tab.
var LORA_TRAIN_POLL_MS = 1000;
var LORA_TRAIN_HIDDEN_EVERY = 5;
var lora_train_hidden_ticks = 0;

function lora_train_tab_shown(app) {
    var tab = app.querySelector("#tab_lora_train");
    if (!tab) return true;  // not inside the WebUI's tab layout
    return tab.style.display !== "none" && tab.offsetParent !== null;
}

function lora_train_poll_once() {
    if (typeof document === "undefined" || document.hidden) return false;
    var app = lora_train_app();
    var btn = app.querySelector("#lora_train_poll");
    if (!btn) return false;
    if (!lora_train_tab_shown(app) && ++lora_train_hidden_ticks < LORA_TRAIN_HIDDEN_EVERY) return false;
    lora_train_hidden_ticks = 0;
    if (btn.tagName !== "BUTTON") btn = btn.querySelector("button") || btn;
    btn.click();
    return true;
}

if (typeof setInterval === "function" && typeof document !== "undefined") {
    setInterval(lora_train_poll_once, LORA_TRAIN_POLL_MS);
}

// A newly published LoRA: refresh the WebUI's Lora cards (its extra-networks pages of txt2img and img2img)
// once per name, by the same hidden refresh button the cards' own Refresh icon clicks.
var lora_train_cards_refreshed_for = "";

function lora_train_refresh_cards(name) {
    if (!name || name === lora_train_cards_refreshed_for) return 0;
    lora_train_cards_refreshed_for = name;
    var app = lora_train_app();
    var n = 0;
    ["txt2img", "img2img"].forEach(function(tab) {
        var btn = app.querySelector("#" + tab + "_lora_extra_refresh_internal");
        if (btn) {
            btn.dispatchEvent(new Event("click"));
            n += 1;
        }
    });
    return n;
}

// The name the tab's hidden "published" box calls on change (lora_train/webui/tab.py REFRESH_CARDS_JS).
function loraTrainRefreshCards(name) {
    lora_train_refresh_cards(name);
    return Array.from(arguments);
}

if (typeof module !== "undefined") {
    module.exports = {lora_train_add_tag: lora_train_add_tag, lora_train_refresh_cards: lora_train_refresh_cards,
                      lora_train_poll_once: lora_train_poll_once};
}
