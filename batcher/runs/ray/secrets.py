"""The secrets a cluster run's actors need of the driver's environment: the API key, and the
cloud credentials (the usual ``AWS_*`` variables, which pyarrow's S3 filesystem reads).

Ray writes an actor's ``runtime_env`` in plain text into ``runtime_env_agent.log``, in the
session's temporary folder (``/tmp/ray/session_*/logs``, readable by every user of the
machine and kept after the run), so secrets never go there, nor in an actor's name or
options. The driver hands them to each actor as an argument of its constructor, which puts
them in its own process's environment before anything builds a client or a filesystem; a
restarted actor gets the same argument again. The trade-off: arguments are not logged, but
they stay in the cluster's memory (the control store's actor table, the object store) while
the actor lives, where whoever can run code on the cluster could read them, as they could
read a worker's environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from batcher.config import Job
from batcher.rows.plan import read_api_key

CLOUD_PREFIXES = ("AWS_",)  # the variables of the object stores batcher reaches


@dataclass(frozen=True, slots=True, repr=False)
class WorkerSecrets:
    """Environment variables for the actors, by name; its repr shows the names only (Ray may
    print an actor's arguments in an error)."""

    variables: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of_driver(cls, job: Job, *, simulate: bool) -> WorkerSecrets:
        """The driver's cloud credentials and the job's API key (none when simulated)."""
        found = {k: v for k, v in os.environ.items() if k.startswith(CLOUD_PREFIXES)}
        key = read_api_key(job, required=False)
        if key is not None and not simulate:
            found[job.config.endpoint.api_key_env] = key
        return cls(tuple(sorted(found.items())))

    def install(self) -> None:
        """Put the variables in this process's environment (an actor's, before its work)."""
        os.environ.update(self.variables)

    def __repr__(self) -> str:
        return f"WorkerSecrets({', '.join(name for name, _ in self.variables)})"
