"""One channel's connection, kept alive and in sync, by job.

- ``_manager.py``: the supervisor (connect, back off, reconnect, error frames);
- ``_sink.py``: the current connection as the batcher's sink, and the one route
  for every other frame (keepalive, verification) through the same message budget;
- ``_receive.py``: the receive loop (decode, count, deliver);
- ``_heartbeat.py``: pings that catch half-open sockets;
- ``_verify.py``: the check that the exchange holds the state sent;
- ``_refusals.py``: which wishes a refused request blames, and their quarantine;
- ``_metrics.py``: the counters behind ``get_connection_metrics()``.

Every module here is private: import from :mod:`upbus` or :mod:`upbus.plugin`.
"""
