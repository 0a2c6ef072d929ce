"""Bytes and messages: the codec, message types, the transport protocol and both transports.

- ``_messages.py``: the typed messages; ``_codec.py``: frames to messages and
  subscription state to request frames; ``_auth.py``: the private channel's token;
- ``_transport.py``: the ``Transport`` and ``Connection`` protocols and their errors;
- ``_upgrade.py``: the default transport's HTTP upgrade, through httpx;
- ``_httpx.py``: the default transport's connection (read loop, framing with wsproto);
- ``_picows.py``: the optional picows transport;
- ``_frames.py``: what both transports share, on the standard library alone.

Every module here is private: import from :mod:`upbus` or :mod:`upbus.plugin`.
"""
