"""A hardened XML-RPC server: the transport half of gimsd, knowing nothing of experiments.

What it adds to the standard library's SimpleXMLRPCServer, and why:
- the request body is bounded: Content-Length is required and checked *before* anything is read;
  chunked bodies and content encodings (gzip bombs) are refused; HTTP/1.0, one request per
  connection, a socket timeout on every read, and a cap on concurrent connections;
- XML is parsed with defusedxml's expat parser, DOCTYPEs (hence entity declarations, billion
  laughs, external entities) refused outright, and array/struct nesting bounded;
- no dotted-name dispatch (functions are looked up by exact name only; no instance registered);
- no traceback or exception class ever reaches a client: the caller's ``dispatch`` maps its own
  errors to Faults, anything unexpected becomes "internal error" and is logged here;
- plain HTTP is served only to loopback peers or peers inside configured trusted networks;
  with TLS, the client must present a certificate signed by the configured CA whose subject is on
  the allow-list;
- every refused request is logged with the peer and the reason.
"""
from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import threading
import xmlrpc.client
from http import HTTPStatus
from xml.parsers.expat import ExpatError
from typing import Any, Callable
from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer

from defusedxml.common import DefusedXmlException
from defusedxml.xmlrpc import DefusedExpatParser

log = logging.getLogger("gimsd.xmlrpc")

INT32_MAX = 2**31 - 1
FAULT_MALFORMED = -32700  # the XML-RPC fault-code convention's "parse error"


class NestingTooDeep(ValueError):
    pass


class _DepthLimitedUnmarshaller(xmlrpc.client.Unmarshaller):
    def __init__(self, max_depth: int):
        super().__init__(use_datetime=False, use_builtin_types=False)
        self._max_depth = max_depth

    def start(self, tag, attrs):
        if tag in ("array", "struct") and len(self._marks) >= self._max_depth:
            raise NestingTooDeep(f"arrays/structs nested deeper than {self._max_depth} levels")
        super().start(tag, attrs)


