/* sqk-runner: the main() of an sqk artifact on targets that Python does not
 * load in-process (riscv64 under qemu-user, or a real board).
 *
 * Linked with sqk_runtime.c and a model object that defines
 * `const sqk_program sqk_model`. Tensors come in and go out as NumPy .npy
 * files so that the Python side can drive it with plain files:
 *
 *   runner [--consts FILE] [--input NAME=FILE.npy ...] [--output-dir DIR]
 *          [--threads N] [--runs N] [--profile] [--info] [--help]
 *
 * --profile prints, after each run, one line per step on stdout:
 *   profile RUN STEP NS NAME
 * (run and step from 0, NS the step's wall time in ns; see sqk_set_profile).
 *
 * Exit codes: 0 ok, 2 usage or input error, 3 runtime error (including out of
 * memory and I/O errors while writing outputs), 4 missing CPU feature.
 * Every error is one line "sqk-runner: error: ..." on stderr.
 */
#define _GNU_SOURCE
#include "sqk_runtime.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>

#if defined(__riscv)
#include <setjmp.h>
#include <signal.h>
#include <sys/auxv.h>
#endif

extern const sqk_program sqk_model;

#define EXIT_USAGE 2
#define EXIT_RUNTIME 3
#define EXIT_CPU 4
#define ALIGN 64
#define MAX_RANK 32

