/*
 * descriptor_target.c — libFuzzer target: bytes given to Flowctl.load_descriptor_set.
 *
 * Descriptor sets are loaded for the life of the process, and a file loaded before is
 * only ever compared with what it was: so that mutated sets keep reaching the checks
 * and the C builder, every input is first moved into a namespace of its own when it
 * decodes as a FileDescriptorSet (file names, packages, imports and type names get a
 * fresh prefix: fuzz/descriptor.rb). Up to FUZZ_DESC_FRESH inputs are moved (default
 * 20000: what a load defines is never freed); after that the bytes are loaded as they
 * are. Checks:
 *   - Flowctl::DescriptorError is the only exception load_descriptor_set raises;
 *   - every message class a load defined builds, encodes, decodes back equal, and
 *     inspects; every service it defined lists RPCs whose classes are message classes.
 */
#include "fuzz_ruby.h"
#include <stdio.h>
#include <stdlib.h>

#ifndef FUZZ_SRC
#define FUZZ_SRC "fuzz"
#endif

static VALUE runner, allowed[2];
static ID id_run;
static unsigned long inputs, loaded, refused;

static void
report(void)
{
    fprintf(stderr, "descriptor target: %lu inputs, %lu loaded, %lu refused with DescriptorError\n", inputs,
            loaded, refused);
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    fuzz_ruby_init(argc, argv);
    VALUE err = Qnil, path = rb_str_new_cstr(FUZZ_SRC "/fuzz_descriptor.rb");
    if (fuzz_call(Qnil, rb_intern("require"), 1, &path, &err) == Qundef)
        fuzz_bug("fuzz/descriptor.rb failed to load: %+"PRIsVALUE, err);
    runner = rb_path2class("FuzzDescriptors");
    rb_gc_register_mark_object(runner);
    allowed[0] = rb_path2class("Flowctl::DescriptorError");
    id_run = rb_intern("run");
    atexit(report);
    fuzz_lsan_roots();
    return 0;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    VALUE str = rb_str_new((const char *)data, (long)size), err = Qnil;
    inputs++;
    VALUE r = fuzz_call(runner, id_run, 1, &str, &err);
    if (r == Qundef) {
        fuzz_expect(err, allowed, "load_descriptor_set");
        refused++;
    } else {
        loaded++;
    }
    RB_GC_GUARD(str);
    fuzz_gc_tick();
    return 0;
}
