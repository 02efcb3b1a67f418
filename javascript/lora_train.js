// Train LoRA tab: give each GPU job a task id so the WebUI's progress bar (requestProgress)
// follows it, as txt2img's submit() does. Outside the WebUI (the preview) the ids still work.

function loraTrainSubmitWithProgress(anchorId, args) {
    var id = typeof randomId === "function" ? randomId()
        : "task(" + Math.random().toString(36).slice(2, 12) + ")";
    if (typeof requestProgress === "function" && typeof gradioApp === "function") {
        var anchor = gradioApp().getElementById(anchorId);
        if (anchor) requestProgress(id, anchor, null, function() {});
    }
    args[0] = id;
    return args;
}

function loraTrainSubmit() {
    return loraTrainSubmitWithProgress("lora_train_progress_anchor", Array.from(arguments));
}

function loraTrainTestSubmit() {
    return loraTrainSubmitWithProgress("lora_train_test_info", Array.from(arguments));
}
