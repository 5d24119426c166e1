/* A stand-in for libcuda.so.1: the symbols cuda_bindings calls, with per-pid checkpoint state, scripted
 * failures and delays. Built by the tests with gcc; proves orchestration only, never the real driver.
 *
 * Environment:
 *   FAKECUDA_DIR      directory holding the files below (unset: no pid is a CUDA process, no log)
 *   FAKECUDA_VERSION  what cuDriverGetVersion reports (default 13000)
 *   FAKECUDA_DEVICES  device count (default 2)
 *   FAKECUDA_INIT     what cuInit returns (default 0)
 *   FAKECUDA_MODEL    what cuDeviceGetName reports for every device (default "Fake GPU 80GB")
 * Files in FAKECUDA_DIR, re-read at every call so that tests and CLI runs can change them:
 *   state   "PID STATE [DEVS]" lines (0 running, 1 locked, 2 checkpointed, 3 failed); listed pids hold
 *           CUDA. DEVS (optional): the device ordinals the process uses, "0,1". Where given, a restore
 *           with GPU pairs must name every one of them as an old UUID (as the driver wants every
 *           checkpointed GPU in the pairs) and moves the process to the new ones; a restore without
 *           pairs fails with INVALID_DEVICE when one of them is not a device here (FAKECUDA_DEVICES).
 *   script  rules, one a line:
 *             fail CALL PID|* CODE [TIMES]   return CODE (TIMES times, default always)
 *             sleep CALL PID|* MS            sleep MS milliseconds at entry (proves parallelism)
 *             noproc CODE                    answer for pids not in state (default 500 NOT_FOUND)
 *           CALL: init state lock checkpoint restore unlock tid devcount deviceget uuid name
 *   log     appended by us: "CALL PID RC T0_NS T1_NS DETAIL" (CLOCK_MONOTONIC, as Python's
 *           time.monotonic_ns)
 * Build with -DFAKECUDA_NO_CHECKPOINT for a driver that predates the checkpoint API.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef uint64_t cuuint64_t;
typedef struct CUuuid_st { char bytes[16]; } CUuuid;
typedef enum CUprocessState_enum {
  CU_PROCESS_STATE_RUNNING = 0,
  CU_PROCESS_STATE_LOCKED,
  CU_PROCESS_STATE_CHECKPOINTED,
  CU_PROCESS_STATE_FAILED,
} CUprocessState;
typedef struct CUcheckpointLockArgs_st {
  unsigned int timeoutMs;
  unsigned int reserved0;
  cuuint64_t reserved1[7];
} CUcheckpointLockArgs;
typedef struct CUcheckpointCheckpointArgs_st { cuuint64_t reserved[8]; } CUcheckpointCheckpointArgs;
typedef struct CUcheckpointGpuPair_st { CUuuid oldUuid; CUuuid newUuid; } CUcheckpointGpuPair;
typedef struct CUcheckpointRestoreArgs_st {
  CUcheckpointGpuPair *gpuPairs;
  unsigned int gpuPairsCount;
  char reserved[52 - sizeof(CUcheckpointGpuPair *)];
  cuuint64_t reserved1;
} CUcheckpointRestoreArgs;
typedef struct CUcheckpointUnlockArgs_st { cuuint64_t reserved[8]; } CUcheckpointUnlockArgs;

_Static_assert(sizeof(CUcheckpointLockArgs) == 64, "lock args");
_Static_assert(sizeof(CUcheckpointRestoreArgs) == 64, "restore args");

enum {
  SUCCESS = 0, INVALID_VALUE = 1, NOT_INITIALIZED = 3, NO_DEVICE = 100, INVALID_DEVICE = 101,
  ILLEGAL_STATE = 401, NOT_FOUND = 500, NOT_READY = 600, NOT_SUPPORTED = 801, TIMEOUT = 909,
};

static const struct { int code; const char *name, *text; } ERRORS[] = {
  {0, "CUDA_SUCCESS", "no error"},
  {1, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
  {3, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
  {100, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
  {101, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
  {304, "CUDA_ERROR_OPERATING_SYSTEM", "OS call failed or operation not supported on this OS"},
  {401, "CUDA_ERROR_ILLEGAL_STATE", "the operation cannot be performed in the present state"},
  {500, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
  {600, "CUDA_ERROR_NOT_READY", "device not ready"},
  {801, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
  {909, "CUDA_ERROR_TIMEOUT", "the operation timed out"},
  {999, "CUDA_ERROR_UNKNOWN", "unknown error"},
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
#define MAX_PIDS 256
#define MAX_RULES 64
static int consumed[MAX_RULES]; /* times each script line has fired since the script last changed */
static struct stat script_seen;  /* identity of the script those counts belong to */

