"""The `djinnsim` console entry (and `python -m djinnsim`): signal handlers first, then the CLI.

The handlers are installed before anything heavy is imported (typer, pydantic, numpy, pandas take
a second or more), so a Ctrl-C or SIGTERM at any moment ends the process with one line and exit
code 130 (SIGINT) or 143 (SIGTERM), never a traceback. The first signal raises KeyboardInterrupt
where the program is, so output folders clean up after themselves (sim/outputs.py); a second one
while that happens exits at once. Usage errors (an unknown option, a missing argument, a value of
the wrong type) are one line and exit code 1, like every other bad input.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from types import SimpleNamespace

_received: list[int] = []


def _on_signal(signum, frame) -> None:
    if _received:  # a second signal while the first one unwinds: leave now
        os.write(2, b"interrupted\n")
        os._exit(128 + _received[0])
    _received.append(signum)
    raise KeyboardInterrupt


def _on_unraisable(unraisable) -> None:
    """A KeyboardInterrupt raised by `_on_signal` inside a callback Python swallows (an import lock's
    weakref callback, a __del__) would print a traceback and be lost: the signal is sent again, so it
    is raised where the program runs and unwinds it as the first one should have."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and _received:
        import threading

        # from another thread a moment later: sent from here, the handler would run inside this hook
        threading.Timer(0.01, os.kill, (os.getpid(), _received.pop())).start()
        return
    sys.__unraisablehook__(unraisable)


def main(argv: list[str] | None = None) -> None:
    sys.unraisablehook = _on_unraisable
    try:  # the handlers are installed inside the try: a signal right after one is installed is caught here
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _on_signal)
        # a parent that held them back when it started this process passes its mask on: unblocked,
        # or an interrupt would wait until the run had finished
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        for stream in (sys.stdout, sys.stderr):  # an undecodable file name prints escaped, not as a crash
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="backslashreplace")
        code = _run(argv)
    except KeyboardInterrupt:  # before the CLI took over (typer turns a later one into exit code 130)
        code = 130
    except BrokenPipeError:  # `djinnsim ... | head`: the reader left; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    # From here on a signal is held back until the exit: the exit code and the one line are decided.
    # Blocking covers this thread only (a library's thread can still take a process-wide signal), and
    # the interpreter's shutdown resets a Python handler to the default action, which would kill the
    # process by the signal (exit -2, no line) after a complete run: ignored, it is neither.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    if _received or code == 130:
        print("interrupted", file=sys.stderr)
        code = 128 + _received[0] if _received else code
        # A KeyboardInterrupt raised during an import can leave CPython's "unhandled
        # KeyboardInterrupt" flag set, which makes the interpreter's own exit replace the code with a
        # SIGINT exit (-2, or 130 for a SIGTERM while SIGINT is blocked). The code is decided: the
        # exit handlers run here (pool workers are stopped), the streams are flushed, and the process
        # ends with that code.
        _exit_now(code)
    threading = sys.modules.get("threading")
    if (threading is None or threading.active_count() == 1) and sys.getprofile() is None and sys.gettrace() is None:
        # The same ending after any other run: the interpreter's own would then free every object
        # of it one by one (a quarter of a second after 100,000 agents), which nothing needs. Not
        # with another thread still running (the interpreter would wait for it), nor under a
        # profiler or a tracer (coverage), which write their results as the interpreter ends.
        _exit_now(code)
    sys.exit(code)


def _exit_now(code: int) -> None:
    """Ends the process with `code`: the exit handlers run (pool workers are stopped), the
    streams are flushed, and nothing else of the interpreter's shutdown."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _click_exceptions() -> SimpleNamespace:
    """The exception types of the click typer parses with: its own vendored copy in recent typer
    (whose Abort is typer's), else click's."""
    import typer.core

    vendored = getattr(typer.core, "_click", None)
    source = vendored.exceptions if vendored is not None else __import__("click").exceptions

    class _Never(Exception):
        pass

    return SimpleNamespace(
        UsageError=source.UsageError, ClickException=source.ClickException,
        NoArgsIsHelpError=getattr(source, "NoArgsIsHelpError", _Never),
        Abort=getattr(typer.core, "Abort", None) or getattr(source, "Abort", _Never))


def _run(argv: list[str] | None) -> int:
    from djinnsim.cli import app

    errors = _click_exceptions()

    try:
        result = app(args=argv, prog_name="djinnsim", standalone_mode=False)
    except errors.NoArgsIsHelpError as exc:
        exc.show()
        return 1
    except errors.UsageError as exc:
        where = f"{exc.ctx.command_path}: " if exc.ctx is not None else ""
        hint = f" (see {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
        message = " ".join(exc.format_message().split())
        print(f"error: {where}{message}{hint}", file=sys.stderr)
        return 1
    except errors.Abort:
        return 130
    except errors.ClickException as exc:
        print(f"error: {' '.join(exc.format_message().split())}", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    main()
