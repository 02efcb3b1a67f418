"""Host-free training core: never imports `modules`, gradio, ldm, sgm or fastapi."""
