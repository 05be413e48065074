"""The bottom layer of settings: ``settings.rules`` (what a setting may hold and says about
itself), which ``data/`` and ``training/`` both use."""
