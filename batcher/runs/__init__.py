"""runs: one run of a job. The shell (``shell``) and its engines: live (``live``), the Batch
API (``batch/``) and a Ray cluster (``ray/``); how a run stops (``stopping``), its progress
display (``progress``) and its summary (``summary``)."""
