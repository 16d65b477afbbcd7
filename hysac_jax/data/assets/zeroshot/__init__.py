"""Zero-shot class names, templates and unsafe prompts (see NOTICE)."""
