"""Imported first when main.py or train_original.py runs as a script: Ctrl-C while their slow
imports (torch, pandas) load exits at once with status 130 and no traceback; run_cli
(run/errors.py) takes over once they are done. os._exit, not sys.exit: an exception raised
inside torch's C++ import code aborts the process."""
import os
import signal

signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))
