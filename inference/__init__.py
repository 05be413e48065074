"""Using a trained network: ``predict`` (classify image files), ``export`` (ONNX, TorchScript)
and ``figures`` (the paper's pictures), each a ``python main.py COMMAND`` (``main.COMMANDS``)."""
