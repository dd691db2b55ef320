"""Readers that misbehave, for tests of the process boundary (ect/untrusted.py): each is run in the limited
child as a real reader would be."""
import os
import signal
import time


def crash(path):
    os.kill(os.getpid(), signal.SIGSEGV)  # what a memory-corruption bug in a parser would do


def spin(path):
    while True:  # a parser stuck in a loop: the CPU limit stops it
        pass


def sleep(path):
    time.sleep(3600)  # a parser stuck waiting: the parent's deadline stops it


def allocate(path):
    return bytearray(64 << 30)  # far beyond what the file's size allows


def write_file(path):
    with open("written-by-the-child", "wb") as f:
        f.write(b"x")  # the child may write no file (RLIMIT_FSIZE 0)


def echo(path):
    import torch

    with open(path, "rb") as f:
        return {"bytes": torch.tensor(list(f.read()), dtype=torch.uint8)}