static void die(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("sqk-runner: error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(code);
}

/* 64-byte aligned allocation of at least one cache line (so empty tensors get
 * a real pointer); running out of memory is an error, never a crash. */
static void *xalloc(int64_t nbytes, const char *what) {
    size_t size = nbytes > ALIGN ? (size_t)nbytes : ALIGN;
    size = (size + ALIGN - 1) / ALIGN * ALIGN;
    void *p = NULL;
    if (nbytes < 0 || posix_memalign(&p, ALIGN, size) != 0)
        die(EXIT_RUNTIME, "out of memory allocating %" PRId64 " bytes for %s", nbytes, what);
    return p;
}

/* ---- dtypes ---- */

typedef struct {
    int64_t code;
    const char *name;  /* as in sqk.ir.dtypes */
    const char *descr; /* NumPy descr in a little-endian .npy header */
    int64_t itemsize;
} dtype_info;

static const dtype_info DTYPES[] = {
    {SQK_F32, "f32", "<f4", 4}, {SQK_F16, "f16", "<f2", 2}, {SQK_I64, "i64", "<i8", 8},
    {SQK_I32, "i32", "<i4", 4}, {SQK_I8, "i8", "|i1", 1},   {SQK_U8, "u8", "|u1", 1},
    {SQK_BOOL, "bool", "|b1", 1},
    /* i4 (packed int4) has no NumPy dtype: the runner cannot exchange it. */
};

static const dtype_info *dtype_by_code(int64_t code) {
    for (size_t i = 0; i < sizeof DTYPES / sizeof DTYPES[0]; i++)
        if (DTYPES[i].code == code) return &DTYPES[i];
    return NULL;
}

static const dtype_info *dtype_by_descr(const char *descr) {
    for (size_t i = 0; i < sizeof DTYPES / sizeof DTYPES[0]; i++)
        if (strcmp(DTYPES[i].descr, descr) == 0) return &DTYPES[i];
    return NULL;
}

static const char *dtype_name(int64_t code) {
    const dtype_info *d = dtype_by_code(code);
    return d ? d->name : (code == SQK_I4 ? "i4" : "?");
}

/* "[d0,d1,...]" into buf. */
static const char *shape_str(const int64_t *shape, int64_t rank, char *buf, size_t size) {
    size_t n = 0;
    buf[0] = '\0';
    n += (size_t)snprintf(buf + n, size - n, "[");
    for (int64_t i = 0; i < rank && n < size; i++)
        n += (size_t)snprintf(buf + n, size - n, "%s%" PRId64, i ? "," : "", shape[i]);
    if (n < size) snprintf(buf + n, size - n, "]");
    return buf;
}

/* The model's own metadata must agree with itself: nbytes = prod(shape) * itemsize. */
static void check_info(const sqk_tensor_info *t, const char *kind) {
    const dtype_info *d = dtype_by_code(t->dtype);
    if (!d) die(EXIT_USAGE, "%s '%s' has dtype %s, which the runner cannot exchange", kind, t->name, dtype_name(t->dtype));
    int64_t n = d->itemsize;
    for (int64_t i = 0; i < t->rank; i++) {
        if (t->shape[i] < 0 || (t->shape[i] > 0 && n > INT64_MAX / t->shape[i])) n = -1;
        if (n < 0) break;
        n *= t->shape[i];
    }
    if (t->rank < 0 || t->rank > MAX_RANK || n != t->nbytes)
        die(EXIT_RUNTIME, "the model's %s '%s' is inconsistent: %" PRId64 " bytes for its dtype and shape", kind,
            t->name, t->nbytes);
}

/* ---- .npy reading ---- */

typedef struct {
    char descr[32];
    int fortran;
    int64_t rank;
    int64_t shape[MAX_RANK];
} npy_header;

static const char *skip_ws(const char *p) {
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') p++;
    return p;
}

/* Points just past "'key':" (either quote style), or NULL. */
static const char *find_key(const char *h, const char *key) {
    char pat[32];
    for (int q = 0; q < 2; q++) {
        snprintf(pat, sizeof pat, q ? "\"%s\"" : "'%s'", key);
        const char *p = strstr(h, pat);
        if (p) {
            p = skip_ws(p + strlen(pat));
            return *p == ':' ? skip_ws(p + 1) : NULL;
        }
    }
    return NULL;
}

/* Parse the dict literal NumPy writes, e.g.
 * {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
 * Returns NULL on success or a description of what is wrong. */
static const char *parse_npy_dict(const char *h, npy_header *out) {
    const char *p = find_key(h, "descr");
    if (!p) return "no 'descr' in the header";
    if (*p != '\'' && *p != '"') return "unsupported 'descr' (structured dtypes are not supported)";
    char quote = *p++;
    size_t n = 0;
    while (*p && *p != quote && n + 1 < sizeof out->descr) out->descr[n++] = *p++;
    out->descr[n] = '\0';
    if (*p != quote) return "malformed 'descr'";

    p = find_key(h, "fortran_order");
    if (!p) return "no 'fortran_order' in the header";
    if (strncmp(p, "True", 4) == 0) out->fortran = 1;
    else if (strncmp(p, "False", 5) == 0) out->fortran = 0;
    else return "malformed 'fortran_order'";

    p = find_key(h, "shape");
    if (!p || *p != '(') return "no 'shape' tuple in the header";
    p = skip_ws(p + 1);
    out->rank = 0;
    while (*p != ')') {
        if (*p < '0' || *p > '9') return "malformed 'shape'";
        if (out->rank == MAX_RANK) return "'shape' has too many dimensions";
        char *end;
        errno = 0;
        long long d = strtoll(p, &end, 10);
        if (errno) return "a dimension in 'shape' is too large";
        out->shape[out->rank++] = d;
        p = skip_ws(end);
        if (*p == 'L') p = skip_ws(p + 1); /* Python 2 longs */
        if (*p == ',') p = skip_ws(p + 1);
        else if (*p != ')') return "malformed 'shape'";
    }
    return NULL;
}

static uint32_t le32(const unsigned char *b) {
    return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
}

/* Read input `t` from a .npy file into a fresh 64-byte aligned buffer; any
 * mismatch with what the model expects is a usage error naming the input. */
static void *read_npy(const char *path, const sqk_tensor_info *t) {
    const dtype_info *want = dtype_by_code(t->dtype); /* known: check_info ran */
    FILE *f = fopen(path, "rb");
    if (!f) die(EXIT_USAGE, "input '%s': cannot open %s: %s", t->name, path, strerror(errno));

    unsigned char pre[12];
    if (fread(pre, 1, 10, f) != 10 || memcmp(pre, "\x93NUMPY", 6) != 0)
        die(EXIT_USAGE, "input '%s': %s is not a .npy file (bad magic or truncated)", t->name, path);
    unsigned major = pre[6];
    uint32_t hlen;
    if (major == 1) {
        hlen = (uint32_t)pre[8] | (uint32_t)pre[9] << 8;
    } else if (major == 2 || major == 3) { /* 3.0 only differs by a UTF-8 header */
        if (fread(pre + 10, 1, 2, f) != 2) die(EXIT_USAGE, "input '%s': %s: truncated .npy header", t->name, path);
        hlen = le32(pre + 8);
    } else {
        die(EXIT_USAGE, "input '%s': %s: unsupported .npy format version %u.%u", t->name, path, major, pre[7]);
    }
    if (hlen > (1u << 20)) die(EXIT_USAGE, "input '%s': %s: implausible .npy header length %u", t->name, path, hlen);
    char *h = malloc(hlen + 1);
    if (!h) die(EXIT_RUNTIME, "out of memory reading %s", path);
    if (fread(h, 1, hlen, f) != hlen) die(EXIT_USAGE, "input '%s': %s: truncated .npy header", t->name, path);
    h[hlen] = '\0';
    npy_header hd;
    const char *err = parse_npy_dict(h, &hd);
    free(h);
    if (err) die(EXIT_USAGE, "input '%s': %s: bad .npy header: %s", t->name, path, err);

    char want_shape[512], got_shape[512];
    shape_str(t->shape, t->rank, want_shape, sizeof want_shape);
    shape_str(hd.shape, hd.rank, got_shape, sizeof got_shape);
    if (hd.fortran)
        die(EXIT_USAGE, "input '%s': %s is in Fortran order; save a C-contiguous array (numpy.ascontiguousarray)", t->name, path);
    const dtype_info *got = dtype_by_descr(hd.descr);
    if (got != want)
        die(EXIT_USAGE, "input '%s': expected dtype %s ('%s'), found '%s' in %s%s", t->name, want->name,
            want->descr, hd.descr, path, hd.descr[0] == '>' ? " (big-endian files are not supported)" : "");
    int same = hd.rank == t->rank;
    for (int64_t i = 0; same && i < t->rank; i++) same = hd.shape[i] == t->shape[i];
    if (!same)
        die(EXIT_USAGE, "input '%s': expected shape %s %s, found %s %s in %s", t->name, want->name, want_shape,
            got->name, got_shape, path);

    void *data = xalloc(t->nbytes, t->name);
    size_t n = fread(data, 1, (size_t)t->nbytes, f);
    if (n != (size_t)t->nbytes)
        die(EXIT_USAGE, "input '%s': %s is truncated: expected %" PRId64 " bytes of data, found %zu", t->name, path,
            t->nbytes, n);
    if (fgetc(f) != EOF)
        die(EXIT_USAGE, "input '%s': %s has bytes after the array data (corrupt or not a single array)", t->name, path);
    fclose(f);
    return data;
}

/* ---- .npy writing (format 1.0, header padded to 64 bytes like NumPy) ---- */

static int write_npy(const char *path, const sqk_tensor_info *t, const void *data) {
    const dtype_info *d = dtype_by_code(t->dtype);
    char shape[600];
    size_t n = 0;
    shape[n++] = '(';
    for (int64_t i = 0; i < t->rank && n < sizeof shape - 32; i++)
        n += (size_t)snprintf(shape + n, sizeof shape - n, "%s%" PRId64, i ? ", " : "", t->shape[i]);
    snprintf(shape + n, sizeof shape - n, t->rank == 1 ? ",)" : ")");

    char header[1024];
    int len = snprintf(header + 10, sizeof header - 10, "{'descr': '%s', 'fortran_order': False, 'shape': %s, }",
                       d->descr, shape);
    if (len < 0 || (size_t)len + 10 + 64 >= sizeof header) return -1;
    size_t total = 10 + (size_t)len + 1; /* + '\n' */
    size_t padded = (total + 63) / 64 * 64;
    memset(header + 10 + len, ' ', padded - total);
    header[padded - 1] = '\n';
    memcpy(header, "\x93NUMPY\x01\x00", 8);
    header[8] = (char)((padded - 10) & 0xff);
    header[9] = (char)((padded - 10) >> 8);

    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    int ok = fwrite(header, 1, padded, f) == padded &&
             fwrite(data, 1, (size_t)t->nbytes, f) == (size_t)t->nbytes;
    ok = (fclose(f) == 0) && ok;
    return ok ? 0 : -1;
}

/* ---- constants ---- */

static void *read_consts(const char *path, int64_t want) {
    FILE *f = fopen(path, "rb");
    if (!f) die(EXIT_USAGE, "cannot open the constants file %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) != 0) die(EXIT_USAGE, "cannot stat %s: %s", path, strerror(errno));
    if ((int64_t)st.st_size != want)
        die(EXIT_USAGE, "constants file %s has %lld bytes, the model expects %" PRId64, path, (long long)st.st_size,
            want);
    void *data = xalloc(want, "the constants");
    if (fread(data, 1, (size_t)want, f) != (size_t)want) die(EXIT_USAGE, "cannot read %s", path);
    fclose(f);
    return data;
}

/* The string value of the first "key": "..." in a JSON text (no escapes in the
 * values looked up here), copied into out; 0 when absent. */
static int json_string(const char *text, const char *key, char *out, size_t cap) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\": \"", key);
    const char *at = strstr(text, pat);
    if (!at) return 0;
    at += strlen(pat);
    size_t n = 0;
    while (at[n] && at[n] != '"' && n + 1 < cap) n++;
    memcpy(out, at, n);
    out[n] = 0;
    return 1;
}

