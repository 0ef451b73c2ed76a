"""Rows to batches: reading files and the hub, tasks and templates, chat, fitting to max_length, packing, the step plan."""
