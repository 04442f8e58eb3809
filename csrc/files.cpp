// Byte ranges of files read into memory on several threads at once, without the GIL: a merge reads
// each row block from T + 1 files, and one thread copies from the page cache at about 12 GB/s
// where two reach 19 GB/s (13 MiniLM fp32 files in 1 MiB blocks, 2-core machine, 2026-12-07).
// Python threads cannot: between reads each holds the GIL, and the kernels' OpenMP threads, still
// spinning after a block, would compete with them. The threads here are that same OpenMP team.
#include "files.h"

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <vector>

#include <sys/uio.h>
#include <unistd.h>

namespace {

// Reads in flight at once for what the page cache does not hold: a thousand adapters' digests
// are 56 000 reads of 32 bytes scattered over 10 GB, 2.8 s one at a time from a cold disk
// against 0.75 s sixteen at a time (virtio disk of the 2-core machine, 2026-12-07).
constexpr int kDiskDepth = 16;

struct Range {
  int fd;
  long long offset;
  long long length;
  unsigned long long address;
};

// Bytes of `r` read from `done` on, before the end of the file (a short count: the file was
// truncated), or -errno. `cached`: copy only what the page cache holds, stopping at the first byte
// the disk must give (then *waits is set: the rest is for a blocking read); a filesystem that
// cannot tell gets a blocking read at once.
long long read_range(const Range& r, long long done, bool cached, char* waits) {
  char* out = reinterpret_cast<char*>(static_cast<uintptr_t>(r.address));
  while (done < r.length) {
    size_t size = static_cast<size_t>(r.length - done);
    off_t at = static_cast<off_t>(r.offset + done);
#ifdef RWF_NOWAIT
    iovec to{out + done, size};
    ssize_t n = cached ? preadv2(r.fd, &to, 1, at, RWF_NOWAIT) : pread(r.fd, out + done, size, at);
    if (n < 0 && cached && errno == EAGAIN) {
      *waits = 1;
      break;
    }
    if (n < 0 && cached && (errno == EOPNOTSUPP || errno == EINVAL || errno == ENOSYS)) {
      cached = false;
      continue;
    }
#else
    ssize_t n = pread(r.fd, out + done, size, at);
#endif
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return -errno;
    if (n == 0) break;
    done += n;
  }
  return done;
}

}  // namespace

// read_ranges(ranges, threads) -> list of bytes read per range (fewer than asked: the file ends
// early). ranges: a sequence of (fd, offset, length, address), each address the first byte of
// `length` writable bytes that the caller keeps alive. Raises OSError on a failed read.
PyObject* svdfuse_read_ranges(PyObject*, PyObject* args) {
  PyObject* given;
  int threads;
  if (!PyArg_ParseTuple(args, "Oi", &given, &threads)) return nullptr;
  PyObject* seq = PySequence_Fast(given, "read_ranges: ranges must be a sequence of (fd, offset, length, address)");
  if (seq == nullptr) return nullptr;
  Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
  std::vector<Range> ranges(static_cast<size_t>(count));
  for (Py_ssize_t i = 0; i < count; ++i) {
    Range& r = ranges[static_cast<size_t>(i)];
    if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "iLLK", &r.fd, &r.offset, &r.length, &r.address)) {
      Py_DECREF(seq);
      return nullptr;
    }
  }
  Py_DECREF(seq);
  std::vector<long long> done(ranges.size());
  std::vector<char> waits(ranges.size(), 0);
  Py_BEGIN_ALLOW_THREADS
  // What the page cache holds first, on `threads` threads (copies: more threads than cores gain
  // nothing); dynamic: a thread the machine keeps busy elsewhere takes fewer ranges. A miss starts
  // the kernel's read-ahead of that range and leaves the rest to the second pass.
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads > 0 ? threads : 1)
  for (Py_ssize_t i = 0; i < count; ++i) done[static_cast<size_t>(i)] = read_range(ranges[static_cast<size_t>(i)], 0, true, &waits[static_cast<size_t>(i)]);
  // Then what the disk must give, kDiskDepth reads in flight: one thread's reads would wait for
  // the disk one at a time.
  std::vector<size_t> pending;
  for (size_t i = 0; i < ranges.size(); ++i)
    if (waits[i] && done[i] >= 0) pending.push_back(i);
  const int depth = static_cast<int>(std::min<size_t>(pending.size(), static_cast<size_t>(std::max(threads, kDiskDepth))));
#pragma omp parallel for schedule(dynamic, 1) num_threads(depth > 0 ? depth : 1)
  for (Py_ssize_t p = 0; p < static_cast<Py_ssize_t>(pending.size()); ++p) {
    const size_t i = pending[static_cast<size_t>(p)];
    done[i] = read_range(ranges[i], done[i], false, nullptr);
  }
  Py_END_ALLOW_THREADS
  PyObject* result = PyList_New(count);
  if (result == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < count; ++i) {
    long long n = done[static_cast<size_t>(i)];
    if (n < 0) {
      Py_DECREF(result);
      errno = static_cast<int>(-n);
      return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyList_SET_ITEM(result, i, PyLong_FromLongLong(n));
  }
  return result;
}
