// Train LoRA tab: give each GPU job a task id so the WebUI's progress bar (requestProgress)
// follows it, as txt2img's submit() does. Outside the WebUI (the preview) the ids still work.

function loraTrainTaskId() {
    if (typeof randomId === "function") return randomId();
    return "task(" + Math.random().toString(36).slice(2, 12) + ")";
}

function loraTrainStartProgress(id, anchorId) {
    if (typeof requestProgress !== "function" || typeof gradioApp !== "function") return;
    var anchor = gradioApp().getElementById(anchorId);
    if (anchor) requestProgress(id, anchor, null, function() {});
}

function loraTrainSubmit() {
    var args = Array.from(arguments);
    var id = loraTrainTaskId();
    loraTrainStartProgress(id, "lora_train_progress_anchor");
    args[0] = id;
    return args;
}

function loraTrainTestSubmit() {
    var args = Array.from(arguments);
    var id = loraTrainTaskId();
    loraTrainStartProgress(id, "lora_train_test_info");
    args[0] = id;
    return args;
}