/* A manifest.json beside the constants file must describe this runner's model:
 * a riscv64 artifact of the same name.  (A host artifact's constants can have
 * the right size; its manifest tells it apart.) */
static void check_manifest(const char *consts_path, const sqk_program *p) {
    char path[4096];
    const char *slash = strrchr(consts_path, '/');
    int dir = slash ? (int)(slash - consts_path) : 1;
    snprintf(path, sizeof path, "%.*s/manifest.json", dir, slash ? consts_path : ".");
    FILE *f = fopen(path, "rb");
    if (!f) return;  /* constants given without their artifact directory: the size check stands alone */
    static char text[1 << 16];
    size_t n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[n] = 0;
    char triple[128], name[256];
    if (json_string(text, "triple", triple, sizeof triple) && strncmp(triple, "riscv64", 7) != 0)
        die(EXIT_USAGE, "%s describes an artifact for %s, not riscv64: this runner cannot use its constants "
            "(load that artifact with sqk on its own machine)", path, triple);
    if (json_string(text, "name", name, sizeof name) && strcmp(name, p->name) != 0)
        die(EXIT_USAGE, "%s describes model '%s', this runner holds model '%s'", path, name, p->name);
}

/* ---- CPU features ---- */

#if defined(__riscv)
static sigjmp_buf probe_jmp;
static void probe_sigill(int sig) {
    (void)sig;
    siglongjmp(probe_jmp, 1);
}

