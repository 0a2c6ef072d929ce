"""What components want: specs, incremental merging, the manager, the quarantine.

Every module here is private: import from :mod:`upbus` or :mod:`upbus.plugin`.
"""
