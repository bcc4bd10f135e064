# frozen_string_literal: true

# Client throughput: this gem vs the official grpc gem, same server, same run.
#
#   ruby bench/rpc.rb                 # ~2 s per measurement
#   BENCH_SECONDS=5 ruby bench/rpc.rb
#
# Servers, each in a subprocess so the client process has its own core:
#   official  the official grpc gem server (spec/support/official_server.rb): the peer the
#             targets name; a Ruby server, it caps what any client can reach.
#   native    bench/echo_server.c on gRPC C core (built here with cc): shows what the
#             clients themselves can do. bench/core_client.c, the same calls on gRPC C
#             core without Ruby, is run against it too: the ceiling of any binding.
# BENCH_SERVERS=official,native (default both). Measurements alternate between
# the two clients and each is the best of BENCH_ROUNDS (default 2) rounds, to damp the
# noise of a shared machine. Client CPU is the CPU time of this process per call (gRPC
# core's own threads included): the cost of the client itself, whatever the server.
# flowctl's unary calls spin briefly before they sleep when the channel answers fast
# (Flowctl.unary_spin_us, default 100 us): their client CPU includes that spinning, and
# part 3 also shows one thread with spinning off. Part 5 runs the unary calls with this
# process and the echo server on one CPU, where nothing spins.

$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
require "flowctl"
require_relative "../spec/support/official_server"
require "etc"
Official.load!

SECONDS = Float(ENV.fetch("BENCH_SECONDS", "2"))
ROUNDS = Integer(ENV.fetch("BENCH_ROUNDS", "2"))
OCP = Obsrvr::Flow::Controlplane
OPR = Obsrvr::Flow::Processor

def clock = Process.clock_gettime(Process::CLOCK_MONOTONIC)
def cpu = Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID)

# Runs the block (which does `batch` operations and returns how many) for SECONDS;
# returns [operations per second, client CPU microseconds per operation].
def measure
  n = 0
  c0 = cpu
  t0 = clock
  n += yield while clock - t0 < SECONDS
  [n / (clock - t0), (cpu - c0) / n * 1e6]
end

def best(label_a, label_b, unit)
  a = []
  b = []
  ROUNDS.times do
    a << yield(:flowctl)
    b << yield(:grpc)
  end
  fa = a.max_by(&:first)
  fb = b.max_by(&:first)
  printf("  %-10s %9.0f %s  (client CPU %6.1f us/op)\n", label_a, fa[0], unit, fa[1])
  printf("  %-10s %9.0f %s  (client CPU %6.1f us/op)\n", label_b, fb[0], unit, fb[1])
  printf("  ratio      %9.2fx throughput, %5.2fx less client CPU\n", fa[0] / fb[0], fb[1] / fa[1])
  [fa, fb]
end

def threaded(threads)
  stop = false
  counts = Array.new(threads, 0)
  workers = Array.new(threads) { |i| Thread.new { counts[i] += yield while !stop } }
  t0 = clock
  c0 = cpu
  sleep SECONDS
  stop = true
  workers.each(&:join)
  n = counts.sum
  [n / (clock - t0), (cpu - c0) / n * 1e6]
end

# bench/<name>.c built into tmp/bench when missing or older than its source; returns the binary.
def native_program(name)
  src = File.expand_path("#{name}.c", __dir__)
  bin = File.expand_path("../tmp/bench/#{name}", __dir__)
  unless File.exist?(bin) && File.mtime(bin) >= File.mtime(src)
    require "fileutils"
    FileUtils.mkdir_p(File.dirname(bin))
    flags = `pkg-config --cflags --libs grpc`.split
    system("cc", "-O2", src, *flags, "-o", bin, exception: true)
  end
  bin
end

# bench/core_client.c: the same work on gRPC C core alone, the ceiling of any binding.
def core_client(mode, target, cpu: nil)
  out = IO.popen([*pin_prefix(cpu), native_program("core_client"), mode, target, SECONDS.to_s], &:read)
  rate, cpu = out[/^RESULT (\S+ \S+)/, 1]&.split&.map(&:to_f)
  raise "core_client #{mode} failed: #{out}" unless rate

  printf("  C core    %9.0f %s  (client CPU %6.1f us/op)  the ceiling: no Ruby at all\n", rate,
         mode == "unary" ? "calls/s" : "msgs/s ", cpu)
end

# Runs a program on the given CPU only (taskset, util-linux), or anywhere when cpu is nil.
def pin_prefix(cpu) = cpu ? ["taskset", "-c", cpu.to_s] : []

