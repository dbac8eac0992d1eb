"""send: one row's life over HTTP. The client (``client``), which reads a body within bounds
(``body``) and parses it at the boundary (``reply``, ``stream``), the retry policy (``retry``),
one attempt paced and sent (``sender``), a row through its attempts (``worker``), the reply
priced and parsed into an outcome (``outcome``, ``prices``, ``parse``, its schema checks off
the event loop in ``checks``), the dollar budget (``budget``) and the counts of what was done
(``tally``)."""
