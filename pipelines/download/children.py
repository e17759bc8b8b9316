"""img2dataset's processes, made to die with the process that runs the download (kill -9 included),
as every process of a run must: left behind, its pool's worker finishes its shard into a work folder
that a rerun owns, and its logger polls the output folder for ever. img2dataset takes no initializer
for either, so `mortal()` puts these in their place while a download runs.

Imported where img2dataset runs, and by those processes (spawned, they import their class by name)."""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os

from img2dataset import distributor
from img2dataset.logger import LoggerProcess

from wit_builder.runner import die_with_parent


class MortalLogger(LoggerProcess):
    """img2dataset's logger process, whose first act is to die with its parent."""

    def run(self) -> None:
        die_with_parent(self._parent_pid)
        super().run()


class MortalSpawn:
    """The "spawn" context img2dataset starts its pool with, whose workers die with this process. The
    pool starts them from this thread and from its own handler thread, which outlasts them."""

    def __init__(self):
        self.context = multiprocessing.get_context("spawn")

    def Pool(self, processes=None, maxtasksperchild=None):  # the arguments img2dataset passes
        return self.context.Pool(processes, die_with_parent, (os.getpid(),), maxtasksperchild)


@contextlib.contextmanager
def mortal():
    main = importlib.import_module("img2dataset.main")  # the module: the package's `main` is a function
    saved = distributor.get_context, main.LoggerProcess
    distributor.get_context = lambda method=None: MortalSpawn() if method == "spawn" else saved[0](method)
    main.LoggerProcess = MortalLogger
    try:
        yield
    finally:
        distributor.get_context, main.LoggerProcess = saved