/* Does this CPU (and kernel) run RVV 1.0 code?
 * First AT_HWCAP bit 'V': Linux >= 6.5 sets it when it supports V, and
 * Debian's qemu-user 7.2 sets it for `-cpu rv64,v=true` (checked: HWCAP
 * 0x20112d = ACDFIMV with v=true, 0x112d = ACDFIM with v=false). Older
 * qemu-user builds and vendor kernels are not all as careful, and a missing
 * bit must not refuse a CPU that has V, so when the bit is absent we probe:
 * read the vlenb CSR (0xc22) with a SIGILL handler installed. Without V (or
 * with a kernel that does not enable it) the read traps; with V it returns
 * VLEN/8 >= 16. The CSR is named by number so
 * this file builds with the default -march=rv64gc. */
static int cpu_has_vector(void) {
#ifndef SQK_RUNNER_PROBE_ONLY /* tests define it to exercise the probe under qemu */
    if (getauxval(AT_HWCAP) & (1UL << ('V' - 'A'))) return 1;
#endif
    struct sigaction sa, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = probe_sigill;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGILL, &sa, &old) != 0) return 0;
    volatile unsigned long vlenb = 0;
    if (sigsetjmp(probe_jmp, 1) == 0) {
        unsigned long v;
        __asm__ volatile("csrr %0, 0xc22" : "=r"(v));
        vlenb = v;
    }
    sigaction(SIGILL, &old, NULL);
    return vlenb >= 16;
}
#endif