def start_native_server(delay_us: 0, cpu: nil)
  io = IO.popen({"ECHO_DELAY_US" => delay_us.to_s}, [*pin_prefix(cpu), native_program("echo_server")])
  port = Integer(io.gets[/PORT (\d+)/, 1])
  [port, -> { Process.kill(:TERM, io.pid); Process.wait(io.pid); io.close }]
end

def start_official_server
  server = OfficialServer.new(subprocess: true, pool_size: 40)
  port = server.start(handler_for_controlplane: "OfficialServer::EchoControlPlane",
                      handler_for_processor: "OfficialServer::EchoProcessor")
  [port, -> { server.stop }]
end

# Both clients on target, warmed up (connection, TCP, code paths), and the same request for each.
def unary_clients(target)
  cp = Flowctl::ControlPlane::Client.new(target, tls: false)
  stub = OCP::ControlPlane::Stub.new(target, :this_channel_is_insecure)
  beat = Flowctl::ControlPlane::ProcessorHeartbeatRequest.new(processor_id: "bench", timestamp: Time.now,
                                                              metrics: {"cpu" => 0.5, "lag" => 12.0}, status: "HEALTHY")
  obeat = OCP::ProcessorHeartbeatRequest.decode(beat.to_proto)
  200.times { cp.processor_heartbeat(beat) && stub.processor_heartbeat(obeat, deadline: Time.now + 5) }
  [cp, stub, beat, obeat]
end

def sequential_unary(cp, stub, beat, obeat)
  best("flowctl", "grpc", "calls/s") do |who|
    if who == :flowctl
      measure { cp.processor_heartbeat(beat, timeout: 5) && 1 }
    else
      measure { stub.processor_heartbeat(obeat, deadline: Time.now + 5) && 1 }
    end
  end
end

def run_suite(target, native)
  cp, stub, beat, obeat = unary_clients(target)
  puts "\n1. Sequential unary ProcessorHeartbeat (calls/s)"
  sequential_unary(cp, stub, beat, obeat)
  core_client("unary", target) if native

  puts "\n2. Bidi Process stream of 1 KiB DataMessages (messages/s, echoed)"
  batch = Integer(ENV.fetch("BENCH_STREAM_BATCH", "2000"))
  payload = ("x" * 1024).b
  msgs = Array.new(batch) { |i| Flowctl::Processor::DataMessage.new(payload: payload, metadata: {"seq" => i.to_s}) }
  omsgs = msgs.map { |m| OPR::DataMessage.decode(m.to_proto) }
  pc = Flowctl::Processor::Client.new(target, tls: false)
  pstub = OPR::ProcessorService::Stub.new(target, :this_channel_is_insecure)
  best("flowctl", "grpc", "msgs/s") do |who|
    if who == :flowctl
      measure do
        n = 0
        pc.process(msgs) { |_r| n += 1 }
        raise "lost replies" unless n == batch

        n
      end
    else
      measure do
        n = 0
        pstub.process(omsgs).each { |_r| n += 1 }
        raise "lost replies" unless n == batch

        n
      end
    end
  end
  core_client("bidi", target) if native

  puts "\n3. Eight Ruby threads sharing one client vs one thread (ProcessorHeartbeat calls/s)"
  one = nil
  eight = nil
  ograte = {}
  still = nil # one thread with spinning off (Flowctl.unary_spin_us = 0): every wait sleeps
  ROUNDS.times do
    r1 = threaded(1) { cp.processor_heartbeat(beat) && 1 }
    spin = Flowctl.unary_spin_us
    Flowctl.unary_spin_us = 0
    r0 = threaded(1) { cp.processor_heartbeat(beat) && 1 }
    Flowctl.unary_spin_us = spin
    still = r0 if still.nil? || r0[0] > still[0]
    r8 = threaded(8) { cp.processor_heartbeat(beat) && 1 }
    g1 = threaded(1) { stub.processor_heartbeat(obeat, deadline: Time.now + 5) && 1 }
    g8 = threaded(8) { stub.processor_heartbeat(obeat, deadline: Time.now + 5) && 1 }
    one = r1 if one.nil? || r1[0] > one[0]
    eight = r8 if eight.nil? || r8[0] > eight[0]
    ograte[1] = g1 if ograte[1].nil? || g1[0] > ograte[1][0]
    ograte[8] = g8 if ograte[8].nil? || g8[0] > ograte[8][0]
  end
  printf("  flowctl  1 thread  %9.0f calls/s\n", one[0])
  printf("  flowctl  1 thread  %9.0f calls/s   with Flowctl.unary_spin_us = 0\n", still[0])
  printf("  flowctl  8 threads %9.0f calls/s   ratio %.2fx (%.2fx over the thread that does not spin)\n",
         eight[0], eight[0] / one[0], eight[0] / still[0])
  printf("  grpc     1 thread  %9.0f calls/s\n", ograte[1][0])
  printf("  grpc     8 threads %9.0f calls/s   ratio %.2fx\n", ograte[8][0], ograte[8][0] / ograte[1][0])
  printf("  flowctl 8 threads vs grpc 8 threads: %.2fx\n", eight[0] / ograte[8][0])

  cp.close
  pc.close