def safe_loads(data: bytes, max_depth: int) -> tuple[tuple[Any, ...], str | None]:
    """xmlrpc.client.loads with defusedxml's parser (no DOCTYPE, no entities) and a depth limit.
    Raises ValueError with a reason fit for the client."""
    target = _DepthLimitedUnmarshaller(max_depth)
    parser = DefusedExpatParser(target, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    try:
        parser.feed(data)
        parser.close()
        params = target.close()
    except NestingTooDeep as e:
        raise ValueError(str(e)) from None
    except DefusedXmlException:
        raise ValueError("DOCTYPE, entity declarations and external references are not accepted") from None
    except ExpatError as e:  # position only, never the content
        raise ValueError(f"malformed XML-RPC request ({_short(e)})") from None
    except Exception as e:  # bad ints/doubles/base64/dates, unbalanced tags: their messages may
        # quote the value, which could be anything (even a key sent in the wrong field): not echoed
        raise ValueError(f"malformed XML-RPC request (a bad value or structure: {type(e).__name__})") from None
    method = target.getmethodname()
    if not isinstance(method, str) or not method:
        raise ValueError("malformed XML-RPC request (no methodName)")
    return params, method


def _short(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:120]


def printable(text: str, limit: int = 60) -> str:
    """A client-supplied name made safe to echo in a log line or a fault string."""
    out = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return out + ("..." if len(text) > limit else "")


def to_wire(value: Any) -> Any:
    """Make a result marshallable for every XML-RPC client: None becomes "" (old clients do not
    know <nil/>), ints beyond 32 bits become doubles (exact up to 2**53; the standard has no i8),
    tuples become arrays, struct keys strings."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -INT32_MAX - 1 <= value <= INT32_MAX else float(value)
    if isinstance(value, dict):
        return {str(k): to_wire(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_wire(v) for v in value]
    return value


class HardenedRequestHandler(SimpleXMLRPCRequestHandler):
    rpc_paths = ("/", "/RPC2")
    protocol_version = "HTTP/1.0"  # one request per connection: no keep-alive to hold threads
    server: "HardenedXMLRPCServer"

    def setup(self) -> None:
        self.timeout = self.server.socket_timeout  # StreamRequestHandler applies it to every recv
        super().setup()
        # ...and this bounds the whole request, so a client dripping a byte now and then cannot
        # hold a thread for longer than one timeout either.
        self._deadline = threading.Timer(self.server.socket_timeout, self._too_slow)
        self._deadline.daemon = True
        self._deadline.start()

    def _too_slow(self) -> None:
        self.server.log_refusal(self.client_address,
                                f"timed out: request not received within {self.server.socket_timeout:g} s")
        try:  # the plain socket's shutdown, also under TLS: wakes the reading thread with EOF
            socket.socket.shutdown(self.connection, socket.SHUT_RDWR)
        except OSError:
            pass

    def _request_received(self) -> None:
        self._deadline.cancel()

    def finish(self) -> None:
        self._deadline.cancel()
        super().finish()

    def _refuse(self, status: HTTPStatus, reason: str) -> None:
        self._request_received()
        self.server.log_refusal(self.client_address, f"HTTP {status.value}: {reason}")
        body = (reason + "\n").encode()
        self.send_response(status.value)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if getattr(self.server.conn_state, "forbidden", False):
            length = self.headers.get("Content-Length", "")
            if length.isdigit() and int(length) <= self.server.max_request_bytes:
                self.rfile.read(int(length))  # drained, so closing does not reset the answer away
            self._request_received()
            self.send_response(HTTPStatus.FORBIDDEN.value)
            body = b"client certificate is not allowed\n"
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
            return False
        return True

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        if not self.is_rpc_path_valid():
            return self._refuse(HTTPStatus.NOT_FOUND, "no such path (use / or /RPC2)")
        if self.headers.get("Transfer-Encoding"):
            return self._refuse(HTTPStatus.LENGTH_REQUIRED,
                                "Transfer-Encoding is not accepted; send a Content-Length")
        encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding != "identity":
            return self._refuse(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "Content-Encoding is not accepted")
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            return self._refuse(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
        raw_length = raw_length.strip()
        if not raw_length.isdigit() or len(raw_length) > 12:
            return self._refuse(HTTPStatus.BAD_REQUEST, "Content-Length is not a number")
        length = int(raw_length)
        if length > self.server.max_request_bytes:
            # Refused before reading a byte of the body.
            return self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                f"request body larger than {self.server.max_request_bytes} bytes")
        try:
            data = self.rfile.read(length)
        except (TimeoutError, socket.timeout):
            return self.server.log_refusal(self.client_address, "timed out reading the request body")
        self._request_received()
        if len(data) != length:
            return self.server.log_refusal(self.client_address, "request body shorter than its Content-Length")
        response = self.server.handle_xmlrpc(data, self.client_address)
        self.send_response(HTTPStatus.OK.value)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(response)))
        self.end_headers()
        self.wfile.write(response)

    def do_GET(self) -> None:  # noqa: N802
        self._refuse(HTTPStatus.METHOD_NOT_ALLOWED, "XML-RPC needs POST")

    do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = do_GET  # noqa: N815

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (TimeoutError, socket.timeout):
            self.server.log_refusal(self.client_address, "timed out")
            self.close_connection = True
        except (ConnectionError, ssl.SSLError, ValueError) as e:  # ValueError: I/O on a socket shut down
            log.debug("connection from %s ended: %s", self.client_address[0], e)
            self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        # http.server's own refusals (bad request line, headers too long, unsupported method).
        self._request_received()
        self.server.log_refusal(self.client_address, f"HTTP {code}: {message or ''}".strip())
        super().send_error(code, message, explain)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug("%s %s", self.client_address[0], format % args)


class HardenedXMLRPCServer(socketserver.ThreadingMixIn, SimpleXMLRPCServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], *, max_request_bytes: int, socket_timeout: float,
                 max_depth: int, max_connections: int, peer_allowed: Callable[[str], bool],
                 tls_context: ssl.SSLContext | None = None, allowed_subjects: tuple[str, ...] = ()):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.max_request_bytes = max_request_bytes
        self.socket_timeout = socket_timeout
        self.max_depth = max_depth
        self.peer_allowed = peer_allowed
        self.tls_context = tls_context
        self.allowed_subjects = frozenset(allowed_subjects)
        self._slots = threading.BoundedSemaphore(max_connections)
        self.conn_state = threading.local()  # per connection (one thread each): is it forbidden?
        super().__init__(address, requestHandler=HardenedRequestHandler, logRequests=False,
                         allow_none=False, encoding="utf-8", bind_and_activate=True)

    # -- refusals
    def log_refusal(self, client_address: Any, reason: str) -> None:
        peer = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        log.warning("refused request from %s: %s", peer, reason)

    # -- connection admission (runs in the accepting thread: cheap checks only)
    def verify_request(self, request, client_address) -> bool:
        if self.tls_context is None and not self.peer_allowed(client_address[0]):
            self.log_refusal(client_address, "plain HTTP is served only to loopback and trusted networks")
            return False
        if not self._slots.acquire(blocking=False):
            self.log_refusal(client_address, "too many concurrent connections")
            return False
        return True

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request, client_address) -> None:
        # Runs in the connection's own thread, so a slow TLS handshake holds only that thread.
        request.settimeout(self.socket_timeout)
        self.conn_state.forbidden = False
        if self.tls_context is None:
            return super().finish_request(request, client_address)
        try:
            tls = self.tls_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            self.log_refusal(client_address, f"TLS handshake failed: {_short(e)}")
            return
        try:
            subject = self._subject(tls)
            allowed = subject is not None and ("*" in self.allowed_subjects or subject in self.allowed_subjects)
            if not allowed:
                self.log_refusal(client_address, f"client certificate subject {subject!r} is not allowed")
            # The handler answers 403 to every request of a connection that is not allowed, after
            # reading the request (answering before would race the client's write).
            self.conn_state.forbidden = not allowed
            log.debug("TLS client %s: %s", client_address[0], subject)
            super().finish_request(tls, client_address)
        finally:
            try:
                tls.close()
            except OSError:
                pass

    @staticmethod
    def _subject(tls: ssl.SSLSocket) -> str | None:
        der = tls.getpeercert(binary_form=True)
        if not der:
            return None
        from cryptography import x509  # noqa: PLC0415
        return x509.load_der_x509_certificate(der).subject.rfc4514_string()

    # -- dispatch
    def handle_xmlrpc(self, data: bytes, client_address: Any) -> bytes:
        try:
            params, method = safe_loads(data, self.max_depth)
        except ValueError as e:
            self.log_refusal(client_address, str(e))
            return xmlrpc.client.dumps(xmlrpc.client.Fault(self.fault_code(FAULT_MALFORMED), str(e)),
                                       methodresponse=True, encoding="utf-8").encode("utf-8", "xmlcharrefreplace")
        try:
            result = self._dispatch(method, params)
            body = xmlrpc.client.dumps((to_wire(result),), methodresponse=True, encoding="utf-8",
                                       allow_none=False)
        except xmlrpc.client.Fault as fault:
            self.log_refusal(client_address, f"{printable(method)}: fault {fault.faultCode}: {fault.faultString}")
            body = xmlrpc.client.dumps(fault, methodresponse=True, encoding="utf-8")
        except Exception:
            log.exception("internal error in %s", printable(method))
            fault = xmlrpc.client.Fault(self.fault_code(7), "internal error in gimsd (details are in the node's log)")
            body = xmlrpc.client.dumps(fault, methodresponse=True, encoding="utf-8")
        return body.encode("utf-8", "xmlcharrefreplace")

    def fault_code(self, distinct: int) -> int:
        """Override to choose between -1 (the original's) and distinct codes."""
        return -1

    def _dispatch(self, method: str, params: tuple[Any, ...]) -> Any:
        func = self.funcs.get(method)  # exact names only: never resolve dotted attributes
        if func is None:
            raise xmlrpc.client.Fault(self.fault_code(8), f"unknown method {printable(method)!r}")
        return func(*params)


def make_tls_context(cert: str, key: str, client_ca: str) -> ssl.SSLContext:
    """Server TLS context requiring a client certificate signed by ``client_ca``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cafile=client_ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
