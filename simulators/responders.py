"""Simulated responders: family members, community workers and the 110/120 desk.

    python -m simulators.responders --port 9900 --script responders.json \\
        [--secret SECRET] [--host 127.0.0.1] [--duration SECONDS]

It stands in for the SMS/voice provider behind the webhook channel.  Every POST
(any path) is a signed call request from the server; it is answered as the
script says for the called phone number::

    {"13900000001": {"answer": "accept", "after": 5},
     "13900000002": {"answer": "decline", "after": 2},
     "*":           {"answer": "never"}}

- ``accept`` / ``decline``: 200 at once, then after ``after`` seconds a signed
  ``{"answer": ..., "responder": <phone>}`` POST to the request's ``callback_url``;
- ``never``: 200 and nothing more (the phone rings out);
- ``fail``: 500 every time (the provider could not deliver; the server retries);
- a number not in the script uses ``"*"``, or ``never`` when there is no ``"*"``.

A request whose signature does not verify gets 401.  stdout carries one JSON
line per call received (``phone, incident, tier, answer, type, attempt``; a
rejected call has ``answer`` ``bad_signature`` or ``bad_request`` and a
``reason``) and one per callback made (``callback``: attempt id, ``status``:
the HTTP status, or a string when no status was obtained).  Diagnostics go to
stderr.  Exit status 2 means a bad command line or script file.

The secret defaults to ``$DISPATCH_WEBHOOK_SECRET``, else ``dev-secret``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from typing import IO, Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from dispatch.routing import signing

ANSWERS = ("accept", "decline", "never", "fail")
DEFAULT_SECRET = "dev-secret"
SECRET_ENV = "DISPATCH_WEBHOOK_SECRET"
# A server that accepts the connection but never answers must not pin a callback forever.
CALLBACK_TIMEOUT_S = 30.0
_NEVER: dict[str, Any] = {"answer": "never", "after": 0.0}
_RULE_KEYS = frozenset({"answer", "after"})

Script = dict[str, dict[str, Any]]


class ScriptError(ValueError):
    """The responder script is missing, unreadable or not of the documented shape."""


def validate_script(data: Any, source: str = "script") -> Script:
    """Check a parsed script and return it normalised (``after`` always a float).

    Unknown keys in a rule are rejected because a typo such as ``"afer"`` would
    otherwise silently mean "answer at once" and make a test pass for the wrong reason.
    """
    if not isinstance(data, dict):
        raise ScriptError(f"{source}: must be a JSON object mapping phone numbers to rules")
    script: Script = {}
    for phone, rule in data.items():
        where = f"{source}: entry {phone!r}"
        if not isinstance(rule, dict):
            raise ScriptError(f'{where}: must be an object like {{"answer": "accept"}}')
        extra = set(rule) - _RULE_KEYS
        if extra:
            raise ScriptError(f"{where}: unknown key(s) {sorted(extra)}; allowed: answer, after")
        answer = rule.get("answer")
        if answer not in ANSWERS:
            raise ScriptError(f"{where}: answer {answer!r} is not one of {', '.join(ANSWERS)}")
        after = rule.get("after", 0)
        # bool is an int subclass; "after": true is a mistake, not one second.
        if isinstance(after, bool) or not isinstance(after, int | float):
            raise ScriptError(f"{where}: after must be a number of seconds, got {after!r}")
        if not math.isfinite(after) or after < 0:
            raise ScriptError(f"{where}: after must be a finite number >= 0, got {after!r}")
        script[str(phone)] = {"answer": answer, "after": float(after)}
    return script


def load_script(path: str) -> Script:
    """Read and validate the JSON script at ``path``; raise ScriptError with a clear message."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ScriptError(f"cannot read script {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ScriptError(f"script {path} is not UTF-8 text: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ScriptError(f"script {path} is not valid JSON: {exc}") from exc
    return validate_script(data, source=f"script {path}")


def rule_for(script: Script, phone: str) -> dict[str, Any]:
    """The rule for ``phone``: its own entry, else ``"*"``, else ``never``."""
    return script.get(phone) or script.get("*") or _NEVER


@implementer(IBodyProducer)
class BytesProducer:
    """An in-memory request body written in one go.

    Used instead of FileBodyProducer because that one paces itself on the global
    reactor's cooperator, which a test driving a ``task.Clock`` cannot advance;
    a callback body is a few dozen bytes, so there is nothing to pace.
    """

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _BodyReader(Protocol):
    """Collects a response body; used instead of readBody(), which emits a
    DeprecationWarning on every response Agent delivers after the body has arrived."""

    def __init__(self, done: defer.Deferred[bytes]) -> None:
        self.done = done
        self.chunks: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


def read_body(response: IResponse) -> defer.Deferred[bytes]:
    """The whole body of an Agent ``response``."""
    done: defer.Deferred[bytes] = defer.Deferred()
    response.deliverBody(_BodyReader(done))
    return done


def _header(request: Request, name: bytes) -> str | None:
    values = request.requestHeaders.getRawHeaders(name)
    # latin-1 maps every byte, so a garbage header reaches verify() and is reported
    # as a bad signature rather than crashing the decode.
    return values[0].decode("latin-1") if values else None


class ResponderResource(Resource):
    """Answers every POST as a scripted responder; see the module docstring.

    ``clock`` supplies both the signature-check time and the callback delays, so a
    test can pass a ``task.Clock``; ``agent`` is any IAgent (a fake in unit tests).
    ``calls`` and ``callbacks`` keep what was printed, for in-process inspection.
    """

    isLeaf = True

    def __init__(
        self,
        script: Script,
        secret: bytes | str,
        clock: IReactorTime,
        agent: IAgent,
        out: IO[str],
        tolerance_s: int = signing.DEFAULT_TOLERANCE_S,
    ) -> None:
        super().__init__()
        self.script = validate_script(script)
        self.secret = secret.encode("utf-8") if isinstance(secret, str) else secret
        self.clock = clock
        self.agent = agent
        self.out = out
        self.tolerance_s = tolerance_s
        self.calls: list[dict[str, Any]] = []
        self.callbacks: list[dict[str, Any]] = []
        self._pending: set[defer.Deferred[None]] = set()

    # --- output ---------------------------------------------------------------------

    def _emit(self, line: dict[str, Any]) -> None:
        self.out.write(json.dumps(line) + "\n")
        # Flushed per line: a harness reading a pipe must see each call as it happens.
        self.out.flush()

    def _call_line(self, call: Any, answer: str, reason: str | None = None) -> dict[str, Any]:
        fields = call if isinstance(call, dict) else {}
        line: dict[str, Any] = {
            "phone": fields.get("phone"),
            "incident": fields.get("incident_id"),
            "tier": fields.get("tier"),
            "answer": answer,
            "type": fields.get("type"),
            "attempt": fields.get("attempt_id"),
        }
        if reason is not None:
            line["reason"] = reason
        self.calls.append(line)
        self._emit(line)
        return line

    @staticmethod
    def _reply(request: Request, code: int, payload: dict[str, Any]) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(payload).encode("utf-8")

    # --- requests -------------------------------------------------------------------

    def render_POST(self, request: Request) -> bytes:
        content = getattr(request, "content", None)
        body = content.read() if content is not None else b""
        try:
            call: Any = json.loads(body)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError both
            call = None

        reason = signing.verify(
            self.secret,
            body,
            _header(request, b"X-Dispatch-Timestamp"),
            _header(request, b"X-Dispatch-Signature"),
            now=self.clock.seconds(),
            tolerance_s=self.tolerance_s,
        )
        if reason is not None:
            self._call_line(call, "bad_signature", reason)
            return self._reply(
                request, 401, {"error": reason, "detail": "request signature did not verify"}
            )

        phone = call.get("phone") if isinstance(call, dict) else None
        if not isinstance(phone, str) or not phone:
            self._call_line(
                call, "bad_request", "no_phone" if isinstance(call, dict) else "bad_json"
            )
            return self._reply(
                request,
                400,
                {"error": "bad_request", "detail": "body must be a JSON object with a phone"},
            )

        rule = rule_for(self.script, phone)
        answer, after = rule["answer"], rule["after"]
        self._call_line(call, answer)
        if answer == "fail":
            return self._reply(
                request, 500, {"error": "scripted_failure", "detail": "scripted to fail"}
            )
        if answer in ("accept", "decline"):
            self._schedule_callback(call, answer, after)
        return self._reply(request, 200, {"status": "accepted"})

    # --- callbacks ------------------------------------------------------------------

    def _schedule_callback(self, call: dict[str, Any], answer: str, after: float) -> None:
        attempt = call.get("attempt_id")
        url = call.get("callback_url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            # The call was delivered (200 stands); there is just nowhere to answer to.
            self._callback_line(attempt, "no_callback_url")
            return
        d = task.deferLater(
            self.clock, after, self._send_callback, attempt, url, answer, call["phone"]
        )
        self._pending.add(d)
        d.addErrback(lambda f: f.trap(defer.CancelledError))
        d.addBoth(lambda _: self._pending.discard(d))

    def _send_callback(
        self, attempt: Any, url: str, answer: str, phone: str
    ) -> defer.Deferred[None]:
        body = json.dumps({"answer": answer, "responder": phone}).encode("utf-8")
        headers = Headers({b"Content-Type": [b"application/json"]})
        for name, value in signing.sign(self.secret, body, int(self.clock.seconds())).items():
            headers.setRawHeaders(name.encode("ascii"), [value.encode("ascii")])
        # maybeDeferred: an Agent may raise synchronously on a malformed URL, and that
        # must become a printed callback error, not an unhandled one.
        d: defer.Deferred[Any] = defer.maybeDeferred(
            self.agent.request, b"POST", url.encode("utf-8"), headers, BytesProducer(body)
        )
        d.addTimeout(CALLBACK_TIMEOUT_S, self.clock)

        def got_response(response: IResponse) -> defer.Deferred[None]:
            self._callback_line(attempt, response.code)
            # Drain the body so the connection is released; its content does not matter.
            drained = read_body(response)
            return drained.addCallbacks(lambda _: None, lambda _: None)

        def failed(failure: Failure) -> None:
            self._callback_line(
                attempt, f"error: {failure.type.__name__}: {failure.getErrorMessage()}"
            )

        return d.addCallbacks(got_response, failed)

    def _callback_line(self, attempt: Any, status: int | str) -> None:
        line = {"callback": attempt, "status": status}
        self.callbacks.append(line)
        self._emit(line)

    # --- lifecycle ------------------------------------------------------------------

    def pending(self) -> int:
        """How many callbacks are scheduled or in flight."""
        return len(self._pending)

    def drain(self) -> defer.Deferred[None]:
        """A Deferred that fires once every callback scheduled so far has completed."""
        waits = list(self._pending)
        return defer.gatherResults(waits, consumeErrors=True).addCallback(lambda _: None)

    def stop(self) -> None:
        """Cancel callbacks not yet made (at shutdown the answers are moot)."""
        for d in list(self._pending):
            d.cancel()


class ResponderSite(Site):
    """A Site serving one ResponderResource on every path; ``.resource`` is it."""

    def __init__(
        self,
        script: Script,
        secret: bytes | str,
        clock: IReactorTime,
        agent: IAgent,
        out: IO[str],
        tolerance_s: int = signing.DEFAULT_TOLERANCE_S,
    ) -> None:
        self.resource = ResponderResource(script, secret, clock, agent, out, tolerance_s)
        super().__init__(self.resource)
        # One log line per request would bury the JSON lines tests and people read.
        self.noisy = False

    def log(self, request: Request) -> None:
        pass


# --- command line ---------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line (argparse exits 2 on a bad one)."""
    p = argparse.ArgumentParser(
        prog="python -m simulators.responders",
        description="Simulated responders answering the dispatch webhook channel.",
    )
    p.add_argument("--port", type=int, required=True, help="TCP port to listen on (0: any)")
    p.add_argument("--script", required=True, help="JSON script: phone -> {answer, after}")
    p.add_argument(
        "--secret",
        default=None,
        help=f"shared signing secret (default ${SECRET_ENV}, else {DEFAULT_SECRET})",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    opts = p.parse_args(argv)
    if opts.secret is None:
        # Resolved here, not at import, so a test or wrapper can set the env var late.
        opts.secret = os.environ.get(SECRET_ENV) or DEFAULT_SECRET
    if not 0 <= opts.port <= 65535:
        p.error(f"--port {opts.port} is out of range")
    if opts.duration is not None and not (math.isfinite(opts.duration) and opts.duration >= 0):
        p.error("--duration must be a finite number >= 0")
    return opts


def main(argv: list[str] | None = None, out: IO[str] = sys.stdout) -> int:
    """Run the responders on the global reactor until --duration or a signal; return exit status."""
    opts = parse_args(argv)
    try:
        script = load_script(opts.script)
    except ScriptError as exc:
        print(f"responders: {exc}", file=sys.stderr)
        return 2

    from twisted.internet import error, reactor
    from twisted.web.client import Agent

    _install_stop_signals(reactor)

    site = ResponderSite(script, opts.secret, reactor, Agent(reactor), out)
    try:
        port = reactor.listenTCP(opts.port, site, interface=opts.host)
    except error.CannotListenError as exc:
        print(f"responders: cannot listen on {opts.host}:{opts.port}: {exc}", file=sys.stderr)
        return 1
    # stderr, so stdout stays pure JSON lines; with --port 0 this is how to find the port.
    print(
        f"responders: listening on {opts.host}:{port.getHost().port}, "
        f"{len(script)} script entr{'y' if len(script) == 1 else 'ies'}",
        file=sys.stderr,
        flush=True,
    )
    reactor.addSystemEventTrigger("before", "shutdown", site.resource.stop)
    if opts.duration is not None:
        reactor.callLater(opts.duration, _stop_reactor, reactor)
    reactor.run()
    return 0


def _stop_reactor(reactor: Any) -> None:
    # A signal and --duration can both ask; the second must not raise ReactorNotRunning.
    if reactor.running:
        reactor.stop()


def _install_stop_signals(reactor: Any) -> None:
    """Make SIGINT and SIGTERM stop the reactor cleanly, from now on.

    Twisted's own handlers are installed only once ``reactor.run()`` starts, and its
    SIGINT handler only when SIGINT is at Python's default, which it is not for a
    process started with ``&`` from a script (inherited SIG_IGN).  A harness that
    starts us in the background and sends SIGINT, or signals us before the reactor
    runs, would otherwise see no effect or a KeyboardInterrupt traceback.
    """

    def handler(signum: int, frame: Any) -> None:
        # callFromThread is the signal-safe way in; queued calls run once the loop runs.
        reactor.callFromThread(_stop_reactor, reactor)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
