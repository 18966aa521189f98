"""The toy world: tiny local models (``models``), the toy task (``world``, ``patient``) and the
one pipeline (``pipeline``) that the demo, ``examples/end_to_end.py`` and the quality benchmark run."""
