/*
 * fuzz_ruby.h — what the libFuzzer targets in fuzz/ share: an embedded Ruby that has
 * required the gem (its flowctl.so built with the same sanitizers, see tasks/fuzz.rb),
 * the list of message classes, and calls that turn an unexpected exception into a crash.
 */
#ifndef FUZZ_RUBY_H
#define FUZZ_RUBY_H

#include <ruby.h>
#include <ruby/encoding.h>
#include <ruby/version.h>
#include <protobuf-c/protobuf-c.h>
#include <stddef.h>
#include <stdint.h>

#define FUZZ_MAX_CLASSES 64

/* One generated message class and the protobuf-c descriptor of the same message. */
typedef struct {
    VALUE klass;
    const ProtobufCMessageDescriptor *desc;
    VALUE fields;   /* Klass.fields (Array of Symbol) */
    VALUE setters;  /* the matching :"field=" Symbols */
} fuzz_class;

extern fuzz_class fuzz_classes[FUZZ_MAX_CLASSES];
extern int fuzz_n_classes;
extern VALUE fuzz_eDecodeError;

/* Starts Ruby and requires the gem; call from LLVMFuzzerInitialize. */
void fuzz_ruby_init(int *argc, char ***argv);

/* Loads the official google-protobuf gem (upb) and spec/gen's classes of the same protos. */
void fuzz_load_official(void);
/* The google-protobuf class of a full message name. */
VALUE fuzz_official_class(const char *full_name);

/* Requires fuzz/<file> (an oracle script), calls <klass>.warm_up and returns the class,
 * pinned: what loading and warming up allocate lives as long as Ruby (made with LSan off). */
VALUE fuzz_load_checker(const char *file, const char *klass);

/* rb_funcallv under rb_protect. Returns Qundef after an exception; *err gets it. */
VALUE fuzz_call(VALUE recv, ID mid, int argc, const VALUE *argv, VALUE *err);

/* Call after an rb_protect caught an exception (clears ASan's stale stack poison). */
void fuzz_after_jump(void);

/* Aborts (a crash libFuzzer records) unless err is one of the NULL-terminated classes. */
void fuzz_expect(VALUE err, const VALUE *allowed, const char *what);

/* The message of an exception, as a C string (for an error report made at once). */
const char *fuzz_error_text(VALUE err);

/* Prints what went wrong with the Ruby values involved and aborts. */
NORETURN(void fuzz_bug(const char *fmt, ...));

/* a == b for messages, or the same encoding when NaN makes == false. */
int fuzz_same_message(VALUE a, VALUE b);

/* Lets LeakSanitizer see the Ruby heap pages (mmap'ed) as roots: call after Ruby allocated. */
void fuzz_lsan_roots(void);

/* Occasional full GC with compaction so that moved or freed objects show up;
 * registers new heap pages with LSan. Call at the end of every input. */
void fuzz_gc_tick(void);

#endif
