"""One module per ``upstreamproxy`` subcommand (see :mod:`upstreamproxy.cli`)."""
