"""rows: the input and the requests made of it. Reading the input (``source``), preparing
images (``images``), rendering a row into a request body (``request``) and the plan that
checks a job against its input before anything is sent (``plan``). Reads, never sends."""
