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

// The tab's job status: the page clicks the tab's hidden poll button (the server has no timer of its own, so the
// WebUI's "Reload UI" never waits on one). About once a second while a job runs and the tab is shown; while
// nothing runs, every LORA_TRAIN_IDLE_EVERY-th tick (a job started from another page or the queue shows up);
// while another tab is shown (the user waits on txt2img), every LORA_TRAIN_HIDDEN_EVERY-th tick: the poll is
// what publishes a finished run to the page, so the Lora cards are refreshed without a visit to the tab.
// Each poll makes gradio re-render its tabs (and its console warns once per hidden tab), so idle polls are rare.
var LORA_TRAIN_POLL_MS = 1000;
var LORA_TRAIN_HIDDEN_EVERY = 5;
var LORA_TRAIN_IDLE_EVERY = 10;
var lora_train_ticks = 0;

function lora_train_tab_shown(app) {
    var tab = app.querySelector("#tab_lora_train");
    if (!tab) return true;  // not inside the WebUI's tab layout
    return tab.style.display !== "none" && tab.offsetParent !== null;
}

function lora_train_job_running(app) {
    // the status line the poll renders: "Training **name**: **running** | step ..." (ui/logic.job_status)
    var status = app.querySelector("#lora_train_status");
    var text = status ? (status.textContent || "") : "";
    return /:\s*(starting|running|stopping)\b/.test(text);
}

function lora_train_poll_once() {
    if (typeof document === "undefined" || document.hidden) return false;
    var app = lora_train_app();
    var btn = app.querySelector("#lora_train_poll");
    if (!btn) return false;
    var shown = lora_train_tab_shown(app);
    var every = !shown ? LORA_TRAIN_HIDDEN_EVERY : (lora_train_job_running(app) ? 1 : LORA_TRAIN_IDLE_EVERY);
    if (++lora_train_ticks < every) return false;
    lora_train_ticks = 0;
    if (btn.tagName !== "BUTTON") btn = btn.querySelector("button") || btn;
    btn.click();
    return true;
}

// A click on one of the tab's start buttons: poll at once and fast from then on (the status says "starting").
function lora_train_poll_soon() {
    lora_train_ticks = LORA_TRAIN_IDLE_EVERY;
}

if (typeof document !== "undefined" && document.addEventListener) {
    document.addEventListener("click", function(ev) {
        var t = ev.target && ev.target.closest ? ev.target.closest("button") : null;
        if (t && /^lora_train_(start|auto|queue_start|grid|lr_find|autocaption)/.test(t.id || "")) lora_train_poll_soon();
    }, true);
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
                      lora_train_poll_once: lora_train_poll_once, lora_train_poll_soon: lora_train_poll_soon};
}
