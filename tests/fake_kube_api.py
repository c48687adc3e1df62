"""A minimal Kubernetes API server for discovery.k8s.io/v1 EndpointSlices, speaking the real list + watch protocol.

- `GET /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices?labelSelector=k=v`: an EndpointSliceList whose
  metadata.resourceVersion is the store's current version.
- the same with `watch=true&resourceVersion=R`: HTTP/1.1 chunked, one JSON watch event per line
  (`{"type": "ADDED"|"MODIFIED"|"DELETED", "object": ...}`) for every change after R, then each new change as it
  happens. A version older than the store keeps (see `expire`) gets an `ERROR` event with a 410 Status, as the real
  API server sends when etcd has compacted it.

Tests change the store with `apply` / `delete` and read `requests` to see what the client asked.
"""
import copy
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

PATH = re.compile(r"^/apis/discovery\.k8s\.io/v1/namespaces/([^/]+)/endpointslices$")


def endpoint_slice(name: str, service: str, addresses: dict[str, bool], port: int | dict[str, int]) -> dict:
    """An EndpointSlice of `service`: {ip: ready} endpoints on one port, or on named ports {name: port}."""
    ports = port if isinstance(port, dict) else {"grpc": port}
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": ready, "serving": True, "terminating": not ready}}
                      for ip, ready in addresses.items()],
        "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports.items()],
    }


class FakeKubeApi:
    def __init__(self):
        self._cond = threading.Condition()
        self._version = 1
        self._objects: dict[tuple[str, str], dict] = {}    # (namespace, name) -> object
        self._events: list[tuple[int, str, str, dict]] = []  # (version, type, namespace, object)
        self._oldest = 1          # watches from an older version get 410 Gone
        self._expired = 0         # bumped by `expire`: open watches end with 410
        self._stopping = False
        self.fail_next = 0        # answer the next requests with 500
        self.requests: list[str] = []  # "list" or "watch <resourceVersion>", in order
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                api._handle(self)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeKubeApi":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------ the store

    @property
    def version(self) -> int:
        return self._version

    def apply(self, namespace: str, obj: dict, event: bool = True) -> None:
        """Create or replace an object. event=False changes it without a watch event (one the client missed)."""
        with self._cond:
            self._version += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["namespace"] = namespace
            obj["metadata"]["resourceVersion"] = str(self._version)
            kind = "MODIFIED" if (namespace, obj["metadata"]["name"]) in self._objects else "ADDED"
            self._objects[namespace, obj["metadata"]["name"]] = obj
            if event:
                self._events.append((self._version, kind, namespace, obj))
            self._cond.notify_all()

    def delete(self, namespace: str, name: str) -> None:
        with self._cond:
            self._version += 1
            obj = copy.deepcopy(self._objects.pop((namespace, name)))
            obj["metadata"]["resourceVersion"] = str(self._version)
            self._events.append((self._version, "DELETED", namespace, obj))
            self._cond.notify_all()

    def expire(self) -> None:
        """Compact history: every version up to now is gone, open watches end with 410 Gone."""
        with self._cond:
            self._version += 1
            self._oldest = self._version
            self._expired += 1
            self._cond.notify_all()

    # ------------------------------------------------------------ HTTP

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlparse(h.path)
        match = PATH.match(url.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if not match:
            return self._send(h, 404, status(404, "NotFound", f"{url.path} not found"))
        namespace = match.group(1)
        selector = dict(term.split("=", 1) for term in filter(None, query.get("labelSelector", "").split(",")))
        watch = query.get("watch") in ("true", "1")
        with self._cond:
            self.requests.append(f"watch {query.get('resourceVersion', '')}" if watch else "list")
            if self.fail_next:
                self.fail_next -= 1
                return self._send(h, 500, status(500, "InternalError", "injected failure"))

        def selected(ns: str, obj: dict) -> bool:
            labels = obj["metadata"].get("labels", {})
            return ns == namespace and all(labels.get(k) == v for k, v in selector.items())

        if not watch:
            with self._cond:
                items = [o for (ns, _), o in sorted(self._objects.items()) if selected(ns, o)]
                body = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
                        "metadata": {"resourceVersion": str(self._version)}, "items": items}
            return self._send(h, 200, body)
        self._watch(h, query, selected)

    def _watch(self, h, query: dict, selected) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        deadline = time.monotonic() + float(query.get("timeoutSeconds", 3600))
        with self._cond:
            expired = self._expired
            if query.get("resourceVersion", "0") in ("", "0"):  # "any version": the current state first
                version = self._version
                pending = [(version, "ADDED", o) for (ns, _), o in sorted(self._objects.items()) if selected(ns, o)]
            else:
                version, pending = int(query["resourceVersion"]), []
        try:
            while pending is not None:
                for version, kind, obj in pending:
                    self._chunk(h, {"type": kind, "object": obj})
                pending = self._next_events(version, expired, deadline, selected)
                if pending == "gone":
                    self._chunk(h, {"type": "ERROR", "object": status(410, "Expired", "too old resource version")})
                    break
            h.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client went away

    def _next_events(self, version: int, expired: int, deadline: float, selected):
        """The selected events after `version`, waiting for some; "gone" when `version` is compacted away;
        None when the watch should end (its timeout, or the server stops)."""
        with self._cond:
            while True:
                if version < self._oldest or self._expired != expired:
                    return "gone"
                pending = [(v, kind, o) for v, kind, ns, o in self._events if v > version and selected(ns, o)]
                if pending:
                    return pending
                if self._stopping or time.monotonic() > deadline:
                    return None
                self._cond.wait(0.1)

    @staticmethod
    def _chunk(h, event: dict) -> None:
        data = json.dumps(event).encode() + b"\n"
        h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        h.wfile.flush()

    @staticmethod
    def _send(h, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


def status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}
