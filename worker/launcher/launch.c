/*
 * taskhost-launch: how a root worker starts a job as another user.
 *
 *   taskhost-launch UID GID PROGRAM [ARG...]
 *
 * Drops every supplementary group, switches real, effective and saved group
 * and user ids to GID and UID (in that order, so the user switch cannot be
 * undone), then executes PROGRAM with the environment it was given. It does
 * what `setpriv --reuid=UID --regid=GID --clear-groups -- PROGRAM ARG...`
 * does, and nothing else.
 *
 * It has no C library: its own entry point and six system calls. A static
 * C library's start-up alone (its CPU feature probe traps to the hypervisor
 * on a VM, then its relocations) cost more than everything else this
 * program does, on every job. worker/build.rs compiles it for x86-64 and
 * aarch64 (`-nostdlib -static`); the worker keeps it in a sealed memfd that
 * only root can reach (worker/src/sandbox.rs). Exit 126: the switch failed
 * (or bad arguments); 127: PROGRAM could not be executed (as a shell
 * reports it). The system calls act on this one thread, which is the whole
 * process: no C library's set-id broadcast is needed.
 */

typedef unsigned long word;

#if defined(__x86_64__)
enum { SYS_write = 1, SYS_execve = 59, SYS_exit_group = 231, SYS_setresuid = 117,
       SYS_setresgid = 119, SYS_setgroups = 116 };

static long sys3(long n, word a, word b, word c) {
  long ret;
  __asm__ volatile("syscall"
                   : "=a"(ret)
                   : "a"(n), "D"(a), "S"(b), "d"(c)
                   : "rcx", "r11", "memory");
  return ret;
}

/* The kernel starts a process with argc, argv[], NULL, envp[] at the stack
 * pointer; pass that to launch() with the stack aligned as the ABI wants. */
__asm__(".text\n"
        ".global _start\n"
        "_start:\n"
        "  xor %ebp, %ebp\n"
        "  mov %rsp, %rdi\n"
        "  and $-16, %rsp\n"
        "  call launch\n"
        "  ud2\n");
#elif defined(__aarch64__)
enum { SYS_write = 64, SYS_execve = 221, SYS_exit_group = 94, SYS_setresuid = 147,
       SYS_setresgid = 149, SYS_setgroups = 159 };

static long sys3(long n, word a, word b, word c) {
  register long x8 __asm__("x8") = n;
  register word x0 __asm__("x0") = a;
  register word x1 __asm__("x1") = b;
  register word x2 __asm__("x2") = c;
  __asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2) : "memory");
  return (long)x0;
}

__asm__(".text\n"
        ".global _start\n"
        "_start:\n"
        "  mov x29, #0\n"
        "  mov x30, #0\n"
        "  mov x0, sp\n"
        "  bl launch\n"
        "  brk #0\n");
#else
#error "taskhost-launch supports x86-64 and aarch64; elsewhere the worker uses setpriv"
#endif

static __attribute__((noreturn)) void quit(int code) {
  for (;;) sys3(SYS_exit_group, (word)code, 0, 0);
}

/* A message on stderr, built in a fixed buffer (never past its end). */
struct line {
  char text[512];
  word len;
};

static void add(struct line *l, const char *s) {
  while (*s && l->len < sizeof l->text - 1) l->text[l->len++] = *s++;
}

static void add_number(struct line *l, unsigned long v) {
  char digits[24];
  int n = 0;
  do {
    digits[n++] = (char)('0' + v % 10);
    v /= 10;
  } while (v);
  while (n && l->len < sizeof l->text - 1) l->text[l->len++] = digits[--n];
}

static __attribute__((noreturn)) void fail(struct line *l, long error, int code) {
  if (error) {
    add(l, " (errno ");
    add_number(l, (unsigned long)-error);
    add(l, ")");
  }
  add(l, "\n");
  sys3(SYS_write, 2, (word)l->text, l->len);
  quit(code);
}

/* A decimal id below 2^32 - 1 (which means "unchanged" to the kernel). */
static int parse_id(const char *s, word *out) {
  word v = 0;
  if (!*s) return -1;
  for (; *s; s++) {
    if (*s < '0' || *s > '9') return -1;
    v = v * 10 + (word)(*s - '0');
    if (v > 0xfffffffeUL) return -1;
  }
  *out = v;
  return 0;
}

__attribute__((noreturn, used)) void launch(word *sp) {
  word argc = sp[0];
  char **argv = (char **)(sp + 1);
  char **envp = argv + argc + 1;
  struct line l;
  l.len = 0; /* not `= {0}`: that could be a call to a memset we do not have */
  word uid, gid;
  if (argc < 4 || parse_id(argv[1], &uid) || parse_id(argv[2], &gid)) {
    add(&l, "taskhost-launch: usage: taskhost-launch UID GID PROGRAM [ARG...]");
    fail(&l, 0, 126);
  }
  long error = sys3(SYS_setgroups, 0, 0, 0);
  if (!error) error = sys3(SYS_setresgid, gid, gid, gid);
  if (!error) error = sys3(SYS_setresuid, uid, uid, uid);
  if (error) {
    add(&l, "taskhost-launch: cannot switch to uid ");
    add_number(&l, uid);
    add(&l, " gid ");
    add_number(&l, gid);
    fail(&l, error, 126);
  }
  error = sys3(SYS_execve, (word)argv[3], (word)(argv + 3), (word)envp);
  add(&l, "taskhost-launch: cannot execute ");
  add(&l, argv[3]);
  fail(&l, error, 127);
}
