"""send: one row's life over HTTP. The client (``client``), the retry policy (``retry``),
one attempt paced and sent (``sender``), a row through its attempts (``worker``), the reply
priced and parsed into an outcome (``outcome``, ``prices``, ``parse``), the dollar budget
(``budget``) and the counts of what was done (``tally``)."""