static long long now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int env_int(const char *name, int dflt) {
  const char *v = getenv(name);
  return v && *v ? atoi(v) : dflt;
}

static int dir_path(char *out, size_t n, const char *file) {
  const char *dir = getenv("FAKECUDA_DIR");
  if (!dir || !*dir) return 0;
  snprintf(out, n, "%s/%s", dir, file);
  return 1;
}

/* Reads the script; returns the sleep in ms for (call, pid) and sets *fail to a scripted result. */
static void read_script(const char *call, int pid, int *sleep_ms, int *fail, int *noproc) {
  char path[4096], line[512];
  *sleep_ms = 0; *fail = 0; *noproc = NOT_FOUND;
  if (!dir_path(path, sizeof path, "script")) return;
  FILE *f = fopen(path, "r");
  if (!f) return;
  struct stat st;
  pthread_mutex_lock(&mu);
  if (!fstat(fileno(f), &st) &&
      (st.st_ino != script_seen.st_ino || st.st_dev != script_seen.st_dev ||
       st.st_mtim.tv_sec != script_seen.st_mtim.tv_sec ||
       st.st_mtim.tv_nsec != script_seen.st_mtim.tv_nsec || st.st_size != script_seen.st_size)) {
    memset(consumed, 0, sizeof consumed);  /* a new script: its TIMES count afresh */
    script_seen = st;
  }
  pthread_mutex_unlock(&mu);
  for (int idx = 0; fgets(line, sizeof line, f) && idx < MAX_RULES; idx++) {
    char verb[32] = "", rcall[32] = "", rpid[32] = "";
    int a = 0, times = -1;
    int got = sscanf(line, "%31s %31s %31s %d %d", verb, rcall, rpid, &a, &times);
    if (!strcmp(verb, "noproc") && got >= 2) { *noproc = atoi(rcall); continue; }
    if (got < 4 || strcmp(rcall, call)) continue;
    if (strcmp(rpid, "*") && atoi(rpid) != pid) continue;
    if (!strcmp(verb, "sleep")) *sleep_ms = a;
    if (!strcmp(verb, "fail") && !*fail) {
      pthread_mutex_lock(&mu);
      if (times < 0 || consumed[idx] < times) { consumed[idx]++; *fail = a; }
      pthread_mutex_unlock(&mu);
    }
  }
  fclose(f);
}

static void log_call(const char *call, int pid, int rc, long long t0, const char *detail) {
  char path[4096], line[1024];
  if (!dir_path(path, sizeof path, "log")) return;
  int fd = open(path, O_WRONLY | O_APPEND | O_CREAT, 0644);
  if (fd < 0) return;
  int n = snprintf(line, sizeof line, "%s %d %d %lld %lld %s\n", call, pid, rc, t0, now_ns(),
                   detail ? detail : "-");
  if (write(fd, line, n) < 0) { /* a test will notice the missing line */ }
  close(fd);
}

/* Common prologue of every scripted call: sleep, then the scripted failure if any. */
static int enter(const char *call, int pid, int *noproc) {
  int sleep_ms, fail, np;
  read_script(call, pid, &sleep_ms, &fail, &np);
  if (noproc) *noproc = np;
  if (sleep_ms > 0) {
    struct timespec ts = {sleep_ms / 1000, (sleep_ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) && errno == EINTR) {}
  }
  return fail;
}

