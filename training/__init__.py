"""The parts of ``trainer.py`` that have a room of their own: the run's settings
(``training.config``), its checkpoints (``training.checkpoint``) and its folders
(``training.outputs``). ``trainer`` re-exports what other modules use."""
