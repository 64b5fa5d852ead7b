"""The session bootstrap (``upstreamproxy start``), one module per step of DESIGN.md:

* :mod:`.token_file` reads the session token (step 1) and deletes its file (step 5);
* :mod:`.hardening` makes the process non-dumpable with no core dumps (step 2);
* :mod:`.ca_bundle` builds and writes the CA super bundle (step 3);
* :mod:`.proxy_env` computes and renders the environment for tools (step 6);
* :mod:`.privsep` runs the relay as its own user when ``start`` is root, as the process
  :mod:`.relay_child`, which gets the token over a pipe after the privilege drop;
* :mod:`.netlock` is the optional network lock (nftables): only the relay's uid may leave.

Each module documents its public API at its top. Nothing is re-exported here, so that importing
one step does not pull in the others' dependencies.
"""
