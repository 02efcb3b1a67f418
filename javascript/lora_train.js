// Train LoRA tab: give each GPU job a task id so the WebUI's progress bar (requestProgress)
// follows it, as txt2img's submit() does. Outside the WebUI (the preview) the ids still work.

function loraTrainSubmitWithProgress(anchorId, args, atEnd) {
    var id = typeof randomId === "function" ? randomId()
        : "task(" + Math.random().toString(36).slice(2, 12) + ")";
    if (typeof requestProgress === "function" && typeof gradioApp === "function") {
        var anchor = gradioApp().getElementById(anchorId);
        if (anchor) requestProgress(id, anchor, null, atEnd || function() {});
    }
    args[0] = id;
    return args;
}

// After a run the new file is already known to the Lora extension on the server; re-render the
// Lora card pages of txt2img / img2img too (the WebUI's own hidden refresh buttons).
function loraTrainRefreshLoraCards() {
    ["txt2img", "img2img"].forEach(function(tab) {
        var button = gradioApp().getElementById(tab + "_lora_extra_refresh_internal");
        if (button) button.dispatchEvent(new Event("click"));
    });
}

function loraTrainSubmit() {
    return loraTrainSubmitWithProgress("lora_train_progress_anchor", Array.from(arguments),
        loraTrainRefreshLoraCards);
}

function loraTrainTestSubmit() {
    return loraTrainSubmitWithProgress("lora_train_test_info", Array.from(arguments));
}
