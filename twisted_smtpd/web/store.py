# -*- test-case-name: tests.test_web_api -*-
"""
The catcher's store: an sqlite3 index over the Maildir the server writes, or
over messages kept in memory (with a cap).

Every sqlite and disk operation runs in one dedicated worker thread, never on
the reactor: opening a 30 MB message or scanning a big Maildir at start-up
would otherwise stall every SMTP session.  One thread (not the reactor's
pool) serialises access to the connection, so no locking is needed, and
queries queue behind writes in arrival order.  The start-up scan goes in
batches, so the API answers while a large Maildir is still being indexed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from .._session import Envelope
from ._message import ParsedMessage, addresses, message_id_for, parse_message
from ._query import condition_for

__all__ = ["MessageStore", "MailboxRule", "RULES", "INDEX_NAME"]

_log = Logger()

#: A mailbox rule: the mailbox names one message belongs to.
MailboxRule = Callable[[Envelope], Iterable[str]]

#: the index file the catcher keeps in the Maildir (Maildir readers skip dot files)
INDEX_NAME = ".twisted_smtpd-catcher.sqlite"
#: files indexed per job at start-up
SCAN_BATCH = 200
_memory_names = itertools.count()


def by_recipient(envelope: Envelope) -> list[str]:
    """One mailbox per envelope recipient (Bcc included)."""
    return [address.lower() for address in envelope.rcpt_tos]


def by_domain(envelope: Envelope) -> list[str]:
    """One mailbox per recipient domain."""
    return sorted({a.rpartition("@")[2].lower() for a in envelope.rcpt_tos})


def by_auth_user(envelope: Envelope) -> list[str]:
    """One mailbox per AUTH identity; unauthenticated mail only in "all"."""
    user = _user_name(envelope.auth)
    return [user.lower()] if user else []


RULES: dict[str, MailboxRule] = {
    "recipient": by_recipient,
    "domain": by_domain,
    "auth": by_auth_user,
}


def _user_name(auth: Any) -> str:
    if auth is None:
        return ""
    if isinstance(auth, bytes):
        return auth.decode("utf-8", "replace")
    return str(auth)


def _iso(seconds: float) -> str:
    moment = datetime.fromtimestamp(seconds, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    path TEXT,
    raw BLOB,
    created REAL NOT NULL,
    size INTEGER NOT NULL,
    message_id TEXT NOT NULL,
    subject TEXT NOT NULL,
    from_json TEXT NOT NULL,
    to_json TEXT NOT NULL,
    cc_json TEXT NOT NULL,
    bcc_json TEXT NOT NULL,
    reply_to_json TEXT NOT NULL,
    envelope_from TEXT NOT NULL,
    envelope_to TEXT NOT NULL,
    username TEXT NOT NULL,
    attachments INTEGER NOT NULL,
    snippet TEXT NOT NULL,
    from_text TEXT NOT NULL,
    to_text TEXT NOT NULL,
    subject_text TEXT NOT NULL,
    message_id_text TEXT NOT NULL,
    search_text TEXT NOT NULL,
    read INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS messages_created ON messages (created);
-- counts (total, unread) scan this small index, not the wide rows
CREATE INDEX IF NOT EXISTS messages_read ON messages (read);
CREATE TABLE IF NOT EXISTS mailboxes (
    id TEXT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    mailbox TEXT NOT NULL,
    PRIMARY KEY (id, mailbox)
);
CREATE INDEX IF NOT EXISTS mailboxes_name ON mailboxes (mailbox);
"""

_SUMMARY_COLUMNS = (
    "id, created, size, message_id, subject, from_json, to_json, cc_json,"
    " bcc_json, reply_to_json, username, attachments, snippet, read"
)


def summary_from_row(row: sqlite3.Row) -> dict[str, Any]:
    """A Mailpit C{MessageSummary}."""
    return {
        "ID": row["id"],
        "MessageID": row["message_id"],
        "Read": bool(row["read"]),
        "From": json.loads(row["from_json"]),
        "To": json.loads(row["to_json"]),
        "Cc": json.loads(row["cc_json"]),
        "Bcc": json.loads(row["bcc_json"]),
        "ReplyTo": json.loads(row["reply_to_json"]),
        "Subject": row["subject"],
        "Created": _iso(row["created"]),
        "Username": row["username"],
        "Tags": [],
        "Size": row["size"],
        "Attachments": row["attachments"],
        "Snippet": row["snippet"],
    }


