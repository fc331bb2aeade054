"""A local stand-in for the parts of Stripe's HTTP API that billing uses.

A real HTTP server on a free 127.0.0.1 port (in a thread) that the official ``stripe`` SDK is
pointed at. Like Stripe it: requires and honours ``Idempotency-Key`` on every POST (same key +
same parameters → the stored response is replayed; same key + other parameters → 400
``idempotency_error``), validates the form-encoded parameters it receives, and keeps the objects
it created. It records every request, and can be told to fail request number N (1-based):
``"500"`` (answer 500, process nothing), ``"drop"`` (close the connection before processing)
or ``"drop_after"`` (process, store the result, then close the connection without answering).
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit


@dataclass
class Recorded:
    number: int
    method: str
    path: str
    params: dict[str, str]
    idempotency_key: str | None
    outcome: str = ""


class StandInError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, type_: str = ""
    ) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.type = type_ or "invalid_request_error"


def _nested(params: dict[str, str], name: str) -> dict[str, str]:
    prefix = f"{name}["
    return {
        k[len(prefix) : -1]: v
        for k, v in params.items()
        if k.startswith(prefix) and k.endswith("]")
    }


@dataclass
class StripeStandIn:
    fail_at: dict[int, str] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    invoices: dict[str, dict[str, Any]] = field(default_factory=dict)
    invoice_items: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._idem: dict[str, tuple[str, str, int, bytes]] = {}
        self._ids = itertools.count(1)
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                standin._handle(self, "POST")

            def do_GET(self) -> None:
                standin._handle(self, "GET")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- request handling ---------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length).decode() if length else ""
        split = urlsplit(h.path)
        params = dict(parse_qsl(body if method == "POST" else split.query, keep_blank_values=True))
        key = h.headers.get("Idempotency-Key")
        with self._lock:
            rec = Recorded(len(self.requests) + 1, method, split.path, params, key)
            self.requests.append(rec)
            mode = self.fail_at.get(rec.number)
            if mode == "500":
                rec.outcome = "failed:500"
                self._send(h, 500, {"error": {"type": "api_error", "message": "injected"}})
                return
            if mode == "drop":
                rec.outcome = "dropped"
                h.close_connection = True
                return
            status, payload = self._process(h, method, split.path, params, key, rec)
            if mode == "drop_after":
                rec.outcome += "+dropped"
                h.close_connection = True
                return
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    def _send(self, h: BaseHTTPRequestHandler, status: int, obj: dict[str, Any]) -> None:
        payload = json.dumps(obj).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    def _process(
        self,
        h: BaseHTTPRequestHandler,
        method: str,
        path: str,
        params: dict[str, str],
        key: str | None,
        rec: Recorded,
    ) -> tuple[int, bytes]:
        if not (h.headers.get("Authorization") or "").startswith("Bearer sk_"):
            rec.outcome = "unauthorized"
            return 401, json.dumps({"error": {"type": "invalid_request_error"}}).encode()
        fingerprint = json.dumps([method, path, sorted(params.items())])
        if method == "POST":
            if not key:
                rec.outcome = "rejected:no-idempotency-key"
                return 400, json.dumps(
                    {
                        "error": {
                            "type": "invalid_request_error",
                            "message": "Idempotency-Key required",
                        }
                    }
                ).encode()
            if key in self._idem:
                fp, _path, status, payload = self._idem[key]
                if fp != fingerprint:
                    rec.outcome = "rejected:idempotency-mismatch"
                    return 400, json.dumps(
                        {"error": {"type": "idempotency_error", "message": "key reused"}}
                    ).encode()
                rec.outcome = "replayed"
                return status, payload
        try:
            obj = self._route(method, path, params)
            status, payload = 200, json.dumps(obj).encode()
            rec.outcome = "ok"
        except StandInError as e:
            status = e.status
            payload = json.dumps(
                {"error": {"type": e.type, "message": str(e), "param": e.param}}
            ).encode()
            rec.outcome = f"error:{e}"
        if method == "POST" and key:
            self._idem[key] = (fingerprint, path, status, payload)
        return status, payload

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids):06d}"

    def _route(self, method: str, path: str, p: dict[str, str]) -> dict[str, Any]:
        if method == "POST" and path == "/v1/customers":
            self._only(p, {"name", "email"}, {"metadata"})
            obj = {
                "id": self._new_id("cus"),
                "object": "customer",
                "name": p.get("name"),
                "metadata": _nested(p, "metadata"),
            }
            self.customers[obj["id"]] = obj
            return obj
        if method == "POST" and path == "/v1/invoices":
            self._only(
                p,
                {
                    "customer",
                    "currency",
                    "collection_method",
                    "days_until_due",
                    "auto_advance",
                    "pending_invoice_items_behavior",
                    "description",
                },
                {"metadata"},
            )
            self._customer(p)
            self._currency(p)
            if p.get("days_until_due") is not None and not p["days_until_due"].isdigit():
                raise StandInError(400, "days_until_due must be an integer", "days_until_due")
            obj = {
                "id": self._new_id("in"),
                "object": "invoice",
                "customer": p["customer"],
                "currency": p["currency"],
                "status": "draft",
                "total": 0,
                "metadata": _nested(p, "metadata"),
            }
            self.invoices[obj["id"]] = obj
            return obj
        if method == "POST" and path == "/v1/invoiceitems":
            self._only(
                p, {"customer", "invoice", "amount", "currency", "description"}, {"metadata"}
            )
            self._customer(p)
            self._currency(p)
            if not re.fullmatch(r"-?\d+", p.get("amount", "")):
                raise StandInError(400, "amount must be an integer (minor units)", "amount")
            inv = self.invoices.get(p.get("invoice", ""))
            if inv is None or inv["customer"] != p["customer"]:
                raise StandInError(404, "No such invoice", "invoice")
            if inv["status"] != "draft":
                raise StandInError(400, "invoice is not a draft", "invoice")
            obj = {
                "id": self._new_id("ii"),
                "object": "invoiceitem",
                "customer": p["customer"],
                "invoice": inv["id"],
                "amount": int(p["amount"]),
                "currency": p["currency"],
                "description": p.get("description"),
                "metadata": _nested(p, "metadata"),
            }
            self.invoice_items[obj["id"]] = obj
            inv["total"] += obj["amount"]
            return obj
        m = re.fullmatch(r"/v1/invoices/([^/]+)/finalize", path)
        if method == "POST" and m:
            self._only(p, {"auto_advance"}, set())
            inv = self.invoices.get(m.group(1))
            if inv is None:
                raise StandInError(404, "No such invoice", "invoice")
            if inv["status"] != "draft":
                raise StandInError(400, "This invoice is already finalized", None)
            inv["status"] = "open"
            return inv
        raise StandInError(404, f"Unrecognized request URL ({method}: {path})")

    @staticmethod
    def _only(p: dict[str, str], scalars: set[str], nested: set[str]) -> None:
        for k in p:
            base = k.split("[", 1)[0]
            if ("[" in k and base not in nested) or ("[" not in k and k not in scalars):
                raise StandInError(400, f"Received unknown parameter: {k}", k)

    def _customer(self, p: dict[str, str]) -> None:
        if p.get("customer") not in self.customers:
            raise StandInError(404, f"No such customer: {p.get('customer')!r}", "customer")

    @staticmethod
    def _currency(p: dict[str, str]) -> None:
        if not re.fullmatch(r"[a-z]{3}", p.get("currency", "")):
            raise StandInError(400, "currency must be a lowercase ISO code", "currency")
