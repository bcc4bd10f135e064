/*
 * beat_target.c — libFuzzer target: the input as a HeartbeatRequest offered to the native
 * heartbeat table (ext/flowctl/beat_table.c), as the server's acceptor offers it.
 *
 * fuzz/beat_check.rb holds a table with a few components and checks each verdict: bytes the
 * table takes in must be what the Ruby decoder accepts, with the meaning Store#heartbeat
 * gives them (id, status, limits, the metrics and bytes folded back). A decline is always
 * safe (Ruby answers). Any other exception, and any ASan/UBSan/LSan report, is a crash.
 */
#include "fuzz_ruby.h"
#include <dlfcn.h>
#include <sanitizer/lsan_interface.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>

static VALUE checker;
static ID id_check, id_reset;
static void *table;
static bool (*apply)(void *t, const uint8_t *p, size_t len);
static unsigned long inputs, taken;

static void
print_stats(void)
{
    fprintf(stderr, "beat_target: %lu inputs, %lu taken in natively\n", inputs, taken);
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    fuzz_ruby_init(argc, argv);
    checker = fuzz_load_checker("beat_check.rb", "FuzzBeats");
    id_check = rb_intern("check");
    id_reset = rb_intern("reset");
    __lsan_disable(); /* the table lives as long as Ruby */
    void *(*table_of)(VALUE) = (void *(*)(VALUE))dlsym(RTLD_DEFAULT, "flowctl_beat_table_of");
    apply = (bool (*)(void *, const uint8_t *, size_t))dlsym(RTLD_DEFAULT, "flowctl_beat_table_apply");
    if (!table_of || !apply) fuzz_bug("flowctl.so does not export the beat table");
    VALUE t = rb_eval_string("FuzzBeats.table");
    rb_gc_register_mark_object(t);
    table = table_of(t);
    fuzz_lsan_roots();
    __lsan_enable();
    atexit(print_stats);
    return 0;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    VALUE err, args[2];
    static const VALUE none[1] = {0};
    if (fuzz_call(checker, id_reset, 0, NULL, &err) == Qundef) fuzz_expect(err, none, "FuzzBeats.reset");
    bool in = apply(table, data, size);
    args[0] = rb_str_new((const char *)data, (long)size);
    args[1] = in ? Qtrue : Qfalse;
    if (fuzz_call(checker, id_check, 2, args, &err) == Qundef) {
        VALUE shown = rb_inspect(args[0]);
        fprintf(stderr, "input: %s\n", StringValueCStr(shown));
        fuzz_expect(err, none, "the native heartbeat table");
    }
    inputs++;
    taken += in;
    RB_GC_GUARD(args[0]);
    fuzz_gc_tick();
    return 0;
}
