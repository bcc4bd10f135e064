/*
 * pipeline_target.c — libFuzzer target: the input as a pipeline file.
 *
 * The first byte chooses whether commands are looked up (odd) or not; the rest is the
 * text given to Flowctl::Pipeline::Definition.parse. fuzz/pipeline_check.rb checks the
 * result: a Definition whose ids are unique, whose inputs exist and form no cycle, whose
 * argv and env are Strings fit for exec; or a Flowctl::Pipeline::DefinitionError whose
 * every problem names the file and a line within it. Any other exception, and any
 * ASan/UBSan/LSan report, is a crash.
 */
#include "fuzz_ruby.h"
#include <stdio.h>
#include <stdlib.h>

static VALUE checker;
static ID id_check;
static unsigned long inputs, accepted, refused;

static void
print_stats(void)
{
    fprintf(stderr, "pipeline_target: %lu inputs, %lu definitions accepted, %lu refused (DefinitionError)\n",
            inputs, accepted, refused);
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    fuzz_ruby_init(argc, argv);
    checker = fuzz_load_checker("pipeline_check.rb", "FuzzPipeline");
    id_check = rb_intern("check");
    atexit(print_stats);
    return 0;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    VALUE bytes = rb_str_new((const char *)data, (long)size), err;
    VALUE r = fuzz_call(checker, id_check, 1, &bytes, &err);
    if (r == Qundef) {
        static const VALUE none[1] = {0};
        VALUE shown = rb_inspect(bytes);
        fprintf(stderr, "input: %s\n", StringValueCStr(shown));
        fuzz_expect(err, none, "the pipeline loader");
    }
    inputs++;
    if (r == ID2SYM(rb_intern("ok"))) accepted++;
    else refused++;
    RB_GC_GUARD(bytes);
    fuzz_gc_tick();
    return 0;
}
