"""Checkpoint files in the .npy format: written from chunks by a second thread (the CRC-32
taken meanwhile), and read back: a file's header, and a file's CRC-32."""

import io
import os
import threading
import zlib

import numpy as np

from adapm.checkpoint.format import CheckpointError

WRITEBACK_BYTES = 1 << 20  # chunks at least this large are handed to the disk at once
READ_BYTES = 32 << 20      # read per step when a file's CRC-32 is taken


def write_npy(filename, dtype, shape, chunks):
    """Write an .npy file from chunks (a temporary name, renamed once complete and
    synced); returns (CRC-32 of the whole file, its size). The write runs in a second
    thread, overlapping the CRC and the next chunk's gathering in this one (zlib and
    file writes release the GIL)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
        "shape": tuple(int(n) for n in shape)})
    tmp = f"{filename}.tmp{os.getpid()}"
    writer = ChunkWriter(tmp)
    try:
        writer.put(header.getvalue())
        for chunk in chunks:
            writer.put(chunk)
        crc, size = writer.finish()
    except BaseException:
        writer.abandon()
        raise
    os.replace(tmp, filename)
    return crc, size


class ChunkWriter:
    """Appends buffers to a file from a thread of its own, at most one buffer ahead: the
    caller may refill a buffer once the next put() returns (two buffers alternate). The
    CRC is taken in the caller's thread, in parallel with the previous buffer's write."""

    def __init__(self, filename):
        self.file = open(filename, "wb", buffering=0)
        self.filename = filename
        self.crc = 0
        self.size = 0
        self.error = None
        self.thread = None

    def put(self, buffer):
        data = memoryview(buffer).cast("B")
        self.crc = zlib.crc32(data, self.crc)
        self._join()
        self.thread = threading.Thread(target=self._write, args=(data,), daemon=True)
        self.thread.start()

    def _write(self, data):
        try:
            view = data
            while view.nbytes:  # a raw write may write less than asked
                written = self.file.write(view)
                view = view[written:]
            if data.nbytes >= WRITEBACK_BYTES:
                # Start writing this chunk to the disk now (asynchronously), not all at
                # the final fsync: the disk works while the next chunk is prepared.
                os.posix_fadvise(self.file.fileno(), self.size, data.nbytes,
                                 os.POSIX_FADV_DONTNEED)
            self.size += data.nbytes
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            self.error = exc

    def _join(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            raise self.error

    def finish(self):
        self._join()
        os.fsync(self.file.fileno())
        self.file.close()
        return self.crc, self.size

    def abandon(self):
        if self.thread is not None:
            self.thread.join()
        self.file.close()
        try:
            os.unlink(self.filename)
        except OSError:
            pass


def npy_header(filename):
    """(dtype, shape, the file's size by the header) of an .npy file, from its header."""
    try:
        with open(filename, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f".npy version {version} (1.0 or 2.0 expected)")
            offset = f.tell()
    except FileNotFoundError:
        raise CheckpointError(f"{filename}: missing") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{filename}: not a readable .npy file: {exc}") from None
    if fortran or dtype.hasobject or dtype.names is not None:
        raise CheckpointError(f"{filename}: a Fortran-order or structured array")
    return dtype, shape, offset + int(np.prod(shape, dtype=object)) * dtype.itemsize


def file_crc(filename):
    crc, size = 0, 0
    try:
        with open(filename, "rb", buffering=0) as f:
            buffer = bytearray(READ_BYTES)
            while True:
                n = f.readinto(buffer)
                if not n:
                    return crc, size
                crc = zlib.crc32(memoryview(buffer)[:n], crc)
                size += n
    except FileNotFoundError:
        raise CheckpointError(f"{filename}: missing") from None