CUresult cuGetErrorName(CUresult error, const char **pStr) {
  for (size_t i = 0; i < sizeof ERRORS / sizeof *ERRORS; i++)
    if (ERRORS[i].code == error) { *pStr = ERRORS[i].name; return SUCCESS; }
  *pStr = NULL;
  return INVALID_VALUE;
}

CUresult cuGetErrorString(CUresult error, const char **pStr) {
  for (size_t i = 0; i < sizeof ERRORS / sizeof *ERRORS; i++)
    if (ERRORS[i].code == error) { *pStr = ERRORS[i].text; return SUCCESS; }
  *pStr = NULL;
  return INVALID_VALUE;
}

CUresult cuDriverGetVersion(int *v) {
  if (!v) return INVALID_VALUE;
  *v = env_int("FAKECUDA_VERSION", 13000);
  return SUCCESS;
}

static int initialized;

CUresult cuInit(unsigned int flags) {
  long long t0 = now_ns();
  int rc = flags ? INVALID_VALUE : env_int("FAKECUDA_INIT", 0);
  if (!rc) rc = enter("init", 0, NULL);
  if (!rc) initialized = 1;
  log_call("init", 0, rc, t0, NULL);
  return rc;
}

CUresult cuDeviceGetCount(int *count) {
  int rc = enter("devcount", 0, NULL);
  if (!rc && !initialized) rc = NOT_INITIALIZED;
  if (!rc) *count = env_int("FAKECUDA_DEVICES", 2);
  return rc;
}

CUresult cuDeviceGet(CUdevice *dev, int ordinal) {
  int rc = enter("deviceget", ordinal, NULL);
  if (!rc && !initialized) rc = NOT_INITIALIZED;
  if (!rc && (ordinal < 0 || ordinal >= env_int("FAKECUDA_DEVICES", 2))) rc = INVALID_DEVICE;
  if (!rc) *dev = ordinal;
  return rc;
}

static void fake_uuid(int dev, char out[16]) {
  char buf[32];
  snprintf(buf, sizeof buf, "fakegpu-uuid-%03d", dev % 1000);
  memcpy(out, buf, 16);
}

CUresult cuDeviceGetUuid_v2(CUuuid *uuid, CUdevice dev) {
  int rc = enter("uuid", dev, NULL);
  if (!rc && !initialized) rc = NOT_INITIALIZED;
  if (!rc && (dev < 0 || dev >= env_int("FAKECUDA_DEVICES", 2))) rc = INVALID_DEVICE;
  if (!rc) fake_uuid(dev, uuid->bytes);
  return rc;
}

CUresult cuDeviceGetUuid(CUuuid *uuid, CUdevice dev) { return cuDeviceGetUuid_v2(uuid, dev); }

CUresult cuDeviceGetName(char *name, int len, CUdevice dev) {
  const char *model = getenv("FAKECUDA_MODEL");
  int rc = enter("name", dev, NULL);
  if (!rc && (!name || len <= 0)) rc = INVALID_VALUE;
  if (!rc && !initialized) rc = NOT_INITIALIZED;
  if (!rc && (dev < 0 || dev >= env_int("FAKECUDA_DEVICES", 2))) rc = INVALID_DEVICE;
  if (!rc) snprintf(name, len, "%s", model && *model ? model : "Fake GPU 80GB");
  return rc;
}

#ifndef FAKECUDA_NO_CHECKPOINT
/* state file <-> arrays; devs[i] is the optional third column ("" when absent) */
#define DEVS_LEN 64
static char devs[MAX_PIDS][DEVS_LEN];

