"""Serving inferd to other processes: the daemon, its client, and the HTTP bridge.

``inferd.serve.wire`` is the NDJSON frame format, ``daemon`` the Unix-socket server
(``inferd serve``), ``client`` the :class:`~inferd.backend.Backend` that talks to it,
``config`` the TOML configuration, ``bridge`` the OpenAI-compatible HTTP front
(``inferd bridge``). Nothing is imported here, so ``import inferd.serve.wire`` stays
cheap for tools that only speak the protocol.
"""
