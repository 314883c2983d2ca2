"""Which exceptions are a user's input or environment failing (one line, exit 2) and which are bugs.

infertune's library turns what it expects into ``InfertuneError`` at the boundary, naming the file.
This is the net under it: the same kinds of failure surfacing anywhere else (a path that cannot be
read or written, a file that is not what its name says, a JSON document nested 100 000 deep, an
image that would decompress to gigabytes) are still the user's, and get one line naming the path
where the exception knows it. Everything else returns None: a bug, shown with its traceback.
"""

from __future__ import annotations

import errno
import json
import zipfile
from pathlib import Path

from google.protobuf.message import DecodeError

# errors without a file name that still only the environment causes
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EMFILE,
                      errno.ENFILE, errno.EFBIG, errno.ENAMETOOLONG, errno.ELOOP}
# the readers whose exceptions, raised in their own code, mean "this file is not what it claims":
# (package directory, module file stems); PIL's are recognised by their type
READERS = (("numpy", {"npyio", "_npyio_impl", "format", "_format_impl", "_datasource"}),
           ("onnx", {"__init__", "external_data_helper", "serialization"}))


def expected_failure(e: BaseException) -> str | None:
    """One line for an exception a user's files or paths cause, or None for a bug."""
    if isinstance(e, OSError):
        return _os_error(e)
    if isinstance(e, RecursionError):
        return f"input nested too deeply to read ({e})"
    if isinstance(e, json.JSONDecodeError):
        return f"not valid JSON: {e}"
    if isinstance(e, UnicodeDecodeError):
        return f"not valid UTF-8 text: {e}"
    if isinstance(e, (DecodeError, zipfile.BadZipFile)):
        return f"a file is not what its name says (corrupt or truncated): {_first_line(e)}"
    if type(e).__module__.split(".")[0] == "PIL" or _raised_in_reader(e):
        return f"cannot read an input file: {_first_line(e)}"
    return None


def _os_error(e: OSError) -> str | None:
    what = e.strerror or _first_line(e)
    if e.filename is not None:
        where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else str(e.filename)
        return f"{where}: {what}"
    if e.errno in ENVIRONMENT_ERRNOS:
        return what
    return None


def _raised_in_reader(e: BaseException) -> bool:
    """The innermost frame of ``e``'s traceback is in one of ``READERS`` (a reader refusing its input)."""
    tb = e.__traceback__
    if tb is None or not isinstance(e, (ValueError, EOFError)):
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = Path(tb.tb_frame.f_code.co_filename)
    return any(package in path.parts and path.stem in stems for package, stems in READERS)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
