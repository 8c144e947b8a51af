"""Files the client commands write: checked before any work starts, then written whole or not at all.

    video = PendingFile(Path("out/mona.mp4"), flag="--out")  # ValueError: a directory, nowhere to write
    with video:
        write(video.partial)  # .mona.mp4.partial-<pid>.mp4 beside it (same extension: same format)
        video.commit()        # renamed onto out/mona.mp4; leaving the block without it removes it

The parent directories are made on the spot. Until the commit nothing is at the target: an error,
Ctrl-C or a lost server leaves a file that was there before as it was, and no shorter copy of it.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType


def reason(error: OSError) -> str:
    """Why a file could not be used, without the errno and path: "no such file", or the OS's words."""
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, IsADirectoryError):
        return "is a directory"
    return error.strerror or str(error)


class PendingFile:
    """`path`, to be written through `partial` and renamed onto it by `commit`; `flag` names it in
    errors. The constructor makes the parent and creates the (empty) partial file, so a path that
    cannot be written is a ValueError before anything is computed."""

    def __init__(self, path: Path, *, flag: str) -> None:
        self.path, self.flag = Path(path), flag
        if self.path.is_dir():
            raise ValueError(f"{flag} {self.path}: is a directory")
        existing = self.path.parent
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise ValueError(f"{flag} {self.path}: {existing} is not a directory")
        name = self.path.name
        self.partial = self.path.with_name(f".{name}.partial-{os.getpid()}{self.path.suffix}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.partial.open("wb").close()
        except OSError as error:
            raise ValueError(f"{flag} {self.path}: cannot write there ({error.strerror or error})") from error
        self.committed = False

    def _failed(self, error: OSError) -> ValueError:
        return ValueError(f"{self.flag} {self.path}: cannot write it ({error.strerror or error})")

    def commit(self) -> None:
        """Rename the written partial file onto the target."""
        try:
            os.replace(self.partial, self.path)
        except OSError as error:
            raise self._failed(error) from error
        self.committed = True

    def write_bytes(self, data: bytes) -> None:
        """Write `data` to the partial file, then commit."""
        try:
            self.partial.write_bytes(data)
        except OSError as error:
            raise self._failed(error) from error
        self.commit()

    def discard(self) -> None:
        """Remove the partial file (nothing happens after a commit)."""
        if not self.committed:
            self.partial.unlink(missing_ok=True)

    def __enter__(self) -> PendingFile:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.discard()
