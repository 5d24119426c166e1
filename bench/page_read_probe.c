/* How fast can a process's private memory be filled from an image file in RAM?  (issue 15)
 *
 * CRIU's restorer fills each private VMA with one synchronous preadv() from pages-N.img into memory
 * that was just mmap()ed and is not yet populated, so every 4 KiB page costs a page fault inside the
 * copy.  This probe times the same copy into fresh anonymous memory, done the ways a restorer could:
 *   plain            one preadv per GiB, 4 KiB faults inside the copy (what CRIU 4.1/4.2 do)
 *   populate         MADV_POPULATE_WRITE first (faults taken up front, still 4 KiB), then preadv
 *   huge             MADV_HUGEPAGE first (2 MiB faults where the range allows), then preadv
 *   huge+populate    both
 * and with N threads, each reading its slice (what a parallel restorer would do).
 * Usage: page_read_probe FILE MiB MODE [THREADS]   -> one line: mode, threads, seconds, GB/s
 * Build: cc -O2 -pthread -o page_read_probe bench/page_read_probe.c
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

struct slice { int fd; char *dst; size_t len; off_t off; };

static void *read_slice(void *arg) {
	struct slice *s = arg;
	size_t done = 0;
	while (done < s->len) {
		size_t want = s->len - done > (1UL << 30) ? (1UL << 30) : s->len - done;
		struct iovec iov = { s->dst + done, want };
		ssize_t r = preadv(s->fd, &iov, 1, s->off + done);
		if (r <= 0) { perror("preadv"); exit(1); }
		done += r;
	}
	return NULL;
}

int main(int argc, char **argv) {
	if (argc < 4) { fprintf(stderr, "usage: %s FILE MiB MODE [THREADS]\n", argv[0]); return 2; }
	size_t len = strtoull(argv[2], NULL, 0) << 20;
	const char *mode = argv[3];
	int threads = argc > 4 ? atoi(argv[4]) : 1;
	if (threads < 1 || threads > 64) threads = 1;
	int fd = open(argv[1], O_RDONLY);
	if (fd < 0) { perror("open"); return 1; }
	char *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) { perror("mmap"); return 1; }
	double t0 = now();
	if (strstr(mode, "huge") && madvise(mem, len, MADV_HUGEPAGE)) perror("MADV_HUGEPAGE");
	if (strstr(mode, "populate") && madvise(mem, len, MADV_POPULATE_WRITE)) perror("MADV_POPULATE_WRITE");
	double t1 = now();
	pthread_t tid[64];
	struct slice s[64];
	size_t per = ((len / threads) + 4095) & ~4095UL;
	for (int i = 0; i < threads; i++) {
		size_t off = (size_t)i * per;
		size_t n = off >= len ? 0 : (len - off < per ? len - off : per);
		s[i] = (struct slice){ fd, mem + off, n, (off_t)off };
		pthread_create(&tid[i], NULL, read_slice, &s[i]);
	}
	for (int i = 0; i < threads; i++) pthread_join(tid[i], NULL);
	double t2 = now();
	printf("{\"mode\": \"%s\", \"threads\": %d, \"mib\": %zu, \"prepare_s\": %.4f, \"read_s\": %.4f, "
	       "\"total_s\": %.4f, \"gb_per_s\": %.2f}\n", mode, threads, len >> 20, t1 - t0, t2 - t1, t2 - t0,
	       len / (t2 - t0) / 1e9);
	return 0;
}