static void check_cpu(const sqk_program *p) {
#if defined(__riscv)
    if (p->needs_vector && !cpu_has_vector())
        die(EXIT_CPU, "this artifact was compiled for RISC-V with the vector extension (V), but this CPU does not "
                      "report it");
#else
    (void)p;
#endif
}

/* ---- command line ---- */

static void print_tensors(FILE *out, const char *kind, const sqk_tensor_info *t, int64_t n) {
    char buf[512];
    for (int64_t i = 0; i < n; i++)
        fprintf(out, "%s %s %s %s\n", kind, t[i].name, dtype_name(t[i].dtype),
                shape_str(t[i].shape, t[i].rank, buf, sizeof buf));
}

static void print_info(void) {
    const sqk_program *p = &sqk_model;
    printf("program %s\n", p->name ? p->name : "");
    printf("abi_version %" PRId64 "\n", p->abi_version);
    print_tensors(stdout, "input", p->inputs, p->n_inputs);
    print_tensors(stdout, "output", p->outputs, p->n_outputs);
    printf("arena_bytes %" PRId64 "\n", p->arena_bytes);
    printf("const_bytes %" PRId64 "\n", p->const_bytes);
    printf("steps %" PRId64 "\n", p->n_steps);
    printf("needs_vector %" PRId64 "\n", p->needs_vector);
}

static void print_help(const char *argv0) {
    const sqk_program *p = &sqk_model;
    printf("usage: %s [--consts FILE] [--input NAME=FILE.npy ...] [--output-dir DIR]\n"
           "       %*s [--threads N] [--runs N] [--profile] [--info] [--help]\n\n",
           argv0, (int)strlen(argv0), "");
    printf("Runs the sqk model '%s': reads every input from a NumPy .npy file\n"
           "(little-endian, C order, format 1.0/2.0/3.0), runs the model and writes each\n"
           "output to DIR/NAME.npy (characters of NAME outside [A-Za-z0-9_.-] become '_').\n\n",
           p->name ? p->name : "");
    printf("  --consts FILE      the packed constants (%" PRId64 " bytes)%s\n", p->const_bytes,
           p->const_bytes ? "" : "; optional, this model has none");
    printf("  --input NAME=FILE  one per model input, each exactly once\n"
           "  --output-dir DIR   where outputs are written (default: current directory)\n"
           "  --threads N        worker threads (default 0: $SQK_NUM_THREADS or all CPUs)\n"
           "  --runs N           run the model N times (default 1); outputs are the last run's\n"
           "  --profile          after each run print 'profile RUN STEP NS NAME' per step\n"
           "  --info             print the model's inputs, outputs and sizes, then exit\n"
#ifdef SQK_RUNNER_GENERATE
           "  --generate --prompt-ids ID,... [-n N] [--temperature T] [--top-k K] [--top-p P] [--seed S]\n"
           "      [--stop ID,...] [--consts FILE ...] [--state-dir DIR] [--timing]\n"
           "                     (first option) prefill the prompt, then decode up to N tokens (default 32;\n"
           "                     greedy at temperature 0), printing each new id on a line\n"
#endif
           "\n"
           "Exit codes: 0 ok, 2 usage/input error, 3 runtime error, 4 missing CPU feature.\n\n");
    print_tensors(stdout, "input", p->inputs, p->n_inputs);
    print_tensors(stdout, "output", p->outputs, p->n_outputs);
}

