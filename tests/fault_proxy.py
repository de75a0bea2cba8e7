"""A TCP proxy on 127.0.0.1 that can partition the network between Envoy and a server (etcd):
what a link between two machines does when it fails, made to order.

Modes, for the connections that exist when the mode is set and for the ones opened meanwhile:

- `pass`: bytes flow both ways.
- `hold`: nothing is read on either side, so bytes wait in the kernel's buffers, as behind a
  link that drops packets for a while; going back to `pass` delivers them all, late (TCP would
  have retransmitted them).
- `answers_lost`: the client's bytes reach the server, the server's answers are thrown away: a
  request the server carries out (an etcd transaction that commits) while its answer never
  arrives.
- `blackhole`: bytes are read and thrown away both ways: a connection that is silently dead
  (a peer gone without a reset). A connection that was black-holed stays dead after `heal`:
  only new connections work, so the client must notice by itself (HTTP/2 keepalive).
- `cut()`: every connection is reset now (RST), as a crashed peer or a firewall would.
"""

import socket
import struct
import threading
import time

from envoy_harness import free_port


class FaultProxy:
    def __init__(self, target_port, target_host="127.0.0.1"):
        self.target = (target_host, target_port)
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.mode = "pass"
        self.lock = threading.Lock()
        self.pairs = []  # [client socket, server socket, {"dead": bool}]
        self.accepted = 0
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(64)
        self.listener.settimeout(0.2)
        self.stopping = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def set(self, mode):
        assert mode in ("pass", "hold", "answers_lost", "blackhole"), mode
        with self.lock:
            self.mode = mode
            if mode == "blackhole":
                for pair in self.pairs:
                    pair[2]["dead"] = True

    def heal(self):
        """Back to `pass` (black-holed connections stay dead)."""
        self.set("pass")

    def cut(self):
        """Resets every connection open now."""
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for client, server, _ in pairs:
            for s in (client, server):
                _reset(s)

    def connections(self):
        with self.lock:
            return len(self.pairs)

    def stop(self):
        self.stopping.set()
        self.cut()
        self.listener.close()

    def _accept(self):
        while not self.stopping.is_set():
            try:
                client, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            try:
                server = socket.create_connection(self.target, timeout=2)
            except OSError:
                _reset(client)
                continue
            state = {"dead": self.mode == "blackhole"}
            with self.lock:
                self.pairs.append([client, server, state])
                self.accepted += 1
            for src, dst, upward in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, upward, state), daemon=True).start()

    def _pump(self, src, dst, upward, state):
        """Copies src → dst (`upward`: client → server) as the mode says, until either closes."""
        src.settimeout(0.1)
        while not self.stopping.is_set():
            if self.mode == "hold" and not state["dead"]:
                time.sleep(0.02)
                continue
            try:
                data = src.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if not data:
                break
            while self.mode == "hold" and not state["dead"] and not self.stopping.is_set():
                time.sleep(0.02)  # read just before the hold began: held too
            # The mode as it is now, not as it was when the read began.
            if state["dead"] or (self.mode == "answers_lost" and not upward):
                continue  # thrown away
            try:
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            try:
                s.close()
            except OSError:
                pass


def _reset(s):
    """Closes with a TCP reset rather than a FIN."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
