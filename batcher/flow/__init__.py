"""flow: how fast to send. The pacer (``limiter``), the rates in force (``rates``), what the
server's headers state (``server_limits``), discovery of an unstated limit (``discovery``,
``observed``), pauses (``pauses``), places in flight (``concurrency``), and the controller
that holds them together (``controller``)."""