/* Output file name: keep it inside DIR whatever the tensor is called. */
static void output_path(char *buf, size_t size, const char *dir, const char *name) {
    int n = snprintf(buf, size, "%s/", dir);
    for (const char *c = name; *c && (size_t)n + 5 < size; c++) {
        int ok = (*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') || *c == '_' ||
                 *c == '-' || (*c == '.' && c != name);
        buf[n++] = ok ? *c : '_';
    }
    snprintf(buf + n, size - (size_t)n, ".npy");
}

#ifdef SQK_RUNNER_GENERATE
#include "runner_generate.c" /* --generate: an LLM's prefill and decode loop (that file's header) */
#endif

int main(int argc, char **argv) {
    const sqk_program *p = &sqk_model;
#ifdef SQK_RUNNER_GENERATE
    if (argc > 1 && strcmp(argv[1], "--generate") == 0) return generate_main(argc, argv);
#endif
    const char *consts_path = NULL, *out_dir = ".";
    long long threads = 0, runs = 1;
    int info = 0, profile = 0;
    /* inputs given on the command line, by model input index */
    const char **in_path = calloc((size_t)(p->n_inputs > 0 ? p->n_inputs : 1), sizeof *in_path);
    if (!in_path) die(EXIT_RUNTIME, "out of memory");

    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i], *val = NULL;
        char opt[32];
        /* accept both "--opt value" and "--opt=value" */
        const char *eq = strncmp(arg, "--", 2) == 0 ? strchr(arg, '=') : NULL;
        size_t olen = eq ? (size_t)(eq - arg) : strlen(arg);
        if (olen >= sizeof opt) die(EXIT_USAGE, "unknown option '%s' (see --help)", arg);
        memcpy(opt, arg, olen);
        opt[olen] = '\0';
        if (strcmp(opt, "--help") == 0 || strcmp(opt, "-h") == 0) {
            print_help(argv[0]);
            free(in_path);
            return 0;
        }
        if (strcmp(opt, "--info") == 0) {
            info = 1;
            continue;
        }
        if (strcmp(opt, "--profile") == 0) {
            profile = 1;
            continue;
        }
        if (strcmp(opt, "--consts") && strcmp(opt, "--input") && strcmp(opt, "--output-dir") &&
            strcmp(opt, "--threads") && strcmp(opt, "--runs"))
            die(EXIT_USAGE, "unknown option '%s' (see --help)", arg);
        if (eq) val = eq + 1;
        else if (i + 1 < argc) val = argv[++i];
        else die(EXIT_USAGE, "option %s needs a value", opt);

        if (strcmp(opt, "--consts") == 0) {
            consts_path = val;
        } else if (strcmp(opt, "--output-dir") == 0) {
            out_dir = val;
        } else if (strcmp(opt, "--threads") == 0) {
            char *end;
            errno = 0;
            threads = strtoll(val, &end, 10);
            if (errno || *val == '\0' || *end != '\0' || threads < 0)
                die(EXIT_USAGE, "--threads needs a number >= 0, got '%s'", val);
        } else if (strcmp(opt, "--runs") == 0) {
            char *end;
            errno = 0;
            runs = strtoll(val, &end, 10);
            if (errno || *val == '\0' || *end != '\0' || runs < 1)
                die(EXIT_USAGE, "--runs needs a number >= 1, got '%s'", val);
        } else { /* --input NAME=FILE */
            const char *sep = strchr(val, '=');
            if (!sep || sep == val) die(EXIT_USAGE, "--input needs NAME=FILE.npy, got '%s'", val);
            int64_t k = -1;
            for (int64_t j = 0; j < p->n_inputs; j++)
                if (strlen(p->inputs[j].name) == (size_t)(sep - val) &&
                    strncmp(p->inputs[j].name, val, (size_t)(sep - val)) == 0)
                    k = j;
            if (k < 0) {
                char names[1024] = "";
                size_t n = 0;
                for (int64_t j = 0; j < p->n_inputs && n < sizeof names; j++)
                    n += (size_t)snprintf(names + n, sizeof names - n, "%s'%s'", j ? ", " : "", p->inputs[j].name);
                die(EXIT_USAGE, "unknown input '%.*s'; the model's inputs are: %s", (int)(sep - val), val,
                    p->n_inputs ? names : "(none)");
            }
            if (in_path[k]) die(EXIT_USAGE, "input '%s' is given more than once", p->inputs[k].name);
            in_path[k] = sep + 1;
        }
    }
    if (info) {
        print_info();
        free(in_path);
        return 0;
    }

    if (p->abi_version != SQK_ABI_VERSION)
        die(EXIT_RUNTIME, "the model was built for runtime ABI %" PRId64 ", this runner has ABI %d", p->abi_version,
            SQK_ABI_VERSION);
    check_cpu(p);
    for (int64_t j = 0; j < p->n_inputs; j++)
        if (!in_path[j]) die(EXIT_USAGE, "missing input '%s' (give --input %s=FILE.npy)", p->inputs[j].name, p->inputs[j].name);
    for (int64_t j = 0; j < p->n_inputs; j++) check_info(&p->inputs[j], "input");
    for (int64_t j = 0; j < p->n_outputs; j++) check_info(&p->outputs[j], "output");
    if (p->const_bytes > 0 && !consts_path)
        die(EXIT_USAGE, "the model needs its constants file (%" PRId64 " bytes): give --consts FILE", p->const_bytes);

    if (consts_path) check_manifest(consts_path, p);
    void *consts = consts_path ? read_consts(consts_path, p->const_bytes) : NULL;
    void **inputs = calloc((size_t)(p->n_inputs > 0 ? p->n_inputs : 1), sizeof *inputs);
    void **outputs = calloc((size_t)(p->n_outputs > 0 ? p->n_outputs : 1), sizeof *outputs);
    if (!inputs || !outputs) die(EXIT_RUNTIME, "out of memory");
    for (int64_t j = 0; j < p->n_inputs; j++) inputs[j] = read_npy(in_path[j], &p->inputs[j]);
    for (int64_t j = 0; j < p->n_outputs; j++) {
        outputs[j] = xalloc(p->outputs[j].nbytes, p->outputs[j].name);
        memset(outputs[j], 0, (size_t)p->outputs[j].nbytes);
    }

    sqk_context *ctx = sqk_context_new((int64_t)threads);
    if (!ctx) die(EXIT_RUNTIME, "could not start the thread pool (%s)", sqk_error_string(SQK_ERR_THREADS));
    int32_t rc = profile ? sqk_set_profile(ctx, 1) : SQK_OK;
    int64_t *prev_ns = calloc((size_t)(p->n_steps > 0 ? p->n_steps : 1), sizeof *prev_ns);
    if (!prev_ns) die(EXIT_RUNTIME, "out of memory");
    for (long long r = 0; r < runs && rc == SQK_OK; r++) {
        rc = sqk_run(ctx, p, inputs, outputs, consts, p->const_bytes);
        for (int64_t i = 0; profile && rc == SQK_OK && i < p->n_steps; i++) {
            sqk_step_profile sp;
            sqk_profile(ctx, i, &sp);
            printf("profile %lld %" PRId64 " %" PRId64 " %s\n", r, i, sp.ns - prev_ns[i],
                   p->steps[i].name ? p->steps[i].name : "?");
            prev_ns[i] = sp.ns;
        }
    }
    free(prev_ns);
    if (rc != SQK_OK) {
        int64_t step = sqk_context_error_step(ctx);
        sqk_context_free(ctx); /* join the pool before exiting */
        if (step >= 0 && step < p->n_steps)
            die(EXIT_RUNTIME, "step %" PRId64 " (kernel '%s') failed: %s (code %d)", step,
                p->steps[step].name ? p->steps[step].name : "?", sqk_error_string(rc), rc);
        die(EXIT_RUNTIME, "run failed: %s (code %d)", sqk_error_string(rc), rc);
    }
    sqk_context_free(ctx);

    if (mkdir(out_dir, 0777) != 0 && errno != EEXIST)
        die(EXIT_RUNTIME, "cannot create the output directory %s: %s", out_dir, strerror(errno));
    for (int64_t j = 0; j < p->n_outputs; j++) {
        char path[4096];
        output_path(path, sizeof path, out_dir, p->outputs[j].name);
        if (write_npy(path, &p->outputs[j], outputs[j]) != 0)
            die(EXIT_RUNTIME, "cannot write output '%s' to %s: %s", p->outputs[j].name, path, strerror(errno));
    }

    for (int64_t j = 0; j < p->n_inputs; j++) free(inputs[j]);
    for (int64_t j = 0; j < p->n_outputs; j++) free(outputs[j]);
    free(inputs);
    free(outputs);
    free(consts);
    free(in_path);
    return 0;
}
