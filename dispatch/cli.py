"""The ``dispatch`` command: serve, token create, db upgrade, demo."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

from dispatch import config as cfgmod
from dispatch import logs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dispatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run listeners, API and timers in one process")
    cfgmod.add_arguments(serve)
    token = sub.add_parser("token", help="manage API tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser("create", help="print a new bearer token")
    cfgmod.add_arguments(create)
    create.add_argument(
        "--role", required=True, choices=("admin", "operator", "district", "community")
    )
    create.add_argument("--name", default=None)
    create.add_argument(
        "--district-scope",
        dest="district_scope",
        default=None,
        help="limit a district token to one district",
    )
    db = sub.add_parser("db", help="schema management")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_sub.add_parser("upgrade", help="migrate the schema to the newest revision")
    cfgmod.add_arguments(upgrade)
    demo = sub.add_parser("demo", help="seed demo data and serve with simulated terminals")
    cfgmod.add_arguments(demo)
    return parser


def _token_create(config: cfgmod.Config, args: argparse.Namespace) -> int:
    from dispatch.store import db as dbmod
    from dispatch.store import tokens

    dbmod.upgrade(config.db)
    engine = dbmod.make_engine(config.db, immediate=True)
    from sqlalchemy.orm import Session

    with Session(engine) as session, session.begin():
        token = tokens.create_token(
            session, args.role, args.name, args.district_scope, datetime.now(UTC)
        )
    engine.dispose()
    print(token)
    return 0


def _serve(config: cfgmod.Config, after_start: Any = None) -> int:
    from twisted.internet import defer, reactor

    from dispatch.app import DispatchApp
    from dispatch.gc_policy import FreezePolicy, GcPauseObserver

    app = DispatchApp(config, reactor)
    # Process-wide (gc is global), so it lives here and not in DispatchApp, which tests
    # start many times in one process.
    GcPauseObserver().install()
    gc_policy = FreezePolicy(reactor, lambda: app.live.online_count)
    status = {"code": 0}
    log = logs.get("dispatch.cli")

    async def start() -> None:
        try:
            await app.start()
        except Exception as exc:
            log.error("startup_failed", error=str(exc))
            status["code"] = 1
            reactor.stop()
            return
        reactor.addSystemEventTrigger(
            "before", "shutdown", lambda: defer.ensureDeferred(app.stop())
        )
        gc_policy.start()
        reactor.addSystemEventTrigger("before", "shutdown", gc_policy.stop)
        if after_start is not None:
            await after_start(app)

    reactor.callWhenRunning(lambda: defer.ensureDeferred(start()))
    reactor.run()
    return status["code"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = _parser().parse_args(argv)
    try:
        config = cfgmod.load(args)
    except cfgmod.ConfigError as exc:
        print(f"dispatch: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log_level, config.log_format)
    if args.command == "token":
        return _token_create(config, args)
    if args.command == "db":
        from dispatch.store import db as dbmod

        dbmod.upgrade(config.db)
        return 0
    if args.command == "demo":
        from dispatch.demo import run_demo

        return _serve(config, run_demo)
    return _serve(config)


if __name__ == "__main__":
    sys.exit(main())
