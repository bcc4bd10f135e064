# frozen_string_literal: true

require "mkmf"

APT = "apt-get install -y pkg-config libgrpc-dev libprotobuf-c-dev"

def need(pkg, what)
  return if pkg_config(pkg)

  abort <<~MSG
    flowctl: #{what} (pkg-config package '#{pkg}') was not found.
    On Debian/Ubuntu install it with:
      sudo #{APT}
  MSG
end

abort "flowctl: pkg-config is missing. Install it with:\n  sudo #{APT}" unless find_executable("pkg-config")
need("grpc", "gRPC C core")
need("libprotobuf-c", "protobuf-c")

have_header("grpc/grpc.h") or abort "flowctl: grpc/grpc.h not found. Install it with:\n  sudo #{APT}"
have_header("protobuf-c/protobuf-c.h") or abort "flowctl: protobuf-c.h not found. Install it with:\n  sudo #{APT}"
have_func("rb_gc_mark_movable", "ruby.h")
have_func("rb_ext_ractor_safe", "ruby.h")
have_func("pthread_atfork", "pthread.h")
have_func("rb_hash_stlike_foreach") # exported by libruby though not in its headers

# fork.c calls gRPC core functions that libgrpc exports with C++ linkage (Debian's 1.51): its
# fork handlers and the socket mutator. Without them (another gRPC build, or
# --disable-fork-internals / FLOWCTL_NO_GRPC_CXX=1, which pretends they are absent) the gem
# builds and works, except that a forked child cannot use gRPC (README: Fork).
GRPC_CXX_SYMBOLS = %w[_Z12grpc_preforkv _Z20grpc_postfork_parentv _Z19grpc_postfork_childv
                      _Z24grpc_socket_mutator_initP19grpc_socket_mutatorPK26grpc_socket_mutator_vtable
                      _Z26grpc_socket_mutator_to_argP19grpc_socket_mutator].freeze
if enable_config("fork-internals", ENV["FLOWCTL_NO_GRPC_CXX"] != "1")
  missing = GRPC_CXX_SYMBOLS.reject do |sym|
    checking_for("#{sym} in libgrpc") do
      try_link("void f(void) __asm__(\"#{sym}\");\nint main(void) { f(); return 0; }\n")
    end
  end
  if missing.empty?
    $defs << "-DFLOWCTL_FORK_INTERNALS"
  else
    warn "flowctl: libgrpc does not export #{missing.join(', ')} (gRPC C core 1.51 as Debian 12 ships it does):\n" \
         "  building without gRPC core's fork handlers; a forked child will not be able to use gRPC."
  end
else
  message "flowctl: building without gRPC core's fork internals (asked): a forked child will not be able to use gRPC\n"
end

# The protoc-c output lives in generated/ (one folder per proto package). generated/registry.c
# includes every .pb-c.c file and is the only one compiled, so files of the same name in two
# packages never meet in the build directory.
$VPATH << "$(srcdir)/generated"
$INCFLAGS << " -I$(srcdir)/generated"
$srcs = Dir.glob(File.join(__dir__, "*.c")).map { |f| File.basename(f) } + ["registry.c"]

$CFLAGS << " -std=gnu11 -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers"
$CFLAGS << " -Werror" if enable_config("pedantic", ENV["FLOWCTL_PEDANTIC"] == "1")
if enable_config("asan", false)
  $CFLAGS << " -fsanitize=address -fno-omit-frame-pointer -g -O1"
  $LDFLAGS << " -fsanitize=address"
end
if enable_config("fuzz", false)
  # libFuzzer + ASan + UBSan instrumentation for fuzz/ (rake fuzz builds with `make CC=clang-14`).
  $CFLAGS << " -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined" \
             " -fno-omit-frame-pointer -g -O1"
  $LDFLAGS << " -fsanitize=fuzzer-no-link,address,undefined"
end
if enable_config("debug", false)
  $CFLAGS << " -O0 -g3"
end
$LDFLAGS << " -pthread"

create_makefile("flowctl/flowctl")
