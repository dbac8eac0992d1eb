"""store: what a run keeps. The checkpoint's columns (``columns``), the journal of every
outcome (``journal``), the one-run lock (``lock``) and the output rebuilt from the journal
(``output``). The lowest stage: it imports no other."""
