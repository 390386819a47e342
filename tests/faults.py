"""Real network faults for tests: a TCP proxy on loopback in front of a server (moto's S3),
reached through the real clients. It can hang up on the first connections (a store that is
unreachable for a while) and cut PUT requests midway through their body (a dropped upload)."""

from __future__ import annotations

import socket
import threading


class FaultyProxy:
    """Forwards 127.0.0.1:``port`` to ``upstream``. ``drop``: connections closed on arrival,
    the first ones; then ``skip`` PUT requests go through and the next ``cut`` PUTs are cut
    after ``after`` bytes. Counters (``dropped``, ``forwarded``, ``cuts``) show the faults
    really happened; set ``cut = 0`` to heal it."""

    def __init__(self, upstream: int, drop: int = 0, cut: int = 0, skip: int = 0,
                 after: int = 200_000):
        self.upstream, self.drop, self.cut, self.skip, self.after = upstream, drop, cut, skip, after
        self.dropped = self.forwarded = self.cuts = 0
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            with self.lock:
                hang_up = self.dropped < self.drop
                self.dropped += hang_up
                self.forwarded += not hang_up
            if hang_up:
                client.close()
                continue
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _doomed(self, chunk: bytes) -> bool:
        if not chunk.startswith(b"PUT "):
            return False
        with self.lock:
            if self.skip > 0:
                self.skip -= 1
                return False
            if self.cut > 0:
                self.cut -= 1
                self.cuts += 1
                return True
        return False

    def _handle(self, client: socket.socket) -> None:
        up = socket.create_connection(("127.0.0.1", self.upstream))

        def back():
            try:
                while data := up.recv(65536):
                    client.sendall(data)
            except OSError:
                pass
            finally:
                client.close()

        threading.Thread(target=back, daemon=True).start()
        doomed, sent = False, 0
        try:
            while data := client.recv(65536):
                if self._doomed(data):
                    doomed, sent = True, 0
                if doomed and sent + len(data) > self.after:
                    up.sendall(data[: max(0, self.after - sent)])
                    raise OSError("cut")
                up.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (client, up):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self.server.close()
