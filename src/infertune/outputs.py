"""Where infertune writes, and when it refuses: the one output policy every writer goes through.

A **file** output (``-o``, ``--trace``, ``--save-optimized``, a quantized model and its recipe):

- is never an input of the same command: paths are compared resolved (symlinks followed) and
  by inode (a hard link to an input is that input), and never lies inside an input directory
  (it would become part of the data); two outputs of one command are never the same file;
- is never an existing directory;
- is written to a temporary sibling and renamed over the target (``_io.atomic_path``), with the
  permissions the user's umask gives a new file.

A **directory** output (tune's artifact and run directory, a Triton model directory) is created
new, or is an empty directory, or is one infertune wrote before, recognised by its manifest
(``Owned``): an artifact or an export is replaced only with ``force`` and only when it holds
nothing but what infertune wrote; a run directory is resumed (that is its purpose). Refused
always: a non-empty directory infertune did not write, the filesystem root, the home directory,
the working directory or any of its parents, an input or a directory holding one. Replacing
deletes only the names the old manifest lists.

Every output's location is probed up front (a temporary entry is created and removed in the
nearest existing directory), so a read-only directory, /proc or a path under a regular file is
one line before any work, not a traceback after it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from infertune._io import default_mode
from infertune.errors import InfertuneWarning, OutputError


@dataclass(frozen=True)
class Owned:
    """How to recognise a directory infertune wrote before.

    ``owned(dir)`` returns the relative names infertune wrote there (files and directories), or
    None when the directory is not one of ``what``. ``replace``: such a directory is replaced
    (with ``force``); otherwise it is reused as it is (a run directory is resumed).
    """

    what: str
    owned: Callable[[Path], set[str] | None]
    replace: bool = True


def _input_paths(inputs: Iterable[object]) -> list[Path]:
    out = []
    for item in inputs:
        if item is None or str(item) in ("", "synthetic"):
            continue
        p = Path(item)  # type: ignore[arg-type]
        if p.exists():
            out.append(p)
    return out


def _same(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _within(inner: Path, outer: Path) -> bool:
    """``inner`` is ``outer`` or lies below it (both resolved)."""
    inner, outer = inner.resolve(), outer.resolve()
    return inner == outer or outer in inner.parents


@dataclass
class Guard:
    """The output policy for one command: its inputs, and the outputs it has claimed so far."""

    inputs: list[Path] = field(default_factory=list)
    claimed: list[tuple[str, Path]] = field(default_factory=list)

    @classmethod
    def of(cls, *inputs: object) -> Guard:
        """A guard for a command reading ``inputs`` (paths; None / 'synthetic' / missing ones skipped)."""
        return cls(_input_paths(inputs))

    def file(self, path: str | os.PathLike[str] | None, what: str = "-o") -> Path | None:
        """Check that ``path`` may be written as a file by this command; None passes through."""
        if path is None:
            return None
        p = _literal(path, what)
        if p.is_dir():
            raise OutputError(f"{what} {p} is a directory; give a file name")
        for inp in self.inputs:
            if _same(p, inp):
                raise OutputError(f"{what} {p} is an input of this command ({inp}): infertune never writes "
                                  "over its input; give another file name")
            if inp.is_dir() and _within(p, inp):
                raise OutputError(f"{what} {p} lies inside the input directory {inp}: it would become part "
                                  "of the data; write it elsewhere")
        self._claim(p, what)
        probe(p.parent, what, p)
        return p

    def directory(self, path: str | os.PathLike[str], owned: Owned, *, force: bool = False,
                  what: str = "-o") -> Path:
        """Check that ``path`` may be written as a directory (see the module docstring)."""
        p = _literal(path, what)
        refuse_protected(p, what, self.inputs)
        self._claim(p, what)
        check_existing_dir(p, owned, force=force, what=what)
        probe(p.parent, what, p)  # the new directory is made beside it, then renamed
        return p

    def _claim(self, p: Path, what: str) -> None:
        for other_what, other in self.claimed:
            if _same(p, other) or _within(p, other) or _within(other, p):
                raise OutputError(f"{what} {p} and {other_what} {other} overlap: give each output its own place")
        self.claimed.append((what, p))


def _literal(path: str | os.PathLike[str], what: str) -> Path:
    text = os.fspath(path)
    if not text:
        raise OutputError(f"{what} is empty: give a path")
    if text == "~" or text.startswith("~/"):
        raise OutputError(f"{what} {text!r}: a literal '~' (the shell did not expand it); give the full path")
    return Path(text)


def refuse_protected(p: Path, what: str, inputs: Iterable[Path] = ()) -> None:
    """Refuse a directory output that is /, the home directory, the working directory or one of
    its parents, an input, a directory holding an input, or a directory inside an input directory."""
    r = p.resolve()
    cwd = Path.cwd().resolve()
    if r == Path(r.anchor):
        raise OutputError(f"{what} {p} is the filesystem root: give a new directory for the output")
    if r == Path.home().resolve():
        raise OutputError(f"{what} {p} is the home directory: give a new directory for the output")
    if r == cwd or r in cwd.parents:
        where = "the working directory" if r == cwd else "a parent of the working directory"
        raise OutputError(f"{what} {p} is {where}: give a new directory for the output")
    for inp in inputs:
        if _within(inp, p):
            raise OutputError(f"{what} {p} is or holds the input {inp}: give a new directory for the output")
        if inp.is_dir() and _within(p, inp):
            raise OutputError(f"{what} {p} lies inside the input directory {inp}: write it elsewhere")


def check_existing_dir(p: Path, owned: Owned, *, force: bool, what: str) -> None:
    """An existing ``p`` must be empty, or a directory infertune wrote (``owned``) holding nothing else."""
    if not p.exists() and not p.is_symlink():
        return
    if not p.is_dir():
        raise OutputError(f"{what} {p} exists and is not a directory")
    try:
        entries = sorted(e.name for e in os.scandir(p))
    except OSError as e:
        raise OutputError(f"{what} {p}: cannot read it: {e.strerror}") from None
    if not entries:
        return
    names = owned.owned(p)
    if names is None:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise OutputError(f"{what} {p} exists and is not {owned.what} (it holds {shown}): infertune never "
                          "writes into a directory it did not create; give a new directory")
    if not owned.replace:
        return
    extra = foreign_entries(p, names)
    if extra:
        raise OutputError(f"{what} {p} is {owned.what} but also holds {', '.join(extra[:3])}"
                          f"{' ...' if len(extra) > 3 else ''}, which infertune did not write: move them out "
                          "or give a new directory")
    if not force:
        raise OutputError(f"{what} {p} already holds {owned.what}: replace it with --force (force=True in Python), "
                          "or give a new directory")


def foreign_entries(root: Path, names: set[str]) -> list[str]:
    """Relative paths under ``root`` that are not in ``names`` (files and directories)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        for n in sorted(dirnames + filenames):
            name = (rel / n).as_posix()
            if name not in names:
                out.append(name)
        dirnames[:] = [d for d in dirnames if (rel / d).as_posix() in names]
    return out


