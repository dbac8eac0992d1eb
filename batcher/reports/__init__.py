"""reports: the commands around a run. ``status`` and ``cost`` (``ledger``) read a
checkpoint or an output, ``agree`` (``agreement``) compares labels, ``estimate`` and
``preview`` send nothing, ``estimate --sample`` (``sample``) runs a few rows for real."""
