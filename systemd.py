"""sd_notify(3) over ``$NOTIFY_SOCKET``, without a dependency: ``READY=1`` once the process
can take calls, ``STATUS=`` lines, ``STOPPING=1``, and ``WATCHDOG=1`` pings. The single-room
worker speaks it to systemd; the serve host (dispatch.py) to systemd and, as a parent, reads
it from its call processes."""

from __future__ import annotations

import logging
import os
import socket
from typing import Mapping

log = logging.getLogger("systemd")


class SystemdNotifier:
    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        addr = environ.get("NOTIFY_SOCKET", "")
        self.address = ("\0" + addr[1:]) if addr.startswith("@") else addr
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        # The watchdog interval systemd expects pings within (0: no watchdog).
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and (not pid or pid == str(os.getpid())) else 0.0

    def notify(self, *lines: str) -> bool:
        if not self.address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(lines).encode(), self.address)
            return True
        except OSError as e:
            log.debug("sd_notify failed: %s", e)
            return False
