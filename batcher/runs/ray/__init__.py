"""Scale-out on Ray (``batcher run JOB --ray``): shards of the input run by batcher's own
engine on many workers, paced by one shared budget.

``driver.run_on_ray`` is the entry point; it and ``actors`` import Ray, and nothing
imports them without ``--ray``. ``shards`` cuts the input, ``lease``
holds the budget arithmetic, ``shard`` runs one shard on a worker, ``storage`` reaches local
disk and object storage, ``assembly`` writes the output, ``reaper`` ends a local cluster
with its driver.
"""
