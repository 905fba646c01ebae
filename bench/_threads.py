"""Imported first by a benchmark: the thread policy of the ``contrastive`` command (one OpenMP
thread per usable CPU, passive waiting), which must be set before torch loads."""

from contrastive.cpu import configure_threads

configure_threads()
