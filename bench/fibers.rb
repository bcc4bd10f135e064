# frozen_string_literal: true

# Unary calls from 1,000 fibers on one thread (the async gem: each call yields to the
# scheduler while it waits) against 8 threads (each call waits without the GVL), same
# client, same server.
#
#   ruby bench/fibers.rb                     # BENCH_SECONDS=2 per measurement, best of BENCH_ROUNDS=2
#   ECHO_DELAY_US=1000 ruby bench/fibers.rb  # a server with 1 ms of latency per call
#
# Server: bench/echo_server.c on gRPC C core in a subprocess (built here with cc), so the
# figures are the client's. With no latency the server answers at once and neither side
# has much to overlap; with latency, concurrency is what counts: 1,000 fibers keep 1,000
# calls in flight, 8 threads keep 8.

$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
require "flowctl"
require "async"

SECONDS = Float(ENV.fetch("BENCH_SECONDS", "2"))
ROUNDS = Integer(ENV.fetch("BENCH_ROUNDS", "2"))
FIBERS = Integer(ENV.fetch("BENCH_FIBERS", "1000"))
THREADS = Integer(ENV.fetch("BENCH_THREADS", "8"))
DELAY_US = Integer(ENV.fetch("ECHO_DELAY_US", "0"))

def clock = Process.clock_gettime(Process::CLOCK_MONOTONIC)
def cpu = Process.clock_gettime(Process::CLOCK_PROCESS_CPUTIME_ID)

def echo_server
  src = File.expand_path("echo_server.c", __dir__)
  bin = File.expand_path("../tmp/bench/echo_server", __dir__)
  unless File.exist?(bin) && File.mtime(bin) >= File.mtime(src)
    require "fileutils"
    FileUtils.mkdir_p(File.dirname(bin))
    system("cc", "-O2", src, *`pkg-config --cflags --libs grpc`.split, "-o", bin, exception: true)
  end
  io = IO.popen({ "ECHO_DELAY_US" => DELAY_US.to_s }, [bin])
  [Integer(io.gets[/PORT (\d+)/, 1]), io]
end

# [calls/s, client CPU us per call] of n workers started by spawn, each calling until stop.
def measure(n, spawn)
  stop = false
  count = 0
  t0 = clock
  c0 = cpu
  spawn.call(n) do
    until stop
      yield
      count += 1
    end
  end.then { |waiter| sleep_and_stop(waiter) { stop = true } }
  [count / (clock - t0), (cpu - c0) / count * 1e6]
end

def sleep_and_stop(waiter)
  waiter.call(SECONDS) { yield }
end

fibers = lambda do |n, &work|
  lambda do |seconds, &stopper|
    Sync do |task|
      workers = Array.new(n) { task.async(&work) }
      task.sleep seconds
      stopper.call
      workers.each(&:wait)
    end
  end
end

threads = lambda do |n, &work|
  lambda do |seconds, &stopper|
    workers = Array.new(n) { Thread.new(&work) }
    sleep seconds
    stopper.call
    workers.each(&:join)
  end
end

port, server = echo_server
client = Flowctl::ControlPlane::Client.new("127.0.0.1:#{port}", tls: false)
beat = Flowctl::ControlPlane::ProcessorHeartbeatRequest.new(processor_id: "bench", status: "HEALTHY",
                                                            metrics: { "cpu" => 0.5 })
200.times { client.processor_heartbeat(beat) }

best = Hash.new { |h, k| h[k] = [0, 0] }
ROUNDS.times do
  { "#{FIBERS} fibers" => [FIBERS, fibers], "#{THREADS} threads" => [THREADS, threads] }.each do |label, (n, spawn)|
    rate, us = measure(n, spawn) { client.processor_heartbeat(beat) }
    best[label] = [rate, us] if rate > best[label][0]
  end
end

puts "unary calls, echo server on gRPC C core#{DELAY_US.positive? ? " replying after #{DELAY_US} us" : ''}, " \
     "#{SECONDS} s per round, best of #{ROUNDS}:"
best.each { |label, (rate, us)| printf("  %-14s %9.0f calls/s   client CPU %6.1f us/call\n", label, rate, us) }
Process.kill(:TERM, server.pid)
Process.wait(server.pid)
