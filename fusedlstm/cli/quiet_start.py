"""A quiet framework start for `python -m fusedlstm`, and only for it.

Imported by TensorFlow, the C++ runtime writes its logging straight to file
descriptor 2: absl's "before absl::InitializeLog()" banner and INFO lines while
it loads, TensorFlow's own records (one at ERROR level, "oneDNN supports
DT_BOOL only on platforms with AVX-512", even where the CPU has AVX-512) on the
first ops. `TF_CPP_MIN_LOG_LEVEL` reaches only TensorFlow's own records, so in
the command line's process `quiet_framework_start` also holds file descriptor
2 while the frameworks are imported and writes back only the lines that are
not this logging: Python warnings and errors still show. `fusedlstm/__main__.py`
is its one caller: the library imported by any other program is left alone.

TensorFlow is imported inside the hold on every Keras backend where it is
installed: otherwise Keras imports it later, unheld (`keras.utils.set_random_seed`
seeds TensorFlow too whenever it is importable).
"""

import contextlib
import importlib
import importlib.util
import os
import re
import sys
import tempfile

FRAMEWORK_LOGGING = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} [\d:.]+ +\d+ [^ \]]+:\d+\] .*"
    r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IW] [^ \]]+:\d+\] .*"
    r"|To enable the following instructions: .*rebuild TensorFlow with the appropriate "
    r"compiler flags\.")


@contextlib.contextmanager
def quiet_framework_start():
    """Within it, the frameworks' start-up logging is held back.

    Sets `TF_CPP_MIN_LOG_LEVEL=3` unless the user set it, and holds file
    descriptor 2; on leaving, writes back every held line that is not
    framework logging (`FRAMEWORK_LOGGING`). TensorFlow, when installed, is
    imported within the hold whatever the Keras backend.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with _stderr_held(FRAMEWORK_LOGGING):
        if importlib.util.find_spec("tensorflow") is not None:
            importlib.import_module("tensorflow")
        yield


@contextlib.contextmanager
def _stderr_held(dropped):
    """Holds file descriptor 2; then writes back the lines that `dropped` does not match."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all: nothing to hold
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(
                line for line in lines if not dropped.fullmatch(line.rstrip("\r\n"))))
            sys.stderr.flush()
