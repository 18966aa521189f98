"""llmdoctor_train (the folder ``train/``): everything that makes a doctor, apart from the plugin.

- ``stage1``: token-level rewards from the frozen patient, scored in vLLM;
- ``stage2``: TFPO (and GenARM) training of the doctor, a ``transformers.Trainer``;
- ``cli``: the ``llmdoctor`` command (``demo``, ``rewards``, ``train``);
- ``toy``: the toy world (tiny local models, the task, and the one pipeline the demo, the
  end-to-end example and the quality benchmark run).

Installed under the name ``llmdoctor_train`` so that a user's own ``train.py`` cannot shadow it.
"""
