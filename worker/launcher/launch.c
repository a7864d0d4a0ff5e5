/*
 * taskhost-launch: how a root worker starts a job as another user.
 *
 *   taskhost-launch UID GID PROGRAM [ARG...]
 *
 * Drops every supplementary group, switches real, effective and saved group
 * and user ids to GID and UID (in that order, so the user switch cannot be
 * undone), then executes PROGRAM. It does what
 * `setpriv --reuid=UID --regid=GID --clear-groups -- PROGRAM ARG...` does,
 * but it is linked statically and does nothing else (no locale, no
 * capability library), so it costs about a third of setpriv per job.
 * worker/build.rs compiles it; the worker keeps it in a sealed memfd that
 * only root can reach (worker/src/sandbox.rs). Exit 126: the switch failed;
 * 127: PROGRAM could not be executed (as a shell reports it).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int parse_id(const char *s, unsigned *out) {
  char *end;
  errno = 0;
  unsigned long v = strtoul(s, &end, 10);
  if (errno != 0 || *s == '\0' || *end != '\0' || v > 0xfffffffeUL) return -1;
  *out = (unsigned)v;
  return 0;
}

int main(int argc, char **argv) {
  unsigned uid, gid;
  if (argc < 4 || parse_id(argv[1], &uid) || parse_id(argv[2], &gid)) {
    fputs("taskhost-launch: usage: taskhost-launch UID GID PROGRAM [ARG...]\n", stderr);
    return 126;
  }
  if (setgroups(0, NULL) != 0 || setresgid(gid, gid, gid) != 0 ||
      setresuid(uid, uid, uid) != 0) {
    fprintf(stderr, "taskhost-launch: cannot switch to uid %u gid %u: %s\n", uid, gid,
            strerror(errno));
    return 126;
  }
  execv(argv[3], argv + 3);
  fprintf(stderr, "taskhost-launch: cannot execute %s: %s\n", argv[3], strerror(errno));
  return 127;
}