def _base_name(file_name: str) -> str:
    """A Maildir file name without its C{:2,FLAGS} info part."""
    return file_name.split(":", 1)[0]


class MessageStore:
    """Index, list, search, read and delete caught messages.

    Args:
        maildir: the Maildir to index (its C{new/} and C{cur/}); C{None}
            keeps messages in memory instead.
        index_path: where the sqlite index lives; default a dot file in the
            Maildir (so read flags and envelopes survive restarts), or memory.
        max_messages: memory store only: the oldest go beyond this many.
        mailbox_rule: which mailboxes (sidebar entries) a message belongs to.
        reactor: for the Deferreds; default the global reactor.
    """

    def __init__(
        self,
        maildir: Optional[str] = None,
        *,
        index_path: Optional[str] = None,
        max_messages: int = 1000,
        mailbox_rule: MailboxRule = by_recipient,
        reactor: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.maildir = os.path.abspath(maildir) if maildir else None
        if index_path is None:
            index_path = (
                os.path.join(self.maildir, INDEX_NAME) if self.maildir else ":memory:"
            )
        self.index_path = index_path
        self.max_messages = max_messages
        self.mailbox_rule = mailbox_rule
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="smtpd-web-store")
        self._db: Optional[sqlite3.Connection] = None
        self._listeners: list[Callable[[str, Any], None]] = []
        self.ready = False
        self._stopped = False
        self._shutdown_trigger: Any = None

    # -- life cycle --------------------------------------------------------------
    def start(self) -> Deferred[None]:
        """Open the index and index the Maildir; fires when the scan is done."""
        self._pool.start()
        # A pool left running would keep the process alive after the reactor.
        self._shutdown_trigger = self._reactor.addSystemEventTrigger(
            "during", "shutdown", self._on_shutdown
        )
        done = self._run(self._open_blocking)
        if self.maildir:
            done.addCallback(lambda names: self._scan(names))
        else:
            done.addCallback(lambda _: None)
        done.addCallbacks(self._started, self._failed_to_start)
        return done

    def _failed_to_start(self, failure: Any) -> Any:
        self._stopped = True
        self._stop_thread()
        return failure

    def _on_shutdown(self) -> None:
        self._shutdown_trigger = None  # fired: no longer removable
        self._stop_thread()

    def _stop_thread(self) -> None:
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        if self._pool.started:
            self._pool.stop()

    def _started(self, _: Any) -> None:
        self.ready = True

    def stop(self) -> Deferred[None]:
        """Close the index (after the work queued so far), then the thread.

        Calls after this fail at once: a message finishing during shutdown
        is in the Maildir and is indexed at the next start.
        """
        if self._stopped:
            self._stop_thread()
            return succeed(None)
        done = self._run(self._close_blocking)
        self._stopped = True

        def stop_thread(result: Any) -> Any:
            self._stop_thread()
            return result

        return done.addBoth(stop_thread)

    def _run(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self._stopped:
            return fail(RuntimeError("the catcher's store is stopped"))
        return deferToThreadPool(self._reactor, self._pool, fn, *args)

    def subscribe(self, listener: Callable[[str, Any], None]) -> None:
        """C{listener(event_type, data)} for "new", "delete", "update", "truncate"."""
        self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[str, Any], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _notify(self, event_type: str, data: Any) -> None:
        for listener in list(self._listeners):
            try:
                listener(event_type, data)
            except Exception:
                _log.failure("smtpd web: event listener failed")

    # -- blocking work (the store thread only) ------------------------------------
    @property
    def _conn(self) -> sqlite3.Connection:
        assert self._db is not None, "the store is not started"
        return self._db

    def _open_blocking(self) -> list[str]:
        if self.maildir:
            for sub in ("tmp", "new", "cur"):
                os.makedirs(os.path.join(self.maildir, sub), exist_ok=True)
        try:
            db = self._connect(self.index_path)
        except sqlite3.DatabaseError:
            # A damaged index is only a cache of the Maildir: start afresh.
            _log.warn(
                "smtpd web: rebuilding damaged index {path}", path=self.index_path
            )
            for suffix in ("", "-wal", "-shm"):
                try:
                    os.unlink(self.index_path + suffix)
                except OSError:
                    pass
            db = self._connect(self.index_path)
        self._db = db
        if not self.maildir:
            return []
        return self._reconcile_blocking()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._conn
        db.execute("BEGIN")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @staticmethod
    def _connect(path: str) -> sqlite3.Connection:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA foreign_keys = ON")
        if path != ":memory:":
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
        db.executescript(_SCHEMA)
        return db

    def _close_blocking(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _maildir_files(self) -> dict[str, str]:
        """Base name -> path relative to the Maildir, for new/ and cur/."""
        assert self.maildir
        found: dict[str, str] = {}
        for sub in ("new", "cur"):
            try:
                names = os.listdir(os.path.join(self.maildir, sub))
            except FileNotFoundError:
                continue
            for name in names:
                if not name.startswith("."):
                    found[_base_name(name)] = f"{sub}/{name}"
        return found

    def _reconcile_blocking(self) -> list[str]:
        """Forget index rows whose file is gone; return files not yet indexed."""
        files = self._maildir_files()
        known: dict[str, str] = {}
        db = self._conn
        for row in db.execute("SELECT id, path FROM messages"):
            known[row["id"]] = row["path"]
        paths_by_id = {message_id_for(base): path for base, path in files.items()}
        with self._transaction():
            for message_id, path in known.items():
                current = paths_by_id.get(message_id)
                if current is None:
                    db.execute("DELETE FROM messages WHERE id = ?", (message_id,))
                elif current != path:  # moved to cur/ by a mail reader
                    db.execute(
                        "UPDATE messages SET path = ? WHERE id = ?",
                        (current, message_id),
                    )
        return sorted(
            path for message_id, path in paths_by_id.items() if message_id not in known
        )

    def _scan(self, paths: list[str]) -> Deferred[None]:
        """Index C{paths} a batch per job, so queries get in between."""
        batch, rest = paths[:SCAN_BATCH], paths[SCAN_BATCH:]
        if not batch:
            return succeed(None)
        done = self._run(self._scan_blocking, batch)
        done.addCallback(lambda _: self._scan(rest))
        return done

    def _scan_blocking(self, paths: list[str]) -> None:
        assert self.maildir
        for path in paths:
            full = os.path.join(self.maildir, path)
            try:
                with open(full, "rb") as file:
                    raw = file.read()
                created = os.stat(full).st_mtime
            except OSError:
                continue  # removed meanwhile
            parsed = parse_message(raw)
            envelope = _envelope_from_headers(parsed)
            self._insert_blocking(
                message_id_for(_base_name(os.path.basename(path))),
                path,
                None,
                raw,
                parsed,
                envelope,
                created,
            )

    def _insert_blocking(
        self,
        message_id: str,
        path: Optional[str],
        blob: Optional[bytes],
        raw: bytes,
        parsed: ParsedMessage,
        envelope: Envelope,
        created: float,
    ) -> sqlite3.Row:
        mailboxes = sorted({m.lower() for m in self.mailbox_rule(envelope) if m})
        envelope_to = [r.lower() for r in envelope.rcpt_tos]
        from_list = [parsed.from_] if parsed.from_ else []
        from_text = " ".join(
            [f"{a['Name']} <{a['Address']}>" for a in from_list] + [envelope.mail_from]
        )
        to_text = " ".join(
            [
                f"{a['Name']} <{a['Address']}>"
                for a in parsed.to + parsed.cc + parsed.bcc
            ]
            + envelope_to
        )
        db = self._conn
        with self._transaction():
            db.execute(
                "INSERT OR REPLACE INTO messages (id, path, raw, created, size,"
                " message_id, subject, from_json, to_json, cc_json, bcc_json,"
                " reply_to_json, envelope_from, envelope_to, username, attachments,"
                " snippet, from_text, to_text, subject_text, message_id_text,"
                " search_text) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    message_id,
                    path,
                    blob,
                    created,
                    len(raw),
                    parsed.message_id,
                    parsed.subject,
                    json.dumps(parsed.from_ or {"Name": "", "Address": ""}),
                    json.dumps(parsed.to),
                    json.dumps(parsed.cc),
                    # Bcc: the header if any, else the envelope recipients
                    # that are in no To/Cc header (what a catcher shows as Bcc).
                    json.dumps(parsed.bcc or _hidden_recipients(parsed, envelope_to)),
                    json.dumps(parsed.reply_to),
                    envelope.mail_from,
                    json.dumps(envelope_to),
                    _user_name(envelope.auth),
                    len(parsed.attachments),
                    parsed.snippet,
                    from_text.lower(),
                    to_text.lower(),
                    parsed.subject.lower(),
                    parsed.message_id.lower(),
                    parsed.search_text()
                    + "\n"
                    + from_text.lower()
                    + "\n"
                    + to_text.lower(),
                ),
            )
            db.executemany(
                "INSERT OR IGNORE INTO mailboxes (id, mailbox) VALUES (?, ?)",
                [(message_id, mailbox) for mailbox in mailboxes],
            )
        row = db.execute(
            f"SELECT {_SUMMARY_COLUMNS} FROM messages WHERE id = ?", (message_id,)
        ).fetchone()
        return row

    def _add_blocking(
        self,
        name: Optional[str],
        raw: Optional[bytes],
        envelope: Envelope,
        created: float,
    ) -> tuple[dict[str, Any], list[str]]:
        pruned: list[str] = []
        if name is not None:
            assert self.maildir
            path = f"new/{name}"
            with open(os.path.join(self.maildir, path), "rb") as file:
                data = file.read()
            blob = None
        else:
            assert raw is not None
            path, data, blob = None, raw, raw
            name = f"memory-{time.time():.6f}-{next(_memory_names)}"
        parsed = parse_message(data)
        row = self._insert_blocking(
            message_id_for(_base_name(name)),
            path,
            blob,
            data,
            parsed,
            envelope,
            created,
        )
        if self.maildir is None and self.max_messages > 0:
            pruned = self._prune_blocking()
        return summary_from_row(row), pruned

    def _prune_blocking(self) -> list[str]:
        db = self._conn
        rows = db.execute(
            "SELECT id FROM messages ORDER BY created DESC, rowid DESC"
            " LIMIT -1 OFFSET ?",
            (self.max_messages,),
        ).fetchall()
        ids = [row["id"] for row in rows]
        if ids:
            with self._transaction():
                db.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in ids])
        return ids

    def _list_blocking(
        self, start: int, limit: int, query: str, mailbox: Optional[str]
    ) -> dict[str, Any]:
        db = self._conn
        scope, scope_params = "1", []
        if mailbox:
            scope = "id IN (SELECT id FROM mailboxes WHERE mailbox = ?)"
            scope_params = [mailbox.lower()]
        condition, params = condition_for(query)
        where = f"({scope}) AND ({condition})"
        total, unread = db.execute(
            f"SELECT COUNT(*), COALESCE(SUM(read = 0), 0) FROM messages WHERE {scope}",
            scope_params,
        ).fetchone()
        if condition == "1":
            matched, matched_unread = total, unread
        else:
            matched, matched_unread = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(read = 0), 0) FROM messages"
                f" WHERE {where}",
                scope_params + params,
            ).fetchone()
        rows = db.execute(
            f"SELECT {_SUMMARY_COLUMNS} FROM messages WHERE {where}"
            " ORDER BY created DESC, rowid DESC LIMIT ? OFFSET ?",
            scope_params + params + [limit, start],
        ).fetchall()
        messages = [summary_from_row(row) for row in rows]
        return {
            "total": total,
            "unread": unread,
            "count": len(messages),
            "messages_count": matched,
            "messages_unread": matched_unread,
            "start": start,
            "tags": [],
            "messages": messages,
        }

    def _row_blocking(self, message_id: str) -> Optional[sqlite3.Row]:
        db = self._conn
        if message_id == "latest":
            return db.execute(
                "SELECT * FROM messages ORDER BY created DESC, rowid DESC LIMIT 1"
            ).fetchone()
        return db.execute(
            "SELECT * FROM messages WHERE id = ?", (message_id,)
        ).fetchone()

    def _raw_of(self, row: sqlite3.Row) -> Optional[bytes]:
        if row["raw"] is not None:
            return bytes(row["raw"])
        assert self.maildir
        try:
            with open(os.path.join(self.maildir, row["path"]), "rb") as file:
                return file.read()
        except FileNotFoundError:
            # Moved to cur/ by a mail reader since we looked: find it again.
            files = self._maildir_files()
            path = files.get(_base_name(os.path.basename(row["path"])))
            if path is None:
                self._conn.execute("DELETE FROM messages WHERE id = ?", (row["id"],))
                return None
            self._conn.execute(
                "UPDATE messages SET path = ? WHERE id = ?", (path, row["id"])
            )
            with open(os.path.join(self.maildir, path), "rb") as file:
                return file.read()

    def _get_blocking(
        self, message_id: str, mark_read: bool
    ) -> Optional[tuple[dict[str, Any], bytes, sqlite3.Row, bool]]:
        row = self._row_blocking(message_id)
        if row is None:
            return None
        raw = self._raw_of(row)
        if raw is None:
            return None
        changed = False
        if mark_read and not row["read"]:
            self._conn.execute(
                "UPDATE messages SET read = 1 WHERE id = ?", (row["id"],)
            )
            changed = True
        summary = summary_from_row(row)
        if changed:
            summary["Read"] = True
        return summary, raw, row, changed

    def _delete_blocking(
        self, ids: Optional[list[str]], query: Optional[str]
    ) -> list[str]:
        db = self._conn
        if ids is None:
            condition, params = condition_for(query or "")
            rows = db.execute(
                f"SELECT id, path FROM messages WHERE {condition}", params
            ).fetchall()
        else:
            marks = ",".join("?" * len(ids))
            rows = db.execute(
                f"SELECT id, path FROM messages WHERE id IN ({marks})", ids
            ).fetchall()
        deleted = []
        for row in rows:
            if row["path"] is not None and self.maildir:
                self._unlink_blocking(row["path"])
            db.execute("DELETE FROM messages WHERE id = ?", (row["id"],))
            deleted.append(row["id"])
        return deleted

    def _unlink_blocking(self, path: str) -> None:
        assert self.maildir
        try:
            os.unlink(os.path.join(self.maildir, path))
        except FileNotFoundError:
            moved = self._maildir_files().get(_base_name(os.path.basename(path)))
            if moved is not None:
                os.unlink(os.path.join(self.maildir, moved))

    def _set_read_blocking(self, ids: Optional[list[str]], read: bool) -> list[str]:
        db = self._conn
        if ids is None:
            rows = db.execute("SELECT id FROM messages WHERE read != ?", (int(read),))
            ids = [row["id"] for row in rows]
        with self._transaction():
            db.executemany(
                "UPDATE messages SET read = ? WHERE id = ?",
                [(int(read), message_id) for message_id in ids],
            )
        return ids

    def _mailboxes_blocking(self) -> list[dict[str, Any]]:
        rows = self._conn.execute(
            "SELECT mailbox, COUNT(*) AS total,"
            " COALESCE(SUM(messages.read = 0), 0) AS unread"
            " FROM mailboxes JOIN messages USING (id)"
            " GROUP BY mailbox ORDER BY mailbox"
        ).fetchall()
        return [
            {"Name": row["mailbox"], "Total": row["total"], "Unread": row["unread"]}
            for row in rows
        ]

    def _stats_blocking(self) -> dict[str, int]:
        total, unread = self._conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(read = 0), 0) FROM messages"
        ).fetchone()
        return {"Total": total, "Unread": unread}

    # -- the API (reactor thread) -------------------------------------------------
    def add_maildir_file(
        self, name: str, envelope: Envelope
    ) -> Deferred[dict[str, Any]]:
        """Index C{new/NAME}, just delivered by the Maildir handler."""
        return self._added(
            self._run(self._add_blocking, name, None, envelope, time.time())
        )

    def add_raw(self, raw: bytes, envelope: Envelope) -> Deferred[dict[str, Any]]:
        """Keep C{raw} in the store (memory mode, or mail not in the Maildir)."""
        return self._added(
            self._run(self._add_blocking, None, raw, envelope, time.time())
        )

    def _added(self, done: Deferred[Any]) -> Deferred[dict[str, Any]]:
        def notify(result: tuple[dict[str, Any], list[str]]) -> dict[str, Any]:
            summary, pruned = result
            if pruned:
                self._notify("prune", {"IDs": pruned})
            self._notify("new", summary)
            return summary

        return done.addCallback(notify)

    def list_messages(
        self,
        start: int = 0,
        limit: int = 50,
        query: str = "",
        mailbox: Optional[str] = None,
    ) -> Deferred[dict[str, Any]]:
        """A Mailpit C{MessagesSummary}, newest first."""
        return self._run(self._list_blocking, start, limit, query, mailbox)

    def get(
        self, message_id: str, mark_read: bool = False
    ) -> Deferred[Optional[tuple[dict[str, Any], bytes]]]:
        """(summary, raw bytes) of one message (C{"latest"} works), or None."""

        def done(result: Any) -> Any:
            if result is None:
                return None
            summary, raw, _row, changed = result
            if changed:
                self._notify("update", {"ID": summary["ID"], "Read": True})
            return summary, raw

        return self._run(self._get_blocking, message_id, mark_read).addCallback(done)

    def envelope_of(self, message_id: str) -> Deferred[Optional[dict[str, Any]]]:
        """The stored envelope sender and recipients of one message."""

        def blocking() -> Optional[dict[str, Any]]:
            row = self._row_blocking(message_id)
            if row is None:
                return None
            return {
                "From": row["envelope_from"],
                "To": json.loads(row["envelope_to"]),
            }

        return self._run(blocking)

    def delete(
        self, ids: Optional[list[str]] = None, query: Optional[str] = None
    ) -> Deferred[list[str]]:
        """Delete C{ids}, or every message matching C{query} (all if empty)."""

        def done(deleted: list[str]) -> list[str]:
            if ids is None and not query:
                self._notify("truncate", {})
            elif deleted:
                self._notify("delete", {"IDs": deleted})
            return deleted

        return self._run(self._delete_blocking, ids, query).addCallback(done)

    def set_read(self, ids: Optional[list[str]], read: bool) -> Deferred[list[str]]:
        def done(changed: list[str]) -> list[str]:
            for message_id in changed:
                self._notify("update", {"ID": message_id, "Read": read})
            return changed

        return self._run(self._set_read_blocking, ids, read).addCallback(done)

    def mailboxes(self) -> Deferred[list[dict[str, Any]]]:
        """The sidebar: every mailbox with its total and unread counts."""
        return self._run(self._mailboxes_blocking)

    def stats(self) -> Deferred[dict[str, int]]:
        return self._run(self._stats_blocking)


def _hidden_recipients(
    parsed: ParsedMessage, envelope_to: list[str]
) -> list[dict[str, str]]:
    shown = {a["Address"].lower() for a in parsed.to + parsed.cc}
    return [{"Name": "", "Address": r} for r in envelope_to if r not in shown]


def _envelope_from_headers(parsed: ParsedMessage) -> Envelope:
    """For mail found in the Maildir without an envelope: what the headers say."""
    recipients = [
        a["Address"] for a in parsed.to + parsed.cc + parsed.bcc if a["Address"]
    ]
    delivered = parsed.headers.get("Delivered-To") or parsed.headers.get(
        "X-Original-To"
    )
    if delivered:
        recipients = [a["Address"] for a in addresses(delivered) if a["Address"]]
    return Envelope(
        session_id="",
        peer=None,
        helo="",
        esmtp=True,
        tls=None,
        auth=None,
        mail_from=parsed.return_path,
        rcpt_tos=recipients,
    )
