"""Measurements for the closing notes: `python -m lora_train_ext.bench.file_sizes`."""
