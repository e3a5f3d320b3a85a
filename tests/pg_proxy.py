"""A TCP proxy on 127.0.0.1 in front of a test Postgres server that can lose the reply to a COMMIT.

    proxy = LostCommits(dsn)               # `proxy.dsn` reaches the same database through the proxy
    proxy.arm(b"insert into task_logs")     # the next transaction that sends these bytes...
    ...                                     # ...is committed by the server, and its client never hears so

Armed, it reads the protocol's message framing in both directions. When a client that sent the marker bytes
(in a query, a statement or a parameter) sends COMMIT, the proxy forwards it, waits for the server's answer
(CommandComplete and ReadyForQuery, so the commit has surely happened), swallows it and drops that client's
connection: an ambiguous commit, as when a network or a server's host fails at the worst moment. Armed with
`then_down`, it then drops every connection and refuses new ones until `up()`: the database stays out of reach.
"""
import os
import socket
import struct
import threading

from psycopg.conninfo import conninfo_to_dict, make_conninfo


class LostCommits:
    def __init__(self, dsn: str):
        params = conninfo_to_dict(dsn)
        host, port = params.get("host") or "/tmp", int(params.get("port") or 5432)
        self.upstream = (socket.AF_UNIX, os.path.join(host, f".s.PGSQL.{port}")) if host.startswith("/") \
            else (socket.AF_INET, (host, port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.dsn = make_conninfo(dsn, host="127.0.0.1", port=str(self.listener.getsockname()[1]),
                                 sslmode="disable", gssencmode="disable")
        self.markers, self.armed, self.dropped, self.then_down, self.down = [], 0, 0, False, False
        self.connections = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="pg-proxy", daemon=True).start()

    def arm(self, *markers: bytes, times: int = 1, then_down: bool = False):
        """Lose the COMMIT reply of the next `times` transactions whose client sent all of `markers`."""
        with self._lock:
            self.markers, self.armed, self.then_down = list(markers), times, then_down

    def up(self):
        self.down = False

    def close(self):
        self.listener.close()
        with self._lock:
            connections = list(self.connections)
        for connection in connections:
            connection.close()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            if self.down:
                client.close()
                continue
            server = socket.socket(self.upstream[0], socket.SOCK_STREAM)
            server.connect(self.upstream[1])
            connection = _Connection(self, client, server)
            with self._lock:
                self.connections.append(connection)
            connection.start()

    def _take(self) -> bool:
        """One armed drop, if any is left."""
        with self._lock:
            if self.armed:
                self.armed -= 1
                self.dropped += 1
                return True
            return False

    def _dropped(self):
        """A commit's answer was swallowed: go down now, if armed so."""
        if self.then_down:
            self.down = True
            for connection in list(self.connections):
                connection.close()


class _Connection:
    """One client connection and its server connection, pumped by two threads."""

    def __init__(self, proxy: LostCommits, client, server):
        self.proxy, self.client, self.server = proxy, client, server
        self.seen = set()  # markers sent in the current transaction
        self.syncs = 0  # points where the server answers ReadyForQuery: each Query and each Sync
        self.commit_parsed = False  # a COMMIT sent by the extended protocol, whose Sync comes next
        self.drop_at = None  # drop after the server's answer to this sync point

    def start(self):
        threading.Thread(target=self._client_to_server, daemon=True).start()
        threading.Thread(target=self._server_to_client, daemon=True).start()

    def _client_to_server(self):
        try:
            while True:  # the startup phase: untyped messages, until the StartupMessage (protocol 3.0)
                length = struct.unpack("!i", _read(self.client, 4))[0]
                body = _read(self.client, length - 4)
                self.server.sendall(struct.pack("!i", length) + body)
                if body[:4] == struct.pack("!i", 196608):
                    break
            while True:
                kind, body = _message(self.client)
                self._watch(kind, body)
                self.server.sendall(kind + struct.pack("!i", len(body) + 4) + body)
        except OSError:
            pass
        self.close()

    def _watch(self, kind: bytes, body: bytes):
        """Before forwarding a client message: note the markers, and whether this ends an armed transaction."""
        markers = self.proxy.markers
        self.seen.update(m for m in markers if m in body)
        commit = body.lstrip().upper().startswith(b"COMMIT")
        if kind in (b"Q", b"S"):
            self.syncs += 1
        if kind == b"P" and b"COMMIT" in body.upper():
            self.commit_parsed = True
        ends = (kind == b"Q" and commit) or (kind == b"S" and self.commit_parsed)
        if ends:
            self.commit_parsed = False
            if markers and self.seen >= set(markers) and self.proxy._take():
                self.drop_at = self.syncs  # set before the COMMIT is forwarded: its answer can't come first
            self.seen = set()

    def _server_to_client(self):
        ready = 0
        try:
            while True:
                kind, body = _message(self.server)
                if self.drop_at is not None and ready >= self.drop_at - 1:  # the commit's answer: swallowed
                    if kind == b"Z":
                        self.close()
                        self.proxy._dropped()
                        return
                    continue
                ready += kind == b"Z"
                self.client.sendall(kind + struct.pack("!i", len(body) + 4) + body)
        except OSError:
            pass
        self.close()

    def close(self):
        with self.proxy._lock:  # both pump threads close a connection that ends
            if self in self.proxy.connections:
                self.proxy.connections.remove(self)
        for sock in (self.client, self.server):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def _message(sock) -> tuple[bytes, bytes]:
    kind = _read(sock, 1)
    length = struct.unpack("!i", _read(sock, 4))[0]
    return kind, _read(sock, length - 4)


def _read(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise OSError("closed")
        data += chunk
    return data
