"""Several tcprc servers on one etcd: the registry (leases, claims, a watch-fed
cache), the peer links between servers and forwarding over them.

Imported only by a server whose config has a [cluster] table: nothing below
(wire, engine, device, server, ops) imports it, and a device or a server
without [cluster] never loads it, nor http.client, json or base64 for it.
"""
