// GPU counter workload for checkpoint tests: holds BYTES of VRAM, increments every byte each tick and
// verifies every byte, so that a checkpoint/restore that loses or corrupts memory shows as bad > 0
// and one that restarts the process shows as a tick that does not continue the count.
//
// Usage: workload [BYTES [STATUS_FILE [DEVICE]]]   (BYTES default 2 GiB; STATUS_FILE "" for none)
// Prints "READY <bytes> pid=<pid> device=<n>", then "tick N bad=B err=E" each tick, and rewrites
// STATUS_FILE with the last tick line (readable by exec after a restore, when stdout may go nowhere).
// WORKLOAD_TICK_MS (default 200): pause between ticks. WORKLOAD_SPIN_MS (default 0): also run a
// kernel that spins this long each tick, to hold the process inside a CUDA call (lock timeouts).
// WORKLOAD_PORT (default unset): tick on demand instead, as a tiny TCP server on 0.0.0.0:PORT: each
// connection (whatever it sends first) gets one tick and its line "tick N bad=B err=E\n", then is
// closed. Between connections the GPU does nothing (the node broker's idle release, tests/gpu/test_gpu_broker.py).
// Exits 3 on a CUDA error, after printing it.
// Build: nvcc -O2 -arch=sm_90 -cudart static -o workload workload.cu
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>
#include <unistd.h>
#include <cstring>
#include <netinet/in.h>
#include <sys/socket.h>

#define CHECK(call)                                                                          \
  do {                                                                                       \
    cudaError_t e_ = (call);                                                                 \
    if (e_ != cudaSuccess) {                                                                 \
      printf("cuda error %d (%s) at %s:%d\n", (int)e_, cudaGetErrorString(e_), __FILE__,     \
             __LINE__);                                                                      \
      fflush(stdout);                                                                        \
      exit(3);                                                                               \
    }                                                                                        \
  } while (0)

__global__ void inc(unsigned char *p, size_t n) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  for (; i < n; i += (size_t)gridDim.x * blockDim.x) p[i]++;
}

__global__ void check(const unsigned char *p, size_t n, unsigned char v, unsigned long long *bad) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  unsigned long long mine = 0;
  for (; i < n; i += (size_t)gridDim.x * blockDim.x) mine += p[i] != v;
  if (mine) atomicAdd(bad, mine);
}

__global__ void spin(unsigned long long ns) {
  unsigned long long start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < ns);
}

static long env_long(const char *name, long dflt) {
  const char *v = getenv(name);
  return v && *v ? atol(v) : dflt;
}

int main(int argc, char **argv) {
  size_t n = argc > 1 ? strtoull(argv[1], 0, 10) : (2ULL << 30);
  const char *status = argc > 2 && argv[2][0] ? argv[2] : NULL;
  int device = argc > 3 ? atoi(argv[3]) : 0;
  long tick_ms = env_long("WORKLOAD_TICK_MS", 200);
  long spin_ms = env_long("WORKLOAD_SPIN_MS", 0);
  unsigned char *d;
  unsigned long long *bad;

  CHECK(cudaSetDevice(device));
  CHECK(cudaMalloc(&d, n));
  CHECK(cudaMalloc(&bad, sizeof *bad));
  CHECK(cudaMemset(d, 0, n));
  CHECK(cudaDeviceSynchronize());
  printf("READY %zu pid=%d device=%d\n", n, (int)getpid(), device);
  fflush(stdout);
  long port = env_long("WORKLOAD_PORT", 0);
  int listener = -1;
  if (port > 0) {
    listener = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    addr.sin_port = htons((unsigned short)port);
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(listener, 64) != 0) {
      printf("cannot listen on port %ld\n", port);
      fflush(stdout);
      exit(4);
    }
    printf("LISTENING %ld\n", port);
    fflush(stdout);
  }
  for (unsigned long long it = 1;; it++) {
    int conn = -1;
    if (listener >= 0) {
      conn = accept(listener, NULL, NULL);
      if (conn < 0) { it--; continue; }
      char buf[256];
      (void)!read(conn, buf, sizeof buf);
    }
    if (spin_ms > 0) spin<<<1, 1>>>((unsigned long long)spin_ms * 1000000ULL);
    inc<<<1024, 256>>>(d, n);
    CHECK(cudaGetLastError());
    CHECK(cudaMemset(bad, 0, sizeof *bad));
    check<<<1024, 256>>>(d, n, (unsigned char)it, bad);
    CHECK(cudaGetLastError());
    unsigned long long h = ~0ULL;
    cudaError_t e = cudaMemcpy(&h, bad, sizeof h, cudaMemcpyDeviceToHost);
    char line[128];
    int len = snprintf(line, sizeof line, "tick %llu bad=%llu err=%d\n", it, h, (int)e);
    fputs(line, stdout);
    fflush(stdout);
    if (status) {
      FILE *f = fopen(status, "w");
      if (f) {
        fputs(line, f);
        fclose(f);
      }
    }
    if (conn >= 0) {
      (void)!write(conn, line, (size_t)len);
      close(conn);
    }
    CHECK(e);
    if (listener < 0 && tick_ms > 0) usleep((useconds_t)tick_ms * 1000);
  }
}
