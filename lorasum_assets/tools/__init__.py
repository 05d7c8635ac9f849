"""The ``lorasum`` command (``cli/``) and sweeps of training settings."""
