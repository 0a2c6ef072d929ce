"""How the merged state goes out: the batcher (one pending task) and the rate limiters.

Every module here is private: import from :mod:`upbus` or :mod:`upbus.plugin`.
"""
