"""Free TCP ports for the servers the tests start.

A port found by binding port 0 comes from the kernel's ephemeral range (32768-60999 here), where any process's
next outgoing connection or bind(0) may take it before our server binds it; under xdist, Ray's many processes
do exactly that (a Serve proxy failed with "Failed to bind to address"). So ports are drawn below that range and
above Ray's worker ports (10002-19999).
"""

import random
import socket


def free_port() -> int:
    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free TCP port in 20000-32000 on 127.0.0.1")
