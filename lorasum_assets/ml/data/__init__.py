"""DialogSum in and prompts out: ``readers`` (hub, local files, the bundled sample), ``dialogues``
(one row per dialogue with its references, the 1/100 filter), ``prompts`` (the notebook's prompt,
the label layout of a training example).

Torch-free: readers, dialogues, prompts
"""
