/*
 * fuzz_ruby.c — embeds Ruby in a libFuzzer target and loads the gem into it.
 *
 * The gem is the real one: lib/ copied to tmp/fuzz/lib with a flowctl.so built by
 * extconf.rb --enable-fuzz (ASan + UBSan + coverage), required with `require`. The
 * sanitizer and libFuzzer runtimes live in this executable (linked -rdynamic) and
 * serve the extension too.
 */
#include "fuzz_ruby.h"
#include <dlfcn.h>
#include <sanitizer/asan_interface.h>
#include <sanitizer/lsan_interface.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#ifndef FUZZ_LIB
#define FUZZ_LIB "tmp/fuzz/lib"
#endif
#ifndef FUZZ_SRC
#define FUZZ_SRC "fuzz"
#endif
#ifndef FUZZ_GEN
#define FUZZ_GEN "spec/gen"
#endif

fuzz_class fuzz_classes[FUZZ_MAX_CLASSES];
int fuzz_n_classes;
VALUE fuzz_eDecodeError;

struct call_args {
    VALUE recv;
    ID mid;
    int argc;
    const VALUE *argv;
};

static VALUE
call_body(VALUE p)
{
    struct call_args *a = (struct call_args *)p;
    return rb_funcallv(a->recv, a->mid, a->argc, a->argv);
}

VALUE
fuzz_call(VALUE recv, ID mid, int argc, const VALUE *argv, VALUE *err)
{
    struct call_args a = {recv, mid, argc, argv};
    int state = 0;
    VALUE r = rb_protect(call_body, (VALUE)&a, &state);
    if (!state) return r;
    fuzz_after_jump();
    *err = rb_errinfo();
    rb_set_errinfo(Qnil);
    if (NIL_P(*err)) fuzz_bug("non-exception jump (tag %d) out of %s", state, rb_id2name(mid));
    return Qundef;
}

/*
 * Ruby raises with __builtin_longjmp, which ASan does not intercept: the frames it
 * jumps over keep their redzones poisoned, and a later write to that stack (a
 * sigaltstack call, uninstrumented code) would be reported. After every caught
 * exception the stack below the current frame is unpoisoned.
 */
void
fuzz_after_jump(void)
{
    __asan_handle_no_return();
}

static const char *
describe(VALUE v)
{
    int state = 0;
    VALUE s = rb_protect(rb_inspect, v, &state);
    if (state) {
        rb_set_errinfo(Qnil);
        return "(inspect raised)";
    }
    return StringValueCStr(s);
}

void
fuzz_bug(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    VALUE text = rb_vsprintf(fmt, ap); /* knows PRIsVALUE */
    va_end(ap);
    fprintf(stderr, "\n==fuzz== BUG: %s\n", StringValueCStr(text));
    fflush(stderr);
    abort();
}

const char *
fuzz_error_text(VALUE err)
{
    VALUE text = rb_funcall(err, rb_intern("message"), 0);
    return StringValueCStr(text);
}

void
fuzz_expect(VALUE err, const VALUE *allowed, const char *what)
{
    for (const VALUE *k = allowed; *k; k++)
        if (rb_obj_is_kind_of(err, *k)) return;
    VALUE bt = rb_funcall(err, rb_intern("backtrace"), 0);
    fuzz_bug("%s raised an unexpected %s: %s\n  backtrace: %s", what, rb_obj_classname(err),
             describe(rb_funcall(err, rb_intern("message"), 0)), describe(bt));
}

/*
 * When == says no, the messages are compared again as to_h with NaN equal to NaN, map
 * order ignored, Strings by their UTF-8 bytes (as the setter converts them) and Integers against Floats by value: what a
 * caller may put in place into a Hash or Array a message returned (an Integer in a
 * map<string, double>, a binary String key) is encoded as the field's type, so the
 * decoded copy holds the converted value; two such keys that convert to the same UTF-8
 * bytes are two entries on the wire, and the last one wins when decoded.
 */
static const char canon_rb[] =
    "module FuzzCanon\n"
    "  RELABEL = [Encoding::BINARY, Encoding::US_ASCII, Encoding::UTF_8]\n"
    "  def self.s(x) = RELABEL.include?(x.encoding) ? x.b : (x.encode('UTF-8').b rescue x.b)\n"
    "  def self.eq(a, b)\n"
    "    case a\n"
    "    when Hash\n"
    "      return false unless b.is_a?(Hash)\n"
    "      aa, bb = [a, b].map { |h| h.each_with_object({}) { |(k, v), o| o[k.is_a?(String) ? s(k) : k] = v } }\n"
    "      aa.size == bb.size && aa.all? { |k, v| bb.key?(k) && eq(v, bb[k]) }\n"
    "    when Array then b.is_a?(Array) && a.size == b.size && a.zip(b).all? { |x, y| eq(x, y) }\n"
    "    when Float then b.is_a?(Numeric) && (a.nan? ? b.to_f.nan? : a == b.to_f)\n"
    "    when Integer then b.is_a?(Float) ? eq(b, a) : a == b\n"
    "    when String then b.is_a?(String) && s(a) == s(b)\n"
    "    else a == b\n"
    "    end\n"
    "  end\n"
    "  def self.same?(a, b) = a == b || eq(a.to_h, b.to_h)\n"
    "end\n";
