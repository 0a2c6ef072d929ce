"""Messages to components: the router and buffers, events, delivery tasks and threads.

Every module here is private: import from :mod:`upbus` or :mod:`upbus.plugin`.
"""
