"""The plugin system: hook specifications and the plugin manager.

Every module here is private: import from :mod:`upbus` or :mod:`upbus.plugin`.
"""
