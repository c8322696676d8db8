"""tail.py: every line of Caddy's rolling log exactly once, across rolls and restarts."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from meterd.tail import Checkpoint, Follower, Line
from tests.meterd.rolling import RollingWriter


def _drain(follower: Follower, *, rounds: int = 3) -> list[Line]:
    """Everything readable now (several empty reads in a row mean caught up)."""
    lines: list[Line] = []
    empty = 0
    while empty < rounds:
        got = follower.read(1000)
        empty = 0 if got else empty + 1
        lines += got
    return lines


def _texts(lines: list[Line]) -> list[bytes]:
    return [line.data for line in lines]


def test_follows_appends_and_waits_for_whole_lines(tmp_path: Path) -> None:
    """Lines are returned once complete; a partial line waits for its newline."""
    log = RollingWriter(tmp_path / "access.log")
    follower = Follower(log.path, start=None)
    log.line(b"one")
    log.write(b"tw")
    assert _texts(_drain(follower)) == [b"one"]
    log.write(b"o\n")
    assert _texts(_drain(follower)) == [b"two"]
    log.close()


def test_waits_for_the_log_to_appear(tmp_path: Path) -> None:
    """Before Caddy created the log there is nothing to read, and no error."""
    follower = Follower(tmp_path / "access.log", start=None)
    assert follower.read(10) == []
    log = RollingWriter(tmp_path / "access.log")
    log.line(b"first")
    assert _texts(_drain(follower)) == [b"first"]
    log.close()


def test_roll_in_the_middle_of_a_burst_loses_nothing(tmp_path: Path) -> None:
    """A writer rolling every 37 lines while the reader reads: all 2000 lines, in order."""
    log = RollingWriter(tmp_path / "access.log")
    follower = Follower(log.path, start=None)
    total = 2000
    got: list[bytes] = []

    def write() -> None:
        for n in range(total):
            log.line(b"line %d" % n)
            if n % 37 == 36:
                log.roll()

    writer = threading.Thread(target=write)
    writer.start()
    while writer.is_alive() or len(got) < total:
        got += _texts(follower.read(50))
        if not writer.is_alive() and len(got) < total:
            got += _texts(_drain(follower))
            break
    writer.join()
    assert got == [b"line %d" % n for n in range(total)]
    assert len(log.rolled) == total // 37
    log.close()


def test_restart_after_rolls_while_stopped(tmp_path: Path) -> None:
    """Stopped mid-file, three rolls later it resumes in the rolled file, then the rest."""
    log = RollingWriter(tmp_path / "access.log")
    for n in range(10):
        log.line(b"a%d" % n)
    first = Follower(log.path, start=None)
    lines = first.read(4)
    checkpoint = lines[-1].checkpoint
    first.close()
    for n in range(10, 40):
        if n % 10 == 0:
            log.roll()
        log.line(b"a%d" % n)
    resumed = Follower(log.path, start=checkpoint)
    assert _texts(_drain(resumed)) == [b"a%d" % n for n in range(4, 40)]
    log.close()


def test_restart_at_the_end_of_a_rolled_file(tmp_path: Path) -> None:
    """A checkpoint at the very end of a file that was rolled continues with the next file."""
    log = RollingWriter(tmp_path / "access.log")
    log.line(b"x1")
    follower = Follower(log.path, start=None)
    checkpoint = _drain(follower)[-1].checkpoint
    follower.close()
    log.roll()
    log.line(b"x2")
    assert _texts(_drain(Follower(log.path, start=checkpoint))) == [b"x2"]
    log.close()


def test_checkpointed_file_gone_rereads_what_is_left(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """When roll_keep deleted the checkpoint's file, every remaining file is read again."""
    log = RollingWriter(tmp_path / "access.log")
    log.line(b"old")
    follower = Follower(log.path, start=None)
    checkpoint = _drain(follower)[-1].checkpoint
    follower.close()
    gone = log.roll()
    log.line(b"mid")
    log.roll()
    log.line(b"new")
    gone.unlink()
    assert _texts(_drain(Follower(log.path, start=checkpoint))) == [b"mid", b"new"]
    assert "is gone" in caplog.text
    log.close()


def test_reused_inode_is_not_mistaken_for_the_checkpoint(tmp_path: Path) -> None:
    """Same inode but different first bytes: the checkpoint's file is gone, read from 0."""
    log = RollingWriter(tmp_path / "access.log")
    log.line(b"original first line")
    st = os.stat(log.path)
    forged = Checkpoint(
        file=Follower(log.path, start=None).read(1)[0].checkpoint.file,
        offset=st.st_size,
        fingerprint=b"\x00" * 32,
        fingerprint_len=10,
    )
    assert _texts(_drain(Follower(log.path, start=forged))) == [b"original first line"]
    log.close()


def test_truncated_file_is_read_again_from_the_start(tmp_path: Path) -> None:
    """A log truncated in place (copytruncate) is read again from offset 0."""
    path = tmp_path / "access.log"
    path.write_bytes(b"one\ntwo\n")
    follower = Follower(path, start=None)
    assert _texts(_drain(follower)) == [b"one", b"two"]
    with path.open("r+b") as handle:
        handle.truncate(0)
    with path.open("ab") as handle:
        handle.write(b"three\n")
    assert _texts(_drain(follower)) == [b"three"]


def test_overlong_line_keeps_its_head_and_the_next_line(tmp_path: Path) -> None:
    """A line over the limit comes back cut and flagged; the following line is intact."""
    log = RollingWriter(tmp_path / "access.log")
    follower = Follower(log.path, start=None, max_line_bytes=4096)
    log.write(b"H" * 10_000)
    assert follower.read(10) == []
    log.write(b"T" * 10_000 + b"\nnext\n")
    lines = _drain(follower)
    assert [(len(line.data), line.truncated) for line in lines] == [(4096, True), (4, False)]
    assert lines[0].start == 0
    assert lines[1].checkpoint.offset == 20_006
    log.close()


def test_unterminated_last_line_of_a_rolled_file_is_read(tmp_path: Path) -> None:
    """A rolled file never grows again, so its last line counts even without a newline."""
    log = RollingWriter(tmp_path / "access.log")
    follower = Follower(log.path, start=None)
    log.write(b"whole\ncut")
    assert _texts(_drain(follower)) == [b"whole"]
    log.roll()
    log.line(b"after")
    assert _texts(_drain(follower)) == [b"cut", b"after"]
    log.close()


def test_lag_counts_unread_bytes_in_every_file(tmp_path: Path) -> None:
    """Lag is the bytes not yet returned, including rolled files still to read."""
    log = RollingWriter(tmp_path / "access.log")
    log.line(b"12345")
    follower = Follower(log.path, start=None)
    follower.read(1)
    log.line(b"abc")
    log.roll()
    log.line(b"xy")
    assert follower.lag_bytes() == 4 + 3
    _drain(follower)
    assert follower.lag_bytes() == 0
    log.close()
