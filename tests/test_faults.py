"""Real faults under a real twistd: a full disk and exhausted inodes.

The Maildir lives on a small tmpfs mounted for the test (root only: mounting
needs CAP_SYS_ADMIN, so without it these tests skip and say so, in CI too;
a missing C{mount} program fails under CI=true like any missing program).
"""

from __future__ import annotations

import errno
import os
import shutil
import smtplib
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .helpers import free_port, require_program, start_twistd, wait_for_port


def mount_tmpfs(where: Path, size: str, inodes: int) -> None:
    require_program("mount")
    where.mkdir()
    done = subprocess.run(
        [
            "mount",
            "-t",
            "tmpfs",
            "-o",
            f"size={size},nr_inodes={inodes},mode=0755",
            "tmpfs",
            str(where),
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        # A missing privilege, not a missing program: skip even under CI.
        pytest.skip(
            "mounting a tmpfs needs CAP_SYS_ADMIN (root outside a restricted"
            f" container): {done.stderr.strip() or done.returncode}"
        )


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Any]:
    """C{small_disk(size, inodes)}: a fresh tmpfs; unmounted afterwards."""
    mounted: list[Path] = []

    def mount(size: str = "1m", inodes: int = 1000) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        mount_tmpfs(where, size, inodes)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill_space(disk: Path) -> Path:
    """Write a file until the disk refuses; the file, to remove later."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as file:
        block = b"\0" * 4096
        try:
            while True:
                file.write(block)
        except OSError as error:
            assert errno.ENOSPC == error.errno
    return filler


def fill_inodes(disk: Path) -> list[Path]:
    """Create empty files until no inode is left; the files."""
    made = []
    try:
        while True:
            path = disk / f"inode{len(made)}"
            path.touch()
            made.append(path)
    except OSError as error:
        assert errno.ENOSPC == error.errno
    return made


class Server:
    """A twistd smtpd delivering into C{maildir}; its output collected."""

    def __init__(self, cwd: Path, maildir: Path, *args: str) -> None:
        self.port = free_port()
        self.maildir = maildir
        self.proc = start_twistd(
            cwd,
            "--port",
            f"tcp:{self.port}:interface=127.0.0.1",
            "--maildir",
            str(maildir),
            "--quiet",
            *args,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(
            target=lambda: self.lines.extend(self.proc.stdout), daemon=True
        )
        self._reader.start()
        wait_for_port(self.port, self.proc)

    def send(self, count: int, body: bytes) -> list[tuple[int, bytes]]:
        """C{count} messages in one session: the reply to each DATA."""
        replies = []
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as smtp:
            smtp.ehlo("client.example")
            for n in range(count):
                smtp.mail("a@b.example")
                smtp.rcpt("c@d.example")
                replies.append(smtp.data(b"X-N: %d\r\n\r\n" % n + body))
        return replies

    def stop(self) -> str:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self._reader.join(10)
        self.proc.stdout.close()
        return "".join(self.lines)

    def files(self, sub: str) -> list[str]:
        return sorted(os.listdir(self.maildir / sub))


INSUFFICIENT_STORAGE = (452, b"4.3.1 Insufficient system storage")


def test_a_full_disk_leaves_nothing_behind(tmp_path: Path, small_disk: Any) -> None:
    """40 refusals on a full tmpfs: all 452, tmp/ empty, a few log lines.

    Before: each refusal left an empty file in tmp/ (they used up the
    inodes, so mail was refused after space came back) and logged a
    16-line traceback each.
    """
    disk = small_disk("512k", 200)
    server = Server(tmp_path, disk / "Maildir")
    try:
        filler = fill_space(disk)
        refused = server.send(40, b"small message\r\n" * 20)
        tmp_after_refusals = server.files("tmp")
        filler.unlink()
        accepted = server.send(3, b"room again\r\n")
        new = server.files("new")
    finally:
        output = server.stop()
    assert [] == tmp_after_refusals
    assert [250] * 3 == [code for code, _ in accepted]
    assert 3 == len(new)
    assert [INSUFFICIENT_STORAGE] * 40 == refused
    refusal_lines = [
        line for line in output.splitlines() if "refused a message" in line
    ]
    assert 1 <= len(refusal_lines) < 40, output
    assert "ENOSPC (No space left on device)" in refusal_lines[0]
    assert "Traceback" not in output


def test_exhausted_inodes(tmp_path: Path, small_disk: Any) -> None:
    """No inode for tmp/: 452; one inode freed, the next message is stored."""
    disk = small_disk("4m", 64)
    server = Server(tmp_path, disk / "Maildir")
    try:
        made = fill_inodes(disk)
        refused = server.send(10, b"x\r\n")
        made.pop().unlink()
        accepted = server.send(1, b"y\r\n")
        listing = (server.files("tmp"), server.files("new"))
    finally:
        output = server.stop()
    assert [INSUFFICIENT_STORAGE] * 10 == refused
    assert 250 == accepted[0][0]
    assert [] == listing[0] and 1 == len(listing[1])
    assert "Traceback" not in output


def test_a_deleted_maildir_comes_back(tmp_path: Path) -> None:
    """rm -rf of the Maildir under a running server: the next message is 250."""
    maildir = tmp_path / "Maildir"
    server = Server(tmp_path, maildir)
    try:
        first = server.send(1, b"one\r\n")
        shutil.rmtree(maildir)
        second = server.send(1, b"two\r\n")
        new = server.files("new")
    finally:
        output = server.stop()
    assert [250, 250] == [first[0][0], second[0][0]]
    assert 1 == len(new)
    assert "created again" in output