def probe(where: Path, what: str, target: Path) -> None:
    """Fail now, with one line, when nothing can be created at ``where`` (or its nearest existing parent)."""
    base = where
    while not base.exists() and base != base.parent:
        if base.is_symlink():
            raise OutputError(f"{what} {target}: {base} is a dangling symbolic link")
        base = base.parent
    if not base.is_dir():
        raise OutputError(f"{what} {target} lies under the regular file {base}: it cannot hold files")
    try:
        made = tempfile.mkdtemp(prefix=".infertune-probe-", dir=base)
    except OSError as e:
        raise OutputError(f"{what} {target}: cannot write in {base}: {e.strerror or e}") from None
    os.rmdir(made)


def new_temp_dir(dest: Path, what: str = "-o") -> Path:
    """A temporary sibling of ``dest`` (parents created), with the permissions of a new directory."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    except OSError as e:
        raise OutputError(f"{what} {dest}: cannot create it: {e.strerror or e}") from None
    os.chmod(tmp, default_mode(directory=True))
    return tmp


def replace_dir(tmp: Path, dest: Path, owned: Owned, *, force: bool, what: str = "-o") -> Path:
    """Move the finished ``tmp`` to ``dest``; an existing ``dest`` (checked again now) is swapped out
    and only the names its manifest lists are deleted."""
    check_existing_dir(dest, owned, force=force, what=what)
    if not dest.exists():
        os.replace(tmp, dest)
        return dest
    names = owned.owned(dest) or set()
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
    os.rmdir(old)
    os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except OSError:
        os.replace(old, dest)
        raise
    remove_owned(old, names)
    return dest


def remove_owned(root: Path, names: set[str]) -> None:
    """Delete the listed files and directories under ``root`` (deepest first), then ``root`` if empty;
    anything else is left where it is, with a warning."""
    for name in sorted(names, key=lambda n: -n.count("/")):
        p = root / name
        try:
            if p.is_dir() and not p.is_symlink():
                p.rmdir()
            else:
                p.unlink(missing_ok=True)
        except OSError:
            pass
    try:
        root.rmdir()
    except OSError:
        warnings.warn(f"kept {root}: it holds files infertune did not write", InfertuneWarning, stacklevel=2)


def discard_temp_dir(tmp: Path) -> None:
    """Remove a temporary directory this process created (``new_temp_dir``)."""
    shutil.rmtree(tmp, ignore_errors=True)
