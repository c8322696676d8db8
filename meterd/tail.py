"""Follow Caddy's access log across its own rolling, from a checkpoint, losing no line.

Caddy (lumberjack) rolls by renaming `access.log` to `access-<time>-<reason>.log` in the
same directory and creating a new `access.log`. With `roll_uncompressed` the renamed
file keeps its inode, so a file is known by (device, inode) wherever it has moved:

- While following, when the path's inode changes, the old file is read to its end
  (Caddy may have written to it between our last read and the rename), then the next
  file in rolling order is opened: a rolled file newer than the old one if several
  rolls happened in between, else the new `access.log`.
- On start, the checkpoint's file is looked up by inode among `access.log` and the
  rolled files; its first bytes must still match the checkpoint's fingerprint (an inode
  can be reused after a file is deleted). Found: resume at the offset, then continue
  with the files rolled after it. Not found (rolled away by `roll_keep`): start at the
  oldest file still present; settlement is idempotent, so rereading costs only time.
- A file that shrinks below the offset was truncated: start it again from 0.

Only complete lines are returned: a partial last line waits for its newline. A line
longer than the limit keeps its head and is flagged (see `parse.py`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
from pathlib import Path
from typing import Final

import attrs

__all__ = ["Checkpoint", "FileId", "Follower", "Line", "start_of"]

_log: Final = logging.getLogger(__name__)

#: Bytes at the start of a file that identify it beyond its inode.
FINGERPRINT_BYTES: Final = 1024
_READ_BYTES: Final = 1024 * 1024


@attrs.frozen(kw_only=True)
class FileId:
    dev: int
    inode: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileId:
        return cls(dev=st.st_dev, inode=st.st_ino)


@attrs.frozen(kw_only=True)
class Checkpoint:
    """Where settlement stands: everything before `offset` in that file is settled."""

    file: FileId
    offset: int
    #: SHA-256 of the file's first `fingerprint_len` bytes.
    fingerprint: bytes
    fingerprint_len: int


@attrs.frozen(kw_only=True)
class Line:
    """One complete line; `checkpoint` is the position right after it."""

    data: bytes = attrs.field(repr=False)
    #: Offset of the line's first byte in its file.
    start: int
    checkpoint: Checkpoint
    #: The line exceeded the limit: `data` is its head only.
    truncated: bool = False


@attrs.frozen
class _Candidate:
    path: Path
    st: os.stat_result

    @property
    def file(self) -> FileId:
        return FileId.of(self.st)


def start_of(line: Line) -> Checkpoint:
    """The position before `line`, identified by inode only (no fingerprint yet)."""
    return Checkpoint(
        file=line.checkpoint.file,
        offset=line.start,
        fingerprint=hashlib.sha256(b"").digest(),
        fingerprint_len=0,
    )


def _head_digest(fd: int, length: int) -> bytes:
    return hashlib.sha256(os.pread(fd, length, 0)).digest()


class Follower:
    """Reads new lines of one access log and its rolled predecessors (blocking, no threads)."""

    def __init__(
        self,
        path: Path,
        *,
        start: Checkpoint | None,
        max_line_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.path: Final = path
        self._max_line = max_line_bytes
        self._fd: int | None = None
        self._file: FileId | None = None
        self._offset = 0  # after the last returned line
        self._read_at = 0  # where the next os.read starts
        self._buf = bytearray()
        # (start, head) of an over-long line whose rest is still being skipped.
        self._held: tuple[int, bytes] | None = None
        self._fingerprint: tuple[int, bytes] | None = None
        self._pending_start = start
        self._started = False

    # --- public ---------------------------------------------------------------------------

    @property
    def position(self) -> Checkpoint | None:
        """The position after the last returned line (None before any file was opened)."""
        if self._fd is None or self._file is None:
            return None
        return self._checkpoint(self._offset)

    def read(self, max_lines: int) -> list[Line]:
        """Up to `max_lines` complete lines available now; [] when caught up."""
        if not self._started:
            self._started = self._begin()
            if not self._started:
                return []
        lines: list[Line] = []
        while len(lines) < max_lines:
            line = self._next_line()
            if line is not None:
                lines.append(line)
                continue
            if not self._fill() and not self._advance():
                break
        return lines

    def lag_bytes(self) -> int:
        """Bytes written to the log that have not been returned yet (all files)."""
        if self._fd is None:
            return sum(c.st.st_size for c in self._all_candidates())
        st = os.fstat(self._fd)
        lag = max(st.st_size - self._offset, 0)
        live = self._live()
        if live is not None and live.file == self._file:
            return lag  # reading the live file: nothing was rolled after it
        rolled, live = self._snapshot()
        if live is not None and live.file != self._file:
            lag += live.st.st_size + sum(c.st.st_size for c in self._rolled_after(st, rolled))
        return lag

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # --- files ----------------------------------------------------------------------------

    def _rolled(self) -> list[_Candidate]:
        """Rolled files beside the log (`access-*.log` for `access.log`), oldest first.

        Their names carry the roll time (UTC, millisecond resolution), which orders them;
        modification times cannot, as many rolls can share one timestamp tick.
        """
        pattern = f"{self.path.stem}-*{self.path.suffix}"
        found: list[_Candidate] = []
        for entry in self.path.parent.glob(pattern):
            with contextlib.suppress(FileNotFoundError):
                st = entry.stat()
                if stat.S_ISREG(st.st_mode):
                    found.append(_Candidate(entry, st))
        return sorted(found, key=lambda c: c.path.name)

    def _live(self) -> _Candidate | None:
        try:
            return _Candidate(self.path, self.path.stat())
        except FileNotFoundError:
            return None

    def _snapshot(self) -> tuple[list[_Candidate], _Candidate | None]:
        """Rolled files and the live file, consistent with each other.

        A roll between listing the directory and looking at the live file would hide
        the file that was rolled in between; so the live file is looked at before and
        after the listing, and the listing repeated if it changed.
        """
        while True:
            before = self._live()
            rolled = self._rolled()
            after = self._live()
            if (before is None) == (after is None) and (
                before is None or after is None or before.file == after.file
            ):
                return rolled, after

    def _all_candidates(self) -> list[_Candidate]:
        rolled, live = self._snapshot()
        return rolled + ([live] if live is not None else [])

    def _begin(self) -> bool:
        start, self._pending_start = self._pending_start, None
        candidates = self._all_candidates()
        if start is not None:
            for candidate in candidates:
                if candidate.file == start.file and self._open(candidate, start):
                    return True
            _log.warning(
                "checkpointed log file (inode %d) is gone; rereading the %d files present",
                start.file.inode,
                len(candidates),
            )
        if not candidates:
            return False
        return self._open(candidates[0], None)

    def _open(self, candidate: _Candidate, start: Checkpoint | None) -> bool:
        try:
            fd = os.open(candidate.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        st = os.fstat(fd)
        if FileId.of(st) != candidate.file:
            os.close(fd)  # renamed and replaced under us; the caller looks again
            return False
        offset = 0
        if start is not None:
            if start.fingerprint_len > st.st_size or (
                _head_digest(fd, start.fingerprint_len) != start.fingerprint
            ):
                os.close(fd)
                return False
            offset = start.offset
            if offset > st.st_size:
                _log.warning("log file (inode %d) was truncated; reading it from 0", st.st_ino)
                offset = 0
        self.close()
        self._fd, self._file = fd, FileId.of(st)
        self._offset = self._read_at = offset
        self._buf.clear()
        self._held = None
        self._fingerprint = None
        _log.info("reading %s (inode %d) from offset %d", candidate.path, st.st_ino, offset)
        return True

    def _fill(self) -> bool:
        """Read more bytes of the current file; False at its end."""
        if self._fd is None:
            return False
        data = os.pread(self._fd, _READ_BYTES, self._read_at)
        if not data:
            return False
        self._read_at += len(data)
        self._buf += data
        return True

    def _advance(self) -> bool:
        """At the end of the current file: switch file if Caddy rolled it. True if switched."""
        assert self._fd is not None
        st = os.fstat(self._fd)
        if st.st_size < self._read_at:
            _log.warning("log file (inode %d) was truncated; reading it from 0", st.st_ino)
            self._offset = self._read_at = 0
            self._buf.clear()
            self._held = None
            self._fingerprint = None
            return True
        live = self._live()
        if live is not None and live.file == self._file:
            return False  # still the live file: wait for more
        # Rolled (or removed). Caddy may have written up to the rename: read to the end.
        if self._fill():
            return True
        following = self._following(st)
        if following is None:
            return False  # the new access.log does not exist yet
        if self._buf or self._held is not None:
            # A rolled file never grows again: its unterminated last line is all there is.
            self._buf += b"\n"
            return True
        self._open(following, None)
        return True

    def _rolled_after(self, st: os.stat_result, rolled: list[_Candidate]) -> list[_Candidate]:
        """Rolled files newer than the current one, oldest first."""
        names = [c.path.name for c in rolled if c.file == self._file]
        if names:
            return [c for c in rolled if c.path.name > names[0]]
        # The current file is not among them (still live, or deleted by roll_keep):
        # everything rolled since it was last written is newer.
        return [c for c in rolled if c.st.st_mtime_ns >= st.st_mtime_ns and c.file != self._file]

    def _following(self, st: os.stat_result) -> _Candidate | None:
        rolled, live = self._snapshot()
        after = self._rolled_after(st, rolled)
        if after:
            return after[0]
        return live if live is not None and live.file != self._file else None

    # --- lines ----------------------------------------------------------------------------

    def _checkpoint(self, offset: int) -> Checkpoint:
        assert self._fd is not None
        assert self._file is not None
        if self._fingerprint is None or self._fingerprint[0] < FINGERPRINT_BYTES:
            length = min(offset, FINGERPRINT_BYTES)
            if self._fingerprint is None or self._fingerprint[0] != length:
                self._fingerprint = (length, _head_digest(self._fd, length))
        length, digest = self._fingerprint
        return Checkpoint(
            file=self._file, offset=offset, fingerprint=digest, fingerprint_len=length
        )

    def _next_line(self) -> Line | None:
        end = self._buf.find(b"\n")
        if self._held is not None:
            # Inside an over-long line whose head is kept: drop bytes up to its newline.
            if end < 0:
                self._offset += len(self._buf)
                self._buf.clear()
                return None
            self._offset += end + 1
            del self._buf[: end + 1]
            (start, head), self._held = self._held, None
            return Line(
                data=head, start=start, checkpoint=self._checkpoint(self._offset), truncated=True
            )
        if end < 0:
            if len(self._buf) > self._max_line:
                self._held = (self._offset, bytes(self._buf[: self._max_line]))
                self._offset += len(self._buf)
                self._buf.clear()
            return None
        data = bytes(self._buf[:end])
        del self._buf[: end + 1]
        start = self._offset
        self._offset += end + 1
        truncated = len(data) > self._max_line
        if truncated:
            data = data[: self._max_line]
        return Line(
            data=data, start=start, checkpoint=self._checkpoint(self._offset), truncated=truncated
        )
