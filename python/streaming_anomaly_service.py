"""The Python prototype's service API, answered by fad.

Applications written against the prototype keep their code::

    from streaming_anomaly_service import AnomalyService
    svc = AnomalyService("artifacts")
    out = svc.process_message(msg)   # "ready:false,detection:,needed:23", ...

Behind it runs one ``fad stream --model artifacts`` co-process, fed one line per
message over a pipe; each reply is the line fad answers, exactly as ``fad stream``
writes it. ``artifacts`` may be the prototype's own directory (``model_if.pkl`` and its
``meta.json``) or one written by ``fad train``.

The fad binary is found through the ``fad_path`` argument, the ``FAD_BIN`` environment
variable, or ``PATH``. This module uses the standard library only.
"""

import collections
import collections.abc
import os
import shutil
import subprocess
import threading
import weakref

__all__ = ["AnomalyService", "FadError"]

FIELDS = ("timestamp", "bpm", "uterus", "group_id", "sequence_id")
HEADER = ",".join(FIELDS)


def _error_of(stderr_lines):
    """The line of fad's stderr that says what went wrong: the last `error:` or `fad ...:`
    line (a usage error ends with clap's usage text, not with the error), with clap's
    `tip:` line if there is one; else the last line."""
    lines = [s.strip() for s in stderr_lines if s.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith(("error:", "fad ", "fad:")):
            tips = [t for t in lines[i + 1:] if t.startswith("tip:")]
            return "; ".join([lines[i]] + tips[:1])
    return lines[-1] if lines else ""


class FadError(RuntimeError):
    """fad could not be started, or its co-process has ended."""


def _find_fad(fad_path):
    path = fad_path or os.environ.get("FAD_BIN") or shutil.which("fad")
    if not path:
        raise FadError("cannot find the fad binary: pass fad_path=..., set FAD_BIN, or put fad on PATH")
    return os.fspath(path)


def _drain(stream, sink):
    """Keeps the last lines fad writes to stderr (so that a chatty stderr never blocks it)."""
    try:
        for raw in iter(stream.readline, b""):
            sink.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
    except (OSError, ValueError):
        pass


def _shutdown(proc, timeout):
    """Ends the co-process: end of input first (fad finishes and exits), then force."""
    try:
        if proc.stdin and not proc.stdin.closed:
            proc.stdin.close()
    except OSError:
        pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for stream in (proc.stdout, proc.stderr):
        try:
            if stream:
                stream.close()
        except OSError:
            pass


class AnomalyService:
    """One ``fad stream`` co-process answering messages, one reply per message.

    ``model_dir``: the artifacts directory. ``fad_path``: the fad binary (default: the
    ``FAD_BIN`` environment variable, then ``fad`` on ``PATH``). ``extra_args``: more
    ``fad stream`` options, e.g. ``("--state", "fad.state")``.

    A model that does not load raises :class:`FadError` here, with fad's message.
    """

    def __init__(self, model_dir, fad_path=None, extra_args=()):
        self.model_dir = os.fspath(model_dir)
        command = [_find_fad(fad_path), "stream", "--model", self.model_dir, *map(str, extra_args)]
        try:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                bufsize=0,
            )
        except OSError as e:
            raise FadError(f"cannot start {command[0]}: {e}") from e
        self._proc = proc
        self._dead = None
        self._lock = threading.Lock()
        self._stderr = collections.deque(maxlen=20)
        self._stderr_thread = threading.Thread(target=_drain, args=(proc.stderr, self._stderr), daemon=True)
        self._stderr_thread.start()
        self._finalizer = weakref.finalize(self, _shutdown, proc, 10.0)
        # fad answers a header line like any other: a reply proves the model loaded. A
        # reply that is not one (extra_args with --help, say, print text and exit) is refused.
        try:
            reply = self._exchange(self._line_of(HEADER))
            if not reply.startswith(("ready:", '{"ready":')):
                raise FadError(f"{' '.join(command)} does not answer messages; it printed {reply[:200]!r}")
        except FadError:
            self.close()
            raise

    @property
    def pid(self):
        """The process id of the fad co-process."""
        return self._proc.pid

    def process_message(self, msg):
        """Sends one message and returns fad's reply, without the line end.

        ``msg`` is a line ``timestamp,bpm,uterus,group_id,sequence_id`` (a trailing line
        end is fine) or a mapping with those keys. A line end inside a message would make
        two lines of one message: it is replaced by a NUL, which fad rejects, so that
        the message still gets exactly one (error) reply.
        """
        return self._exchange(self._line_of(msg))

    def close(self):
        """Ends the co-process (idempotent); later messages raise :class:`FadError`."""
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()

    @staticmethod
    def _line_of(msg):
        """The message as the bytes of one line (without its end)."""
        if isinstance(msg, collections.abc.Mapping):
            msg = ",".join("" if msg.get(k) is None else str(msg.get(k)) for k in FIELDS)
        if isinstance(msg, str):
            # A lone surrogate becomes bytes that are not UTF-8, which fad answers with
            # error:not_utf8, rather than an exception that looks like a dead co-process.
            msg = msg.encode("utf-8", "surrogatepass")
        elif isinstance(msg, (bytes, bytearray)):
            msg = bytes(msg)
        else:
            raise TypeError(f"a message is a str or bytes line or a mapping, not {type(msg).__name__}")
        msg = msg.rstrip(b"\r\n")
        return msg.replace(b"\r", b"\0").replace(b"\n", b"\0")

    def _exchange(self, line):
        with self._lock:
            proc = self._proc
            if self._dead is not None:
                raise FadError(self._dead)
            if not self._finalizer.alive:
                raise FadError("this AnomalyService is closed")
            try:
                proc.stdin.write(line + b"\n")
                proc.stdin.flush()
                reply = proc.stdout.readline()
            except (BrokenPipeError, ValueError, OSError):
                reply = b""
            if not reply.endswith(b"\n"):
                raise self._died()
            return reply.decode("utf-8", "replace").rstrip("\r\n")

    def _died(self):
        try:
            code = self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            code = self._proc.wait()
        self._stderr_thread.join(timeout=2)
        self._finalizer()
        said = _error_of(list(self._stderr))
        if said:
            detail = f": {said}"
        elif code == 0:
            detail = " before its input ended: it does not answer messages (--help in extra_args?)"
        else:
            detail = ""
        self._dead = f"fad stream (model {self.model_dir}) ended with exit status {code}{detail}"
        return FadError(self._dead)