static int load_states(int *pids, int *states) {
  char path[4096], line[256];
  int n = 0;
  if (!dir_path(path, sizeof path, "state")) return 0;
  FILE *f = fopen(path, "r");
  if (!f) return 0;
  while (n < MAX_PIDS && fgets(line, sizeof line, f)) {
    devs[n][0] = 0;
    if (sscanf(line, "%d %d %63s", &pids[n], &states[n], devs[n]) >= 2) n++;
  }
  fclose(f);
  return n;
}

static void save_states(const int *pids, const int *states, int n) {
  char path[4096], tmp[4200];
  if (!dir_path(path, sizeof path, "state")) return;
  snprintf(tmp, sizeof tmp, "%s.%d.%ld", path, getpid(), (long)pthread_self());
  FILE *f = fopen(tmp, "w");
  if (!f) return;
  for (int i = 0; i < n; i++)
    fprintf(f, devs[i][0] ? "%d %d %s\n" : "%d %d\n", pids[i], states[i], devs[i]);
  fclose(f);
  rename(tmp, path);
}

/* The ordinal whose fake UUID is `raw`, or -1. */
static int device_of(const char raw[16]) {
  char want[16];
  for (int d = 0; d < env_int("FAKECUDA_DEVICES", 2); d++) {
    fake_uuid(d, want);
    if (!memcmp(want, raw, 16)) return d;
  }
  return -1;
}

/* A restore of process i: its devices (if the state file lists them) against the GPU pairs.
 * Returns a CUresult; on success rewrites devs[i] to where the process now is. Called under mu. */
static int remap_devices(int i, const CUcheckpointRestoreArgs *args) {
  char out[DEVS_LEN] = "", copy[DEVS_LEN];
  int len = 0;
  if (!devs[i][0]) return SUCCESS;
  snprintf(copy, sizeof copy, "%s", devs[i]);
  for (char *save = NULL, *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
    int dev = atoi(tok), to = dev;
    if (args && args->gpuPairsCount) {
      char want[16];
      unsigned k;
      fake_uuid(dev, want);
      for (k = 0; k < args->gpuPairsCount && memcmp(args->gpuPairs[k].oldUuid.bytes, want, 16); k++) {}
      if (k == args->gpuPairsCount) return INVALID_VALUE;  /* a checkpointed GPU missing from the pairs */
      to = device_of(args->gpuPairs[k].newUuid.bytes);
      if (to < 0) return INVALID_DEVICE;
    } else if (dev >= env_int("FAKECUDA_DEVICES", 2)) {
      return INVALID_DEVICE;  /* the GPU it was checkpointed on is not here */
    }
    len += snprintf(out + len, sizeof out - len, "%s%d", len ? "," : "", to);
  }
  snprintf(devs[i], DEVS_LEN, "%s", out);
  return SUCCESS;
}

static int all_zero(const void *p, size_t n) {
  const unsigned char *c = p;
  for (size_t i = 0; i < n; i++) if (c[i]) return 0;
  return 1;
}

/* One state-machine step: pid must be in `from`; moves it to `to` (to < 0: leave as is). restore:
 * the restore's arguments (its devices are checked and moved), NULL for the other calls. */
static int step_args(const char *call, int pid, int from, int to, int *state_out, const char *detail,
                     int precheck, int is_restore, const CUcheckpointRestoreArgs *restore) {
  long long t0 = now_ns();
  int noproc, rc = enter(call, pid, &noproc);
  int pids[MAX_PIDS], states[MAX_PIDS];
  if (!rc) rc = precheck;
  if (!rc) {
    pthread_mutex_lock(&mu);
    int n = load_states(pids, states), i;
    for (i = 0; i < n && pids[i] != pid; i++) {}
    if (i == n) rc = noproc;
    else if (from >= 0 && states[i] != from) rc = ILLEGAL_STATE;
    else if (is_restore && (rc = remap_devices(i, restore))) {}
    else {
      if (state_out) *state_out = states[i];
      if (to >= 0) { states[i] = to; save_states(pids, states, n); }
    }
    pthread_mutex_unlock(&mu);
  }
  log_call(call, pid, rc, t0, detail);
  return rc;
}