static VALUE mCanon;

int
fuzz_same_message(VALUE a, VALUE b)
{
    return RTEST(rb_funcall(mCanon, rb_intern("same?"), 2, a, b));
}

/* GC.compact every FUZZ_COMPACT_EVERY executions (default 20000; 0: never), a full GC every 2000. */
void
fuzz_gc_tick(void)
{
    static unsigned long n;
    static long every = -1;
    if (every < 0) {
        const char *e = getenv("FUZZ_COMPACT_EVERY");
        every = e && *e ? atol(e) : 20000;
        if (every < 0) every = 20000;
    }
    n++;
    if (every > 0 && n % (unsigned long)every == 0) rb_funcall(rb_mGC, rb_intern("compact"), 0);
    else if (n % 2000 == 0) rb_gc_start();
    fuzz_lsan_roots();
}

/*
 * LeakSanitizer only scans the heap, stacks and globals. Ruby 3.1 keeps its object
 * slots in mmap'ed pages, so memory that only a Ruby object points to (a String's
 * buffer, a typed-data struct) would look leaked. Every heap page is registered as a
 * root region once; pages Ruby unmaps later are skipped by LSan (it scans only mapped
 * memory), so a stale region costs nothing.
 */
void rb_objspace_each_objects(int (*callback)(void *, void *, size_t, void *), void *data);
static st_table *root_pages;

static int
register_page(void *start, void *end, size_t stride, void *unused)
{
    size_t len = (size_t)((char *)end - (char *)start);
    st_data_t key = (st_data_t)start ^ (st_data_t)len;
    if (!st_lookup(root_pages, key, NULL)) {
        st_insert(root_pages, key, 1);
        __lsan_register_root_region(start, len);
    }
    return 0;
}

void
fuzz_lsan_roots(void)
{
    if (!root_pages) root_pages = st_init_numtable();
    rb_objspace_each_objects(register_page, NULL);
}

static VALUE
require_gem(VALUE unused)
{
    const char *lib = getenv("FLOWCTL_FUZZ_LIB");
    VALUE path = rb_str_new_cstr(lib ? lib : FUZZ_LIB);
    rb_ary_unshift(rb_gv_get("$LOAD_PATH"), path);
    return rb_require("flowctl");
}

/* The extension's own registry (generated/registry.c), found in the loaded flowctl.so. */
static const ProtobufCMessageDescriptor *const *registry;

static const ProtobufCMessageDescriptor *
descriptor_named(const char *name)
{
    for (const ProtobufCMessageDescriptor *const *d = registry; *d; d++)
        if (strcmp((*d)->name, name) == 0) return *d;
    return NULL;
}

static int
by_name(const void *a, const void *b)
{
    return strcmp(((const fuzz_class *)a)->desc->name, ((const fuzz_class *)b)->desc->name);
}

static void
collect_classes(void)
{
    VALUE native = rb_path2class("Flowctl::Native");
    registry = dlsym(RTLD_DEFAULT, "flowctl_registry_messages");
    if (!registry) fuzz_bug("flowctl_registry_messages is not in the loaded flowctl.so: %s", dlerror());
    for (const ProtobufCMessageDescriptor *const *d = registry; *d; d++) {
        VALUE name = rb_str_new_cstr((*d)->name), err;
        VALUE k = fuzz_call(native, rb_intern("message_class"), 1, &name, &err);
        if (k == Qundef) continue; /* map entries and Timestamp have no class */
        if (fuzz_n_classes == FUZZ_MAX_CLASSES) fuzz_bug("more than %d message classes", FUZZ_MAX_CLASSES);
        fuzz_class *c = &fuzz_classes[fuzz_n_classes++];
        c->klass = k;
        c->desc = descriptor_named(StringValueCStr(name));
        c->fields = rb_funcall(k, rb_intern("fields"), 0);
        c->setters = rb_ary_new();
        for (long i = 0; i < RARRAY_LEN(c->fields); i++)
            rb_ary_push(c->setters, rb_to_symbol(rb_sprintf("%"PRIsVALUE"=", rb_sym2str(RARRAY_AREF(c->fields, i)))));
        rb_gc_register_mark_object(c->fields);
        rb_gc_register_mark_object(c->setters);
    }
    if (fuzz_n_classes == 0) fuzz_bug("the gem defined no message classes");
    /* by full name, so that an input's first byte picks the same class as in fuzz/seeds.rb */
    qsort(fuzz_classes, (size_t)fuzz_n_classes, sizeof(fuzz_class), by_name);
}

