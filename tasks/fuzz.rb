# frozen_string_literal: true

require "fileutils"
require "rbconfig"
require "shellwords"

# Builds and runs the libFuzzer targets of fuzz/ (see fuzz/README.md).
#
# The extension is built a second time, out of tree in tmp/fuzz/ext, by extconf.rb
# --enable-fuzz with clang (ASan + UBSan + coverage); lib/ is copied to tmp/fuzz/lib
# with that flowctl.so in it, and each target embeds Ruby and requires the gem from
# there. The sanitizer and libFuzzer runtimes are linked into the target executable.
module FlowctlFuzz
  ROOT = File.expand_path("..", __dir__)
  OUT = File.join(ROOT, "tmp", "fuzz")
  EXT = File.join(ROOT, "ext", "flowctl")
  CC = ENV.fetch("FUZZ_CC", "clang-14")
  TARGETS = %w[decode convert descriptor json pipeline beat].select { |t| File.exist?(File.join(ROOT, "fuzz", "#{t}_target.c")) }.freeze
  SANITIZE = "-fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined"

  # ASan + Ruby: Ruby's conservative GC scans the machine stack, so locals must stay
  # on it (no fake stacks). GC.compact protects the pages it has emptied with
  # mprotect and needs its own SIGSEGV handler (a read barrier) while it runs, so ASan
  # lets a program install one; fuzz_ruby.c puts ASan's handler back after Ruby starts.
  ASAN_OPTIONS = %w[detect_stack_use_after_return=0 allow_user_segv_handler=1 detect_leaks=1
                    abort_on_error=1 symbolize=1 strict_string_checks=1].join(":")
  UBSAN_OPTIONS = "print_stacktrace=1:halt_on_error=1"

  module_function

  def sh!(*cmd, chdir: ROOT)
    puts cmd.join(" ")
    system(*cmd, chdir: chdir) or abort "fuzz: failed: #{cmd.join(' ')}"
  end

  # The gem's extension with the fuzzing sanitizers, and lib/ around it.
  def build_extension
    dir = File.join(OUT, "ext")
    FileUtils.mkdir_p(dir)
    sh!(RbConfig.ruby, File.join(EXT, "extconf.rb"), "--enable-fuzz", chdir: dir)
    sh!("make", "-j2", "CC=#{CC}", "LDSHARED=#{CC} -shared", "V=0", chdir: dir)
    lib = File.join(OUT, "lib")
    FileUtils.rm_rf(lib)
    FileUtils.cp_r(File.join(ROOT, "lib"), lib)
    FileUtils.cp(File.join(dir, "flowctl.so"), File.join(lib, "flowctl", "flowctl.so"))
  end

  def ruby_cflags
    c = RbConfig::CONFIG
    ["-I#{c['rubyhdrdir']}", "-I#{c['rubyarchhdrdir']}", "-I#{EXT}", "-I#{EXT}/generated"]
  end

  # protobuf-c's own decoder runs on the descriptors of the loaded flowctl.so (dlsym).
  def build_target(name)
    sources = ["fuzz/fuzz_ruby.c", "fuzz/#{name}_target.c"]
    exe = File.join(OUT, "#{name}_fuzzer")
    sh!(CC, "-g", "-O1", "-fno-omit-frame-pointer", *SANITIZE.split, "-Wall", "-Wextra",
        "-Wno-unused-parameter", "-Wno-missing-field-initializers",
        "-DFUZZ_LIB=\"#{File.join(OUT, 'lib')}\"", "-DFUZZ_GEN=\"#{File.join(ROOT, 'spec', 'gen')}\"", "-DFUZZ_SRC=\"#{File.join(ROOT, 'fuzz')}\"", *ruby_cflags, *sources, "-o", exe,
        "-rdynamic", "-L#{RbConfig::CONFIG['libdir']}", RbConfig::CONFIG["LIBRUBYARG_SHARED"],
        "-lprotobuf-c", "-ldl", "-lm", "-lpthread")
    exe
  end

  def build(targets = TARGETS)
    build_extension
    targets.map { |t| build_target(t) }
  end

  def env
    { "ASAN_OPTIONS" => ENV.fetch("ASAN_OPTIONS", ASAN_OPTIONS),
      "UBSAN_OPTIONS" => ENV.fetch("UBSAN_OPTIONS", UBSAN_OPTIONS),
      "LSAN_OPTIONS" => "suppressions=#{File.join(ROOT, 'fuzz', 'lsan.supp')}:print_suppressions=0" }
  end

  # The longest input: 4096 bytes; the pipeline target 1024 (a pipeline file's structure fits
  # in it, the seeds are under 400 bytes, and Psych's parse time grows with the length: at
  # 4096 the target ran at a third of its speed). FUZZ_MAX_LEN sets it for every target.
  MAX_LEN = { "pipeline" => 1024 }.freeze

  def max_len(name) = Integer(ENV.fetch("FUZZ_MAX_LEN", MAX_LEN.fetch(name, 4096)))

  # Runs one target for `runs` executions over a scratch copy of its committed corpus
  # (new inputs found go to tmp/fuzz/corpus/<target>; `rake fuzz:merge` keeps the useful ones).
  def run(name, runs:, extra: [])
    exe = File.join(OUT, "#{name}_fuzzer")
    work = File.join(OUT, "corpus", name)
    FileUtils.mkdir_p(work)
    seeds = File.join(ROOT, "fuzz", "corpus", name)
    dict = File.join(ROOT, "fuzz", "#{name}.dict")
    extra = ["-dict=#{dict}", *extra] if File.exist?(dict)
    # -detect_leaks=0 only stops libFuzzer's per-input leak probe, useless with a garbage
    # collector (Ruby frees later, so every input "leaks" until the probe gives up after
    # 1000 slow scans); LeakSanitizer still checks the whole process at exit.
    # FUZZ_SEED: libFuzzer's random seed (script/test fixes it, so that a suite run can be
    # repeated input for input; unset, each run explores anew)
    extra = ["-seed=#{Integer(ENV['FUZZ_SEED'])}", *extra] if ENV["FUZZ_SEED"]
    args = [exe, "-runs=#{runs}", "-max_len=#{max_len(name)}", "-timeout=10", "-rss_limit_mb=4096", "-detect_leaks=0",
            "-print_final_stats=1", "-artifact_prefix=#{OUT}/#{name}-", *extra, work, seeds]
    puts "#{env.map { |k, v| "#{k}=#{v}" }.join(' ')} #{args.shelljoin}"
    system(env, *args, chdir: ROOT) or abort "fuzz: #{name} found a problem (see above; input saved under #{OUT})"
  end
end
