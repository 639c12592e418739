/*
 * echo.c: a ClawTerm session from C, against `claw-agent echo`.
 *
 *   echo ENDPOINT TENANT AGENT TOKEN_HEX CREDS_FILE
 *       connects, echoes a greeting, then sends 200 numbered lines while the connection is
 *       dropped twice (as a network would) and checks that every echoed line comes back once,
 *       in order; then writes the session's credentials to CREDS_FILE and detaches.
 *   echo --resume CREDS_FILE
 *       resumes that session (another process), echoes once more and ends the session.
 *
 * Build: cc echo.c -I../include -L<target dir> -lclawterm   (or `pkg-config --cflags --libs clawterm`)
 * Exit status 0 when everything came back as it should.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "clawterm.h"

static int fail(const char *what) {
    fprintf(stderr, "echo.c: %s: %s\n", what, clawterm_last_error());
    return 1;
}

/* Reads until `want` bytes arrived (or 20 s without progress). */
static int read_exactly(clawterm_session *s, char *out, size_t want) {
    size_t got = 0;
    int idle = 0;
    while (got < want) {
        intptr_t n = clawterm_recv(s, (uint8_t *)out + got, want - got, 200);
        if (n < 0) return fail("recv");
        if (n == 0) {
            if (++idle > 100) {
                fprintf(stderr, "echo.c: timed out with %zu of %zu bytes\n", got, want);
                return 1;
            }
            continue;
        }
        idle = 0;
        got += (size_t)n;
    }
    return 0;
}

static int run(const char *endpoint, uint32_t tenant, uint32_t agent, const char *token, const char *creds_file) {
    clawterm_session *s = NULL;
    if (clawterm_connect(endpoint, tenant, agent, token, &s) != CLAWTERM_STATUS_OK) return fail("connect");
    const char *hello = "hello from C\n";
    char buf[256];
    if (clawterm_send(s, (const uint8_t *)hello, strlen(hello)) != CLAWTERM_STATUS_OK) return fail("send");
    if (read_exactly(s, buf, strlen(hello))) return 1;
    if (memcmp(buf, hello, strlen(hello)) != 0) { fprintf(stderr, "echo.c: wrong echo\n"); return 1; }
    printf("echo ok\n");

    /* 200 lines, the connection dropped after the 60th and the 140th. */
    size_t total = 0;
    char *want = malloc(200 * 32), *got = malloc(200 * 32);
    if (!want || !got) return 1;
    for (int i = 0; i < 200; i++) {
        int n = snprintf(want + total, 32, "line %03d\n", i);
        if (clawterm_send(s, (const uint8_t *)want + total, (size_t)n) != CLAWTERM_STATUS_OK) return fail("send");
        total += (size_t)n;
        if (i == 60 || i == 140) {
            if (clawterm_drop_connection(s) != CLAWTERM_STATUS_OK) return fail("drop");
        }
    }
    if (read_exactly(s, got, total)) return 1;
    if (memcmp(got, want, total) != 0) { fprintf(stderr, "echo.c: replay differs\n"); return 1; }
    printf("replay ok: %zu bytes once, in order\n", total);
    free(want);
    free(got);

    char *creds = clawterm_export(s);
    if (!creds) return fail("export");
    clawterm_string_free(creds);
    creds = clawterm_detach(s);
    if (!creds) return fail("detach");
    FILE *f = fopen(creds_file, "w");
    if (!f) { perror(creds_file); return 1; }
    fputs(creds, f);
    fclose(f);
    clawterm_string_free(creds);
    printf("detached\n");
    return 0;
}

static int resume(const char *creds_file) {
    FILE *f = fopen(creds_file, "r");
    if (!f) { perror(creds_file); return 1; }
    char json[4096];
    size_t n = fread(json, 1, sizeof json - 1, f);
    fclose(f);
    json[n] = 0;
    clawterm_session *s = NULL;
    if (clawterm_resume(json, &s) != CLAWTERM_STATUS_OK) return fail("resume");
    const char *msg = "resumed from another process\n";
    char buf[128];
    if (clawterm_send(s, (const uint8_t *)msg, strlen(msg)) != CLAWTERM_STATUS_OK) return fail("send");
    if (read_exactly(s, buf, strlen(msg))) return 1;
    if (memcmp(buf, msg, strlen(msg)) != 0) { fprintf(stderr, "echo.c: wrong echo after resume\n"); return 1; }
    printf("resume ok\n");
    clawterm_close(s);
    /* Bad input is an error with a message, never a crash. */
    clawterm_session *bad = NULL;
    if (clawterm_resume("{not json", &bad) == CLAWTERM_STATUS_OK || bad != NULL) return 1;
    if (clawterm_connect("127.0.0.1:1", 1, 1, "zz", &bad) != CLAWTERM_STATUS_ERR_INVALID) return 1;
    if (clawterm_send(NULL, NULL, 1) != CLAWTERM_STATUS_ERR_INVALID) return 1;
    printf("errors ok: %s\n", clawterm_last_error());
    return 0;
}

int main(int argc, char **argv) {
    printf("libclawterm %s\n", clawterm_version());
    if (argc == 3 && strcmp(argv[1], "--resume") == 0) return resume(argv[2]);
    if (argc != 6) {
        fprintf(stderr, "usage: echo ENDPOINT TENANT AGENT TOKEN_HEX CREDS_FILE | echo --resume CREDS_FILE\n");
        return 2;
    }
    return run(argv[1], (uint32_t)strtoul(argv[2], NULL, 10), (uint32_t)strtoul(argv[3], NULL, 10), argv[4], argv[5]);
}