static int step(const char *call, int pid, int from, int to, int *state_out, const char *detail,
                int precheck) {
  return step_args(call, pid, from, to, state_out, detail, precheck, 0, NULL);
}

CUresult cuCheckpointProcessGetState(int pid, CUprocessState *state) {
  int s = 0, rc;
  if (!state) return INVALID_VALUE;
  rc = step("state", pid, -1, -1, &s, NULL, 0);
  if (!rc) *state = (CUprocessState)s;
  return rc;
}

CUresult cuCheckpointProcessGetRestoreThreadId(int pid, int *tid) {
  int rc;
  if (!tid) return INVALID_VALUE;
  rc = step("tid", pid, -1, -1, NULL, NULL, 0);
  if (!rc) *tid = pid + 1;
  return rc;
}

CUresult cuCheckpointProcessLock(int pid, CUcheckpointLockArgs *args) {
  char detail[64] = "args=null";
  int bad = 0;
  if (args) {
    snprintf(detail, sizeof detail, "timeout=%u", args->timeoutMs);
    bad = args->reserved0 || !all_zero(args->reserved1, sizeof args->reserved1) ? INVALID_VALUE : 0;
  }
  return step("lock", pid, CU_PROCESS_STATE_RUNNING, CU_PROCESS_STATE_LOCKED, NULL, detail, bad);
}

CUresult cuCheckpointProcessCheckpoint(int pid, CUcheckpointCheckpointArgs *args) {
  int bad = args && !all_zero(args, sizeof *args) ? INVALID_VALUE : 0;
  return step("checkpoint", pid, CU_PROCESS_STATE_LOCKED, CU_PROCESS_STATE_CHECKPOINTED, NULL,
              args ? "args=zero" : "args=null", bad);
}

CUresult cuCheckpointProcessRestore(int pid, CUcheckpointRestoreArgs *args) {
  char detail[2048] = "args=null";
  int bad = 0;
  if (args) {
    int len = snprintf(detail, sizeof detail, "pairs=%u", args->gpuPairsCount);
    if (!all_zero(args->reserved, sizeof args->reserved) || args->reserved1) bad = INVALID_VALUE;
    if (args->gpuPairsCount && env_int("FAKECUDA_VERSION", 13000) < 13000) bad = INVALID_VALUE;
    if (args->gpuPairsCount && !args->gpuPairs) bad = INVALID_VALUE;
    for (unsigned i = 0; args->gpuPairs && i < args->gpuPairsCount && len < 1900; i++) {
      const CUcheckpointGpuPair *p = &args->gpuPairs[i];
      int known = 0;
      char want[16];
      for (int d = 0; d < env_int("FAKECUDA_DEVICES", 2); d++) {
        fake_uuid(d, want);
        if (!memcmp(want, p->oldUuid.bytes, 16)) known = 1;
      }
      if (!known) bad = INVALID_VALUE;
      len += snprintf(detail + len, sizeof detail - len, "%s", i ? "," : " ");
      for (int b = 0; b < 16; b++)
        len += snprintf(detail + len, sizeof detail - len, "%02x", (unsigned char)p->oldUuid.bytes[b]);
      len += snprintf(detail + len, sizeof detail - len, ">");
      for (int b = 0; b < 16; b++)
        len += snprintf(detail + len, sizeof detail - len, "%02x", (unsigned char)p->newUuid.bytes[b]);
    }
  }
  return step_args("restore", pid, CU_PROCESS_STATE_CHECKPOINTED, CU_PROCESS_STATE_LOCKED, NULL, detail,
                   bad, 1, args);
}

CUresult cuCheckpointProcessUnlock(int pid, CUcheckpointUnlockArgs *args) {
  int bad = args && !all_zero(args, sizeof *args) ? INVALID_VALUE : 0;
  return step("unlock", pid, CU_PROCESS_STATE_LOCKED, CU_PROCESS_STATE_RUNNING, NULL,
              args ? "args=zero" : "args=null", bad);
}
#endif