static VALUE
require_official(VALUE dir)
{
    rb_ary_unshift(rb_gv_get("$LOAD_PATH"), dir);
    rb_require("google/protobuf");
    rb_require("controlplane/controlplane_pb");
    rb_require("processor/processor_pb");
    return rb_require("common/common_pb");
}

VALUE
fuzz_official_class(const char *full_name)
{
    VALUE pool = rb_eval_string("Google::Protobuf::DescriptorPool.generated_pool");
    VALUE d = rb_funcall(pool, rb_intern("lookup"), 1, rb_str_new_cstr(full_name));
    if (NIL_P(d)) fuzz_bug("google-protobuf has no message %s", full_name);
    return rb_funcall(d, rb_intern("msgclass"), 0);
}

static VALUE
require_checker(VALUE path)
{
    return rb_require(StringValueCStr(path));
}

VALUE
fuzz_load_checker(const char *file, const char *klass)
{
    VALUE path = rb_sprintf("%s/%s", FUZZ_SRC, file);
    int state = 0;
    /* what loading the oracle (psych, json, did_you_mean) and its first uses allocate
     * lives as long as Ruby: made with LSan off, as fuzz_ruby_init does for the gem */
    __lsan_disable();
    rb_protect(require_checker, path, &state);
    if (state) {
        rb_p(rb_errinfo());
        fuzz_bug("could not load %"PRIsVALUE, path);
    }
    VALUE k = rb_path2class(klass);
    rb_gc_register_mark_object(k); /* pinned: GC.compact must not move it under us */
    rb_funcall(k, rb_intern("warm_up"), 0);
    fuzz_lsan_roots();
    __lsan_enable();
    return k;
}

void
fuzz_load_official(void)
{
    const char *gen = getenv("FLOWCTL_FUZZ_GEN");
    int state = 0;
    __lsan_disable();
    rb_protect(require_official, rb_str_new_cstr(gen ? gen : FUZZ_GEN), &state);
    if (state) {
        rb_p(rb_errinfo());
        fuzz_bug("could not load google-protobuf and the classes of spec/gen");
    }
    fuzz_lsan_roots();
    __lsan_enable();
}

void
fuzz_ruby_init(int *argc, char ***argv)
{
    static char *opts[] = {"fuzz", "-e", "", NULL};
    /* What Ruby and the gem allocate to start up stays for the life of the process
     * (Ruby 3.1 never frees it, some of it only reachable from its own mmap'ed
     * arenas): LSan ignores allocations made while it is disabled. */
    __lsan_disable();
    /* ASan's SIGSEGV/SIGBUS handlers, put back once Ruby has installed its own: a wild
     * access gets ASan's report. GC.compact still installs its read barrier for as
     * long as it runs (ASAN_OPTIONS=allow_user_segv_handler=1) and falls back to these. */
    struct sigaction asan_segv, asan_bus;
    sigaction(SIGSEGV, NULL, &asan_segv);
    sigaction(SIGBUS, NULL, &asan_bus);
    ruby_sysinit(argc, argv);
    {
        RUBY_INIT_STACK;
        ruby_init();
        ruby_options(3, opts); /* encodings, load path, rubygems; the empty script never runs */
    }
    sigaction(SIGSEGV, &asan_segv, NULL);
    sigaction(SIGBUS, &asan_bus, NULL);
    /* Ruby traps SIGALRM, SIGINT, SIGTERM...: libFuzzer keeps a handler it finds, and
     * needs its own (SIGALRM is its -timeout clock) */
    signal(SIGALRM, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    signal(SIGUSR1, SIG_DFL);
    signal(SIGUSR2, SIG_DFL);
    int state = 0;
    rb_protect(require_gem, Qnil, &state);
    if (state) {
        rb_p(rb_errinfo());
        fuzz_bug("could not require the gem from %s", FUZZ_LIB);
    }
    rb_eval_string(canon_rb);
    mCanon = rb_path2class("FuzzCanon");
    fuzz_eDecodeError = rb_path2class("Flowctl::DecodeError");
    collect_classes();
    fuzz_lsan_roots();
    __lsan_enable();
    if (getenv("FUZZ_SELFTEST_LEAK")) {
        /* proves that a leak fails the run: this block is lost on purpose */
        char *volatile lost = malloc(1234);
        memset(lost, 1, 1234);
        lost = NULL;
    }
    if (getenv("FUZZ_SELFTEST_SEGV")) {
        /* proves that ASan, not Ruby, reports a wild read, after a GC.compact too */
        rb_funcall(rb_mGC, rb_intern("compact"), 0);
        volatile char *page = mmap(NULL, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        fprintf(stderr, "fuzz: self-test read of %p\n", (void *)page);
        (void)page[16];
    }
    fprintf(stderr, "fuzz: Ruby %s, %d message classes\n", ruby_version, fuzz_n_classes);
}
