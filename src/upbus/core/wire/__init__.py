"""Bytes and messages: the codec, message types, the transport protocol and both transports.

Every module here is private: import from :mod:`upbus` or :mod:`upbus.plugin`.
"""
