"""The mechanism of upbus, by role; policy lives in :mod:`upbus.plugins`.

- ``subscriptions/``: what components want (specs, incremental merging, the
  manager, the quarantine of refused keys);
- ``sending/``: how the merged state goes out (the batcher, the rate limiters);
- ``wire/``: bytes and messages (codec, message types, transports);
- ``delivery/``: messages to components (router and buffers, events, delivery
  tasks, handler threads, the stall watch);
- ``hooks/``: hook specifications and the plugin manager;
- ``connection/``: one channel's connection kept alive and in sync, by job
  (reconnect loop, sink, receive loop, heartbeat, drift check, refusals, metrics);
- ``_bus.py``: the Bus that wires them together.

Every module here is private: programs import from :mod:`upbus`, plugin authors
from :mod:`upbus.plugin`.
"""
