"""The rooms behind ``trainer.py``: the loop (``loop``), what is learnt (``tasks``), the fast path
(``fastpath``), optimisers and the schedule (``optim``, ``schedule``), checkpoints
(``checkpoint``), what a run writes (``outputs``, ``figures``), processes and signals
(``distributed``), and the run's settings (``config``, declared with ``settings.rules``). ``trainer`` re-exports what
other modules use."""