end

puts "flowctl #{Flowctl::VERSION} vs grpc #{GRPC::VERSION}; #{SECONDS} s per measurement, best of #{ROUNDS}; " \
     "ruby #{RUBY_VERSION}, #{Etc.nprocessors} CPUs, load #{File.read('/proc/loadavg').split.first(3).join(' ')}"
ENV.fetch("BENCH_SERVERS", "official,native").split(",").each do |kind|
  next warn("unknown server #{kind.inspect} in BENCH_SERVERS (official, native)") unless %w[official native].include?(kind)

  port, stop = kind == "native" ? start_native_server : start_official_server
  puts "\n=== server: #{kind == 'native' ? 'bench/echo_server.c (gRPC C core)' : 'official grpc gem'} " \
       "(subprocess) at 127.0.0.1:#{port}"
  run_suite("127.0.0.1:#{port}", kind == "native")
ensure
  stop&.call
end

# The GVL test proper: with 1 ms of server latency one thread waits most of the time, so
# eight threads reach up to 8x one thread's rate only if every wait releases the GVL.
port, stop = start_native_server(delay_us: 1000)
puts "\n=== server: bench/echo_server.c with ECHO_DELAY_US=1000 (1 ms latency per call) at 127.0.0.1:#{port}"
puts "4. Eight Ruby threads sharing one client vs one thread, server latency 1 ms (calls/s)"
begin
  cp = Flowctl::ControlPlane::Client.new("127.0.0.1:#{port}", tls: false)
  stub = Obsrvr::Flow::Controlplane::ControlPlane::Stub.new("127.0.0.1:#{port}", :this_channel_is_insecure)
  beat = Flowctl::ControlPlane::ProcessorHeartbeatRequest.new(processor_id: "bench", status: "HEALTHY")
  obeat = Obsrvr::Flow::Controlplane::ProcessorHeartbeatRequest.decode(beat.to_proto)
  f1 = threaded(1) { cp.processor_heartbeat(beat) && 1 }
  f8 = threaded(8) { cp.processor_heartbeat(beat) && 1 }
  g1 = threaded(1) { stub.processor_heartbeat(obeat, deadline: Time.now + 5) && 1 }
  g8 = threaded(8) { stub.processor_heartbeat(obeat, deadline: Time.now + 5) && 1 }
  printf("  flowctl  1 thread  %9.0f calls/s\n", f1[0])
  printf("  flowctl  8 threads %9.0f calls/s   ratio %.2fx\n", f8[0], f8[0] / f1[0])
  printf("  grpc     1 thread  %9.0f calls/s\n", g1[0])
  printf("  grpc     8 threads %9.0f calls/s   ratio %.2fx\n", g8[0], g8[0] / g1[0])
  cp.close
ensure
  stop.call
end

# 5. Sequential unary calls with this process (all its threads) and the echo server on one
# CPU. On two idle CPUs (virtual ones here) a loopback ping-pong waits mostly for cross-CPU
# wake-ups, which no binding controls: gRPC C core itself gets about 1.4x the grpc gem
# there. On one CPU the rate is what the client and the server spend per call, which is
# what a binding does control. BENCH_ONE_CPU=0 skips this part.
if ENV["BENCH_ONE_CPU"] != "0" && system("taskset", "-p", Process.pid.to_s, out: File::NULL, err: File::NULL)
  mask = `taskset -p #{Process.pid}`[/:\s*(\h+)\s*\z/, 1]
  port, stop = start_native_server(cpu: 0)
  begin
    system("taskset", "-a", "-p", "-c", "0", Process.pid.to_s, out: File::NULL, exception: true)
    puts "\n=== server: bench/echo_server.c at 127.0.0.1:#{port}, it and this process on CPU 0 only"
    puts "5. Sequential unary ProcessorHeartbeat on one CPU (calls/s)"
    target = "127.0.0.1:#{port}"
    cp, stub, beat, obeat = unary_clients(target)
    sequential_unary(cp, stub, beat, obeat)
    core_client("unary", target, cpu: 0)
    cp.close
  ensure
    system("taskset", "-a", "-p", mask, Process.pid.to_s, out: File::NULL) if mask
    stop.call
  end
end
