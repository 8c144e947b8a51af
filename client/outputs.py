"""Files the client commands write: checked before any work starts, then written whole or not at all.

    video = PendingFile(Path("out/mona.mp4"), flag="--out")  # ValueError: a directory, nowhere to write
    with video:
        write(video.partial)  # .mona.mp4.partial-<host>-<pid>.mp4 beside it (same extension: same format)
        video.commit()        # renamed onto out/mona.mp4; leaving the block without it removes it

The parent directories are made on the spot, and removed again (those this made, when empty) when
the file is not committed. Until the commit nothing is at the target: an error, Ctrl-C, SIGTERM
(inside `terminate_raises`) or a lost server leaves a file that was there before as it was, and no
shorter copy of it. With overwrite=False a file that is there is never replaced: the constructor
refuses it, and one that appears meanwhile makes the commit fail.

Only SIGKILL (or a crash, or a power cut) leaves a partial file behind: the next PendingFile for the
same path removes those of this host whose process is gone (facekit/partial.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType, TracebackType

from facekit.partial import partial_path, remove_abandoned


def reason(error: OSError) -> str:
    """Why a file could not be used, without the errno and path: "no such file", or the OS's words."""
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, IsADirectoryError):
        return "is a directory"
    return error.strerror or str(error)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread (inside `terminate_raises`) so that cleanup runs as for
    Ctrl-C; a command reports it with exit status 143 (128 + SIGTERM)."""

    what = "terminated"
    exit_status = 143


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
    """Within the block SIGTERM raises Terminated in the main thread (from any other thread: no
    change), so that `finally` blocks and context managers (PendingFile) clean up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum: int, frame: FrameType | None) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class PendingFile:
    """`path`, to be written through `partial` and renamed onto it by `commit`; `flag` names it in
    errors. The constructor makes the parent and creates the (empty) partial file, so a path that
    cannot be written is a ValueError before anything is computed; with overwrite=False so is a
    path where a file (or anything else) already is."""

    def __init__(self, path: Path, *, flag: str, overwrite: bool = True) -> None:
        self.path, self.flag, self.overwrite = Path(path), flag, overwrite
        self.committed = False
        self.created: list[Path] = []  # the parent directories this made, innermost first
        if self.path.is_dir():
            raise ValueError(f"{flag} {self.path}: is a directory")
        if not overwrite and (os.path.lexists(self.path) or os.path.lexists(self.path.resolve())):
            raise ValueError(f"{flag} {self.path}: exists; pass --overwrite to replace it")
        existing = self.path.parent
        missing = []
        while not existing.exists() and existing != existing.parent:
            missing.append(existing)
            existing = existing.parent
        if not existing.is_dir():
            raise ValueError(f"{flag} {self.path}: {existing} is not a directory")
        self.partial = partial_path(self.path)
        try:
            for folder in reversed(missing):
                folder.mkdir(exist_ok=True)
                self.created.insert(0, folder)
            self.partial.open("wb").close()
            remove_abandoned(self.path)
        except OSError as error:
            self._remove_created()
            raise ValueError(f"{flag} {self.path}: cannot write there ({error.strerror or error})") from error

    def _failed(self, error: OSError) -> ValueError:
        return ValueError(f"{self.flag} {self.path}: cannot write it ({error.strerror or error})")

    def commit(self) -> None:
        """Rename the written partial file onto the target (overwrite=False: ValueError, and the
        partial file kept for discard, when something is there by now)."""
        try:
            if self.overwrite:
                os.replace(self.partial, self.path)
            else:
                self._commit_new()
        except FileExistsError as error:
            raise ValueError(
                f"{self.flag} {self.path}: appeared while this was being written; not replaced "
                "(pass --overwrite to replace it)"
            ) from error
        except OSError as error:
            raise self._failed(error) from error
        self.committed = True

    def _commit_new(self) -> None:
        """Put the partial file at the path only when nothing is there (a hard link fails on an
        existing name, atomically; a file system without links: checked, then renamed)."""
        try:
            os.link(self.partial, self.path)
        except FileExistsError:
            raise
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            if os.path.lexists(self.path):
                raise FileExistsError(errno.EEXIST, "exists", str(self.path)) from error
            os.replace(self.partial, self.path)
            return
        self.partial.unlink(missing_ok=True)

    def write_bytes(self, data: bytes) -> None:
        """Write `data` to the partial file, then commit."""
        try:
            self.partial.write_bytes(data)
        except OSError as error:
            raise self._failed(error) from error
        self.commit()

    def _remove_created(self) -> None:
        for folder in self.created:  # innermost first; one holding anything else stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        self.created = []

    def discard(self) -> None:
        """Remove the partial file and the directories made for it (nothing happens after a commit)."""
        if not self.committed:
            self.partial.unlink(missing_ok=True)
            self._remove_created()

    def __enter__(self) -> PendingFile:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.discard()
